"""timm's own generic model tests (tests/test_models.py of the installed timm's source distribution) on mdeq_*.

The sdist is fetched from the package index once (pip download) into ~/.cache/mdeq-zoo, or taken from
$MDEQ_TIMM_SDIST (a folder holding the unpacked timm-<version>/). TorchScript tests are excluded: the DEQ
solvers are Python loops over closures.

Two runs of timm's tests, so that they go to both pytest-xdist workers: the pruning contract of the two largest
architectures (a dozen solves each; ``$MDEQ_TIMM_MODELS``, read by timm_plugin, narrows timm's listing to them), and
every other generic test of every mdeq_* model. Every model they create solves with a budget of SOLVER_BUDGET
f-evaluations forward and backward (``$MDEQ_TIMM_MAX_ITER``): what the tests check does not depend on it, and at
the presets' budgets the two runs took 3.5-4.5 min each.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import mdeq  # noqa: F401  (registers mdeq_*)

PLUGIN_DIR = Path(__file__).resolve().parent
GENERIC_TESTS = ("test_model_forward or test_model_backward or test_model_default_cfgs or test_model_forward_features"
                 " or test_model_forward_intermediates or test_prune_intermediate_layers_contract")


def _timm_tests_dir() -> Path:
    version = timm.__version__
    root = Path(os.environ.get("MDEQ_TIMM_SDIST", Path.home() / ".cache" / "mdeq-zoo" / "timm-sdist"))
    tests = root / f"timm-{version}" / "tests"
    if (tests / "test_models.py").is_file():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # xdist workers: one fetches and unpacks, the others wait for it
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no concurrent workers to guard against there
            pass
        return _fetch_timm_tests(root, tests, version)


def _fetch_timm_tests(root: Path, tests: Path, version: str) -> Path:
    if (tests / "test_models.py").is_file():  # another worker unpacked it while this one waited
        return tests
    fetch = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
         "-d", str(root), "-q"], capture_output=True, text=True, timeout=600)
    archive = root / f"timm-{version}.tar.gz"
    if fetch.returncode != 0 or not archive.is_file():
        if os.environ.get("CI"):  # CI reaches the package index: a missing sdist is a failure there
            pytest.fail(f"cannot fetch the timm {version} sdist: {fetch.stderr.strip()[-300:]}")
        pytest.skip(f"timm {version} source distribution not available (pip download failed: "
                    f"{fetch.stderr.strip()[-300:]})")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{version}/tests/")]
        tar.extractall(root, members=members, filter="data")
    return tests


MODELS = ("mdeq_cifar_large", "mdeq_large", "mdeq_small", "mdeq_tiny", "mdeq_xl")
PRUNE = "test_prune_intermediate_layers_contract"
SPLIT = ("mdeq_xl", "mdeq_large")  # their pruning contract (the largest solves) runs on its own
# (architectures, which of their generic tests): each a pytest run of its own; together every generic test of every
# model: the pruning contract of the SPLIT models, and all the others
PIECES = [(SPLIT, "prune"), (MODELS, "others")]
# forward and backward f-evaluations of every model timm's tests create (timm_plugin): the contract they check
# (shapes, taps, pruning, gradients reaching every parameter) holds at any budget; the presets' took 2.5-3x as long
SOLVER_BUDGET = 4


def _min_passed(model: str, part: str) -> int:
    """At least 9 generic tests pass per model (default_cfgs runs once per pretrained tag), 1 of them the pruning."""
    if part == "prune":
        return 1
    return 8 if model in SPLIT else 9


@pytest.mark.slow
@pytest.mark.parametrize("models, part", PIECES, ids=[f"{'+'.join(m)}-{part}" for m, part in PIECES])
def test_timm_generic_model_tests_pass_for_every_mdeq_model(models, part):
    assert sorted(timm.list_models("mdeq*")) == list(MODELS)
    tests = _timm_tests_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=str(PLUGIN_DIR), HF_HUB_OFFLINE="1", MDEQ_TIMM_MODELS=",".join(models),
               MDEQ_TIMM_MAX_ITER=str(SOLVER_BUDGET))
    if part == "prune":
        select = f" and {PRUNE}"
    else:  # the pruning contract of the models without a piece of their own
        select = "".join(f" and not ({PRUNE} and {m})" for m in SPLIT)
    cmd = [sys.executable, "-m", "pytest", "test_models.py", "-p", "timm_plugin", "-q", "-rp", "-c", os.devnull,
           "--rootdir", ".", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
           "-k", f"({GENERIC_TESTS}) and not torchscript{select}"]
    run = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=2400)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert "failed" not in summary and "error" not in summary, summary
    ran = re.findall(r"^PASSED (\S+)", run.stdout, re.M)  # -rp: the passed tests by id
    per_model = {m: [t for t in ran if re.search(rf"[\[-]{m}[\].]", t)] for m in models}
    assert len(ran) == passed == sum(map(len, per_model.values())), ran
    assert all(len(t) >= _min_passed(m, part) for m, t in per_model.items()), (summary, per_model)
