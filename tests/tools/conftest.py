"""Shared fixtures for the training-tool tests: a small real digits ImageFolder and fast run settings."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# small and fast, but every part of the recipe runs: 1 epoch unrolled, then DEQ mode with the IFT backward
# and the Jacobian penalty on every DEQ step (no experiment: the base config plus these settings)
FAST = [
    "~experiment", "data=imagefolder", "data.root={root}", "data.aug.scale=[0.85,1.0]", "data.aug.hflip=0.0", "data.batch_size=10", "data.eval_batch_size=15", "data.workers=0",
    "schedule.unroll_steps=2", "deq.max_iter=3", "deq.b_max_iter=3", "schedule.pretrain_steps=6",
    "data.overrides.input_size=16", "schedule.jac.weight=0.5", "schedule.jac.freq=1.0",
    "schedule.jac.pretrain_weight=0.0",
    "train.precise_bn_batches=2", "train.epochs=2", "train.log_interval=1", "train.progress=false",
]


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    """10 classes x (6 train, 3 val) real digits from the scikit-learn cache (60 / 30 images)."""
    from mdeq.data.digits import prepare_digits

    full = prepare_digits(tmp_path_factory.mktemp("digits") / "full")
    small = tmp_path_factory.mktemp("digits_small")
    for split, n in (("train", 6), ("val", 3)):
        for cls in sorted(p.name for p in (full / split).iterdir()):
            dst = small / split / cls
            dst.mkdir(parents=True)
            for f in sorted((full / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return small


@pytest.fixture(scope="session")
def trained_run(digits_small, tmp_path_factory):
    """One short training run by tools/train_cls.py with the FAST settings: (run folder, finished process). Shared
    by the train, eval and publish tests, which only read it."""
    run_dir = tmp_path_factory.mktemp("run") / "digits"
    proc = run_tool("train_cls.py", fast_overrides(digits_small, f"hydra.run.dir={run_dir}"), cwd=run_dir.parent)
    return run_dir, proc


@pytest.fixture(scope="session")
def distill_teacher(digits_small, tmp_path_factory) -> Path:
    """The run folder of a FAST digits classifier without the Jacobian penalty: the teacher the distillation tests
    distil from (they only read its checkpoint)."""
    teacher = tmp_path_factory.mktemp("teacher") / "run"
    run_tool("train_cls.py", fast_overrides(digits_small, "schedule.jac.weight=0.0", "schedule.jac.freq=0.0",
                                            f"hydra.run.dir={teacher}"), cwd=teacher.parent)
    return teacher


def fast_overrides(root: Path, *extra: str) -> list:
    return [o.format(root=root) for o in FAST] + list(extra)


def tool_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    return env


def run_tool(tool: str, args: list, cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], cwd=cwd, env=tool_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
