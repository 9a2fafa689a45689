"""Budget benchmark: the DEQ training methods on the same data with the same budget, compared at equal
f-evaluations (``tools/benchmark.py budget``).

Methods (each a Hydra recipe of ``tools/train_cls.py`` on the bundled digits at 16x16, mdeq_tiny, the same
epochs and optimizer; see ``configs/experiment/digits_*.yaml``):

==========  ======================  =====================================================================
method      recipe                  what differs from plain DEQ
==========  ======================  =====================================================================
plain       digits_plain            (the reference: Anderson forward, implicit gradient, no penalty)
jr          digits_tiny             Jacobian regularisation on half of the steps
phantom     digits_phantom          phantom gradient (5 damped unrolled steps from z*)
skip        digits_skip             Skip DEQ: a learned predictor g(x) gives z0
skip_reg    digits_skip_reg         Skip Reg. DEQ: z0 = f(0, x), pulled towards z*
ode         digits_ode              continuous DEQ: dz/dt = f(z) - z integrated to steady state
stack       digits_stack            the explicit baseline: the same cell applied 8 times with backprop
cdeq        tools/distill.py        C-DEQ: a consistency student distilled from plain's last checkpoint
==========  ======================  =====================================================================

Training: each method runs in a fresh subprocess (``--jobs`` at once; cdeq waits for plain) with
``OMP_NUM_THREADS`` = ``threads``, its output in ``<runs>/<method>.log`` and its run folder
``<runs>/<method>/`` (``hydra.run.dir``). Reported per method: ``train_seconds`` of the run's metrics.json
(cdeq: ``distill_seconds``, the distillation only; its teacher is plain's run), the subprocess wall time, and
the peak resident memory of the training process from ``os.wait4``'s rusage of that very child
(``ru_maxrss``; on Linux the larger of the process's own peak and that of its reaped DataLoader workers, never
a sum, and never another training's, as ``RUSAGE_CHILDREN`` would be; Linux also keeps the RSS this process had
when it forked the child, recorded as ``parent_rss_mb``, as a floor).

Resuming: a method whose run folder has a metrics.json and a ``budget_train.json`` record of the same command,
and whose recipe still composes the run's ``.hydra/config.yaml``, is not trained again (its recorded time and
memory are reported, marked ``reused``), so an interrupted benchmark continues with the methods it had not
finished and an edited recipe is trained again; ``retrain=True`` trains everything again, and a method that
was interrupted half-way starts over (its folder is cleared). cdeq is distilled again whenever plain was
trained in this invocation.

Evaluation (in this process, on the run's val split with its eval transforms, from ``checkpoints/last.pth``):
the checkpoint's model in its evaluation settings (``schedule.apply_eval``), then for each budget k
``configure_deq(**{**base, **budget_options(base, k)})`` (``mdeq.engine.evaluate.budget_options``: one
forward makes exactly k f-evaluations and the head sees the last one's output) and top-1 with the
f-evaluations made (``deq_stats.nfe`` of the last batch; a solver that cannot stop at exactly k, such as the
``ode`` solver whose Runge-Kutta steps cost several evaluations, is reported with the number it made). "At
convergence": the method's own solver with ``max_iter`` 50 and ``tol`` 1e-4 and its mean solver steps; the
stack at its own depth; cdeq the student at its default steps (its teacher at convergence is plain).

Memory at equal depth: one training step of mdeq_tiny at the recipes' input size and batch
(``training.run``, started from a fresh interpreter so that its per-configuration processes are not floored
by this process's RSS) in DEQ mode (Anderson + IFT, ``depth`` forward and backward iterations) and unrolled
(the stack) at each depth: step peak MB and autograd-saved MB.

Other data: ``data_root`` (an ImageFolder root with train/ and val/, e.g. MNIST written as PNGs) replaces the
digits: ``data=imagefolder data.root=...`` with the digits' mild augmentation (no flips) and the recipe renamed
``budget-<recipe>`` (the digits recipes refuse other data under their own name); unrolled pre-training is
kept at the recipes' 2 epochs (``deq.pretrain_steps`` from that train set's size). ``train_overrides`` are
appended to every training command (``METHOD:key=value`` to one method's only), after the benchmark's own.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["METHODS", "run", "train_methods", "evaluate_method", "compute_targets", "to_markdown", "plot", "save",
           "DEFAULT_EVALS"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EVALS = (1, 2, 4, 8, 16)
CONVERGE_MAX_ITER, CONVERGE_TOL = 50, 1e-4
PRETRAIN_EPOCHS = 2        # the digits recipes' unrolled pre-training: 88 steps = 2 epochs of 44
REACH_TOLERANCE = 0.5      # "reaches plain's accuracy": within this many points of it
NEAR_POINTS = 2.0          # the C-DEQ / Skip DEQ target: within 2 points of plain at convergence
RECORD = "budget_train.json"


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    recipe: Optional[str]  # the Hydra experiment (None: distilled from plain)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("plain", "plain DEQ", "digits_plain"),
    Method("jr", "DEQ + JR", "digits_tiny"),
    Method("phantom", "phantom gradient", "digits_phantom"),
    Method("skip", "Skip DEQ", "digits_skip"),
    Method("skip_reg", "Skip Reg. DEQ", "digits_skip_reg"),
    Method("ode", "continuous DEQ", "digits_ode"),
    Method("stack", "residual stack", "digits_stack"),
    Method("cdeq", "C-DEQ (from plain)", None),
)}


# ------------------------------------------------------------------------------------------------- training
def _split_overrides(overrides: Sequence[str]) -> Dict[Optional[str], List[str]]:
    """``key=value`` -> every method (key None); ``METHOD:key=value`` -> that method only."""
    out: Dict[Optional[str], List[str]] = {}
    for o in overrides:
        head = o.split("=", 1)[0]
        scope, sep, rest = head.partition(":")
        if sep and scope in METHODS:
            out.setdefault(scope, []).append(rest + o[len(head):])
        elif sep and scope.isidentifier():
            raise ValueError(f"train override {o!r}: {scope!r} is not a method ({', '.join(METHODS)})")
        else:
            out.setdefault(None, []).append(o)
    return out


def _last_value(overrides: Sequence[str], key: str) -> Optional[str]:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return values[-1] if values else None


def _count_images(root: Path, split: str = "train") -> int:
    from mdeq.data.classification import ImageFolderDataset, find_split

    return len(ImageFolderDataset(find_split(root, split)))


def train_command(method: Method, run_dir: Path, epochs: Optional[int], data_root: Optional[Path],
                  overrides: Sequence[str], train_images: Optional[int] = None) -> List[str]:
    """The ``train_cls`` command line of one method (``overrides``: this method's extra Hydra overrides)."""
    cmd = [sys.executable, str(ROOT / "tools" / "train_cls.py"), f"experiment={method.recipe}",
           f"hydra.run.dir={run_dir}", "train.progress=false"]
    if epochs is not None:
        cmd.append(f"train.epochs={epochs}")
    if data_root is not None:
        cmd += ["data=imagefolder", f"data.root={data_root}", "data.aug.scale=[0.85,1.0]", "data.aug.ratio=[0.9,1.1]",
                "data.aug.hflip=0.0", "data.workers=2", "data.eval_batch_size=128", f"recipe=budget-{method.recipe}"]
        if method.name != "stack" and train_images is not None:  # the stack never leaves unrolled mode
            batch = int(_last_value(list(overrides), "data.batch_size") or 32)
            cmd.append(f"deq.pretrain_steps={PRETRAIN_EPOCHS * max(train_images // batch, 1)}")
    return cmd + list(overrides)


def distill_command(teacher: Path, run_dir: Path, epochs: int, evals: Sequence[int],
                    data_root: Optional[Path], extra: Sequence[str]) -> List[str]:
    cmd = [sys.executable, str(ROOT / "tools" / "distill.py"), str(teacher), "--output", str(run_dir),
           "--epochs", str(epochs), "--eval-iters", *[str(k) for k in evals], "--no-progress"]
    if data_root is not None:
        cmd += ["--data-root", str(data_root)]
    return cmd + list(extra)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _launch(cmd: List[str], log: Path, threads: int) -> Dict:
    """Run ``cmd`` to the end; its wall time and the peak RSS of that child (``os.wait4``), in MB.

    Linux carries the forked copy's high-water mark over the exec into ``ru_maxrss``, so the peak is at least
    this process's RSS at the launch (``parent_rss_mb``, recorded too); a training's own peak is far above it.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    parent_rss = _rss_mb()
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return dict(returncode=proc.returncode, wall_s=round(time.perf_counter() - t0, 1),
                peak_mb=round(usage.ru_maxrss / 1024, 1), parent_rss_mb=round(parent_rss, 1))  # ru_maxrss: KiB


def _recipe_changed(cmd: List[str], run_dir: Path) -> bool:
    """Whether ``train_cls`` would now compose another job config from ``cmd`` than the run's ``.hydra/config.yaml``
    (a recipe or config file was edited since the run)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mdeq.engine.app import register_resolvers

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return True
    register_resolvers()
    job = [o for o in cmd[2:] if not o.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        now = OmegaConf.to_container(compose(config_name="train_cls", overrides=job), resolve=False)
    return now != OmegaConf.to_container(OmegaConf.load(saved), resolve=False)


def _read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_methods(methods: Sequence[str], runs_dir: Path, epochs: Optional[int] = None,
                  data_root: Optional[Path] = None, distill_epochs: int = 10, evals: Sequence[int] = DEFAULT_EVALS,
                  jobs: int = 1, threads: int = 1, retrain: bool = False, train_overrides: Sequence[str] = (),
                  distill_args: Sequence[str] = (), progress: Callable[[str], None] = print) -> Dict[str, Dict]:
    """Train (or reuse) every method; returns per method its run folder, command, times and peak memory."""
    scoped = _split_overrides(train_overrides)
    train_images = _count_images(data_root) if data_root is not None else None
    runs_dir.mkdir(parents=True, exist_ok=True)
    info: Dict[str, Dict] = {}
    commands: Dict[str, List[str]] = {}
    for name in methods:
        m, run_dir = METHODS[name], runs_dir / name
        if m.recipe is None:
            commands[name] = distill_command(runs_dir / "plain" / "checkpoints" / "last.pth", run_dir,
                                             distill_epochs, evals, data_root, distill_args)
        else:
            commands[name] = train_command(m, run_dir, epochs, data_root,
                                           scoped.get(None, []) + scoped.get(name, []), train_images)
        info[name] = dict(run_dir=str(run_dir), command=shlex.join(commands[name][1:]),
                          log=str(runs_dir / f"{name}.log"))

    def reusable(name: str) -> bool:
        record = _read_json(runs_dir / name / RECORD)
        if not (not retrain and (runs_dir / name / "metrics.json").is_file() and record is not None
                and record.get("command") == info[name]["command"] and record.get("returncode") == 0):
            return False
        if METHODS[name].recipe is not None and _recipe_changed(commands[name], runs_dir / name):
            progress(f"[budget] {name}: its recipe composes another config than the finished run's: training again")
            return False
        return True

    todo = [n for n in methods if not reusable(n)]
    if "cdeq" in methods and "plain" in todo and "cdeq" not in todo:
        todo.append("cdeq")  # a new teacher: distil again
    for name in methods:
        if name not in todo:
            info[name].update(_read_json(runs_dir / name / RECORD) or {}, reused=True)
            progress(f"[budget] {name}: reusing {runs_dir / name} (metrics.json present; --retrain trains it again)")
    failed: set = set()
    lock = threading.Lock()

    def job(name: str) -> Dict:
        run_dir = runs_dir / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-finished or outdated run: start over
        with lock:
            progress(f"[budget] {name}: started  {info[name]['command']}")
        res = _launch(commands[name], Path(info[name]["log"]), threads)
        res.update(command=info[name]["command"], threads=threads, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        if res["returncode"] == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RECORD).write_text(json.dumps(res, indent=2))
        return res

    pending = [n for n in methods if n in todo]
    running: Dict = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for name in list(pending):
                if len(running) >= max(1, jobs):
                    break
                if name == "cdeq" and ("plain" in pending or any(v == "plain" for v in running.values())):
                    continue  # the teacher is not ready yet
                pending.remove(name)
                if name == "cdeq" and "plain" in failed:
                    info[name].update(reused=False, returncode=None, error="its teacher (plain) failed to train")
                    failed.add(name)
                    continue
                running[pool.submit(job, name)] = name
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                res = fut.result()
                info[name].update(res, reused=False)
                if res["returncode"] != 0:
                    failed.add(name)
                    info[name]["error"] = f"exit code {res['returncode']}; see {info[name]['log']}"
                with lock:
                    progress(f"[budget] {name}: {'done' if res['returncode'] == 0 else 'FAILED'} in "
                             f"{res['wall_s']:.0f} s, process peak {res['peak_mb']:.0f} MB")
    for name in methods:
        metrics = _read_json(runs_dir / name / "metrics.json")
        if metrics is not None and not info[name].get("error"):
            info[name]["train_seconds"] = round(float(metrics.get("distill_seconds", metrics.get("train_seconds"))), 1)
            info[name]["recipe_val_top1"] = metrics.get("val_top1")
    return info


def _memory_rows(configs: List[Dict], size: int, batch: int, threads: int, progress: Callable[[str], None]) -> Dict:
    """``training.run`` from a fresh interpreter: its per-configuration processes are forked from a small parent.

    ``training.run_one``'s CPU peak is the growth of ``ru_maxrss``, which Linux floors at the RSS of the process
    that forked it (the pre-exec high-water mark is kept), so run from this process, grown by the evaluations,
    every configuration would report about the same peak.
    """
    args = dict(configs=configs, size=size, batch=batch, repeats=2, threads=threads)
    code = ("import json,sys; from mdeq.benchmarks import training; a = json.loads(sys.argv[1]); "
            "r = training.run(a.pop('configs'), progress=lambda s: print(s, flush=True), **a); "
            "print('RESULT ' + json.dumps(r))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    lines = proc.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            progress(line)
    results = [ln for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"the memory benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------- evaluation
def _load(checkpoint: Path):
    """``load_model_for_eval``, and a flagged workaround for Skip DEQ checkpoints (see the note it returns)."""
    from mdeq.engine.model_source import load_model_for_eval

    try:
        return load_model_for_eval(str(checkpoint)), None
    except RuntimeError as err:
        if "fullstage.initializer" not in str(err):
            raise
    # WORKAROUND (engine bug): the checkpoint's identity.model_kwargs lack the deq init options that
    # trainer.build_model passes when it builds a Skip DEQ model (model_deq_options), so load_model_for_eval
    # builds the model without its predictor and the strict load fails on fullstage.initializer.*.
    from mdeq.engine import model_source
    from mdeq.engine.base_trainer import model_deq_options
    from mdeq.engine.checkpoint import load_checkpoint

    raw = load_checkpoint(checkpoint)
    kwargs = dict(raw["identity"].get("model_kwargs") or {})
    kwargs["deq"] = {**dict(kwargs.get("deq") or {}), **model_deq_options(raw["config"])}
    raw["identity"] = dict(raw["identity"], model_kwargs=kwargs)
    return (model_source._from_training_checkpoint(Path(checkpoint), raw, False),
            "load_model_for_eval cannot load this Skip DEQ checkpoint (its identity lacks deq.init=skip); "
            "loaded with the deq options of its config added")


def _val_loader(loaded, batch_size: Optional[int] = None):
    """The run's val split with its eval transforms (as tools/eval_cls.py builds it for a training checkpoint)."""
    from mdeq.data.classification import (ImageFolderDataset, build_eval_loader, build_transform, find_split,
                                          resolve_data_cfg)
    from mdeq.data.digits import prepare_digits

    data = loaded.config["data"]
    root = prepare_digits(data.get("root")) if data.get("name") == "digits" else data["root"]
    data_cfg = resolve_data_cfg(loaded.model, loaded.data_cfg)
    class_to_idx = {c: i for i, c in enumerate(loaded.classes)} if loaded.classes else None
    dataset = ImageFolderDataset(find_split(root, data.get("val_split", "val")),
                                 transform=build_transform(data_cfg, False), class_to_idx=class_to_idx)
    batch = batch_size or data.get("eval_batch_size") or data["batch_size"]
    return build_eval_loader(dataset, int(batch), workers=0), data_cfg


def evaluate_method(checkpoint: Path, evals: Sequence[int] = DEFAULT_EVALS, env=None) -> Dict:
    """Top-1 of one checkpoint at each f-evaluation budget and at convergence."""
    from mdeq.engine.distributed import DistEnv
    from mdeq.engine.evaluate import budget_options, evaluate_classifier

    env = env or DistEnv()
    loaded, note = _load(checkpoint)
    model = loaded.model.to(env.device).eval()
    loaded.schedule.apply_eval(model, loaded.step)
    base = dict(model.deq.options)
    loader, data_cfg = _val_loader(loaded)
    rows = []
    for k in evals:
        model.configure_deq(**{**base, **budget_options(base, int(k))})
        res = evaluate_classifier(model, loader, env, progress=False)
        nfe = int(model.deq_stats.nfe)
        rows.append(dict(evals=int(k), nfe=nfe, exact=nfe == int(k), top1=round(res.top1, 2), top5=round(res.top5, 2),
                         solver=model.deq.options["solver"]))
    if base["solver"] in ("unroll", "consistency"):  # the stack at its own depth; the student at its own steps
        conv_options = dict(base)
    else:
        conv_options = {**base, "max_iter": CONVERGE_MAX_ITER, "tol": CONVERGE_TOL, "final_step": True}
    model.configure_deq(**conv_options)
    res = evaluate_classifier(model, loader, env, progress=False)
    extra = 1 if conv_options.get("init") == "skip_reg" and conv_options["solver"] != "unroll" else 0  # z0 = f(0)
    converged = dict(top1=round(res.top1, 2), top5=round(res.top5, 2), deq_nstep_mean=round(res.deq_nstep_mean, 2),
                     fevals_mean=round(res.deq_nstep_mean + extra, 2), rel_residual_mean=res.deq_rel_residual_mean,
                     nfe_last_batch=int(model.deq_stats.nfe), solver=conv_options["solver"],
                     max_iter=int(conv_options["max_iter"]), tol=conv_options["tol"])
    return dict(budgets=rows, converged=converged, val_images=res.count, base_solver=base["solver"],
                input_size=list(data_cfg["input_size"]), batch_size=int(loaded.config["data"]["batch_size"]),
                data=loaded.config["data"].get("name"), note=note)


# ------------------------------------------------------------------------------------------------ the whole run
def run(methods: Sequence[str] = tuple(METHODS), runs_dir: Path = Path("results/benchmarks/budget_runs"),
        epochs: Optional[int] = None, evals: Sequence[int] = DEFAULT_EVALS, jobs: int = 1,
        threads: Optional[int] = None, retrain: bool = False, data_root: Optional[Path] = None,
        distill_epochs: int = 10, memory_depths: Sequence[int] = (8, 16), train_overrides: Sequence[str] = (),
        distill_args: Sequence[str] = (), progress: Callable[[str], None] = print) -> Dict:
    import torch

    t_start = time.perf_counter()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in set(methods)]  # canonical order
    if "cdeq" in methods and "plain" not in methods:
        methods.insert(0, "plain")  # the teacher (and the reference of every target)
        progress("[budget] cdeq is distilled from plain: plain added")
    evals = sorted({int(k) for k in evals})
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    info = train_methods(methods, runs_dir, epochs=epochs, data_root=data_root, distill_epochs=distill_epochs,
                         evals=evals, jobs=jobs, threads=threads, retrain=retrain, train_overrides=train_overrides,
                         distill_args=distill_args, progress=progress)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: Dict[str, Dict] = {}
    notes: List[str] = []
    try:
        for name in methods:
            m = METHODS[name]
            row = dict(label=m.label, recipe=m.recipe or "distill(plain)", **info[name])
            rows[name] = row
            if row.get("error"):
                notes.append(f"{name}: training failed ({row['error']})")
                continue
            ckpt = Path(row["run_dir"]) / ("distilled.pth" if m.recipe is None else "checkpoints/last.pth")
            progress(f"[budget] {name}: evaluating {ckpt}")
            row.update(evaluate_method(ckpt, evals))
            if row.get("note"):
                notes.append(f"{name}: {row['note']}")
            for b in row["budgets"]:
                if not b["exact"]:
                    notes.append(f"{name}: asked for {b['evals']} f-evaluations, the {b['solver']} solver made "
                                 f"{b['nfe']} (it cannot stop at exactly {b['evals']})")
            top = " ".join(f"{b['evals']}:{b['top1']:.1f}" for b in row["budgets"])
            progress(f"[budget] {name}: top-1 at f-evals {top}; converged {row['converged']['top1']:.1f} "
                     f"({row['converged']['deq_nstep_mean']:.1f} steps)")
    finally:
        torch.set_num_threads(previous_threads)

    evaluated = [r for r in rows.values() if "budgets" in r]
    size = evaluated[0]["input_size"][-1] if evaluated else 16
    batch = evaluated[0]["batch_size"] if evaluated else 32
    memory = None
    if memory_depths:
        progress(f"[budget] memory at equal depth: mdeq_tiny, batch {batch} at {size}x{size}, depths "
                 f"{list(memory_depths)}")
        configs = [dict(model="mdeq_tiny", mode=mode, max_iter=int(d)) for d in memory_depths
                   for mode in ("deq", "unroll")]
        memory = _memory_rows(configs, size, batch, threads, progress)
    result = dict(
        settings=dict(methods=methods, evals=evals, epochs=epochs, jobs=jobs, threads=threads, retrain=retrain,
                      data_root=str(data_root) if data_root else None, distill_epochs=distill_epochs,
                      memory_depths=list(memory_depths), train_overrides=list(train_overrides),
                      distill_args=list(distill_args), runs_dir=str(runs_dir),
                      converge=dict(max_iter=CONVERGE_MAX_ITER, tol=CONVERGE_TOL)),
        environment=dict(torch=torch.__version__, cpus=os.cpu_count()),
        methods=rows, memory=memory, notes=notes, wall_s=round(time.perf_counter() - t_start, 1))
    result["targets"] = compute_targets(result)
    return result


# ------------------------------------------------------------------------------------------------- the targets
def _top1_at(row: Dict, k: int) -> Optional[float]:
    for b in row.get("budgets", []):
        if b["evals"] == k:
            return b["top1"]
    return None


def _reach(row: Dict, target: float) -> Optional[int]:
    """The smallest budget at which ``row`` is within REACH_TOLERANCE points of ``target``."""
    for b in row.get("budgets", []):
        if b["top1"] >= target - REACH_TOLERANCE:
            return b["evals"]
    return None


def compute_targets(result: Dict) -> Dict:
    """The issue's three targets as met / not met, with the numbers behind each."""
    rows, out = result["methods"], {}
    plain = rows.get("plain", {})
    ref = plain.get("converged", {}).get("top1")
    # 1. C-DEQ and Skip DEQ with 1-2 f-evaluations within 2 points of plain DEQ at convergence
    if ref is not None:
        per = {}
        for name in ("cdeq", "skip"):
            if "budgets" not in rows.get(name, {}):
                continue
            at = {k: _top1_at(rows[name], k) for k in (1, 2)}
            ok = {k: v is not None and v >= ref - NEAR_POINTS for k, v in at.items()}
            per[name] = dict(top1_at_1=at[1], top1_at_2=at[2], within_at_1=ok[1], within_at_2=ok[2],
                             met=ok[1] or ok[2])
        if per:
            out["cheap_inference"] = dict(plain_converged=ref, points=NEAR_POINTS, methods=per,
                                          met=all(p["met"] for p in per.values()))
    # 2. JR reaches plain DEQ's accuracy with about half the f-evaluations
    if ref is not None and "budgets" in rows.get("jr", {}):
        k_plain = _reach(plain, ref)
        plain_from = "budget"
        if k_plain is None:  # not within the budgets: its steps at convergence
            k_plain, plain_from = plain["converged"]["fevals_mean"], "mean steps at convergence"
        k_jr = _reach(rows["jr"], ref)
        jr_steps, plain_steps = rows["jr"]["converged"]["fevals_mean"], plain["converged"]["fevals_mean"]
        out["jr_half_evals"] = dict(plain_converged=ref, tolerance=REACH_TOLERANCE, plain_evals=k_plain,
                                    plain_evals_from=plain_from, jr_evals=k_jr,
                                    jr_converged=rows["jr"]["converged"]["top1"],
                                    jr_converged_steps=jr_steps, plain_converged_steps=plain_steps,
                                    converged_steps_ratio=round(jr_steps / plain_steps, 2) if plain_steps else None,
                                    met=k_jr is not None and k_jr <= k_plain / 2)
    # 3. DEQ training memory below the residual stack's at equal depth
    if result.get("memory"):
        depths = {}
        mem = {(r["mode"], r["max_iter"]): r for r in result["memory"]["rows"]}
        for (mode, d), r in sorted(mem.items()):
            if mode == "deq" and ("unroll", d) in mem:
                u = mem[("unroll", d)]
                depths[d] = dict(deq_peak_mb=r["peak_mb"], stack_peak_mb=u["peak_mb"], deq_saved_mb=r["saved_mb"],
                                 stack_saved_mb=u["saved_mb"],
                                 met=r["peak_mb"] < u["peak_mb"] and r["saved_mb"] < u["saved_mb"])
        procs = {n: rows[n].get("peak_mb") for n in ("plain", "stack") if rows.get(n, {}).get("peak_mb") is not None}
        if depths:
            out["memory"] = dict(depths=depths, process_peak_mb=procs, met=all(d["met"] for d in depths.values()))
    return out


# --------------------------------------------------------------------------------------------------- reports
def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _yes(flag: bool) -> str:
    return "**met**" if flag else "**not met**"


def to_markdown(result: Dict) -> str:
    s, rows = result["settings"], result["methods"]
    evals = s["evals"]
    first = next((r for r in rows.values() if "budgets" in r), {})
    size = "x".join(str(v) for v in first.get("input_size", [3, 16, 16])[1:])
    data = f"ImageFolder {s['data_root']}" if s["data_root"] else "the bundled digits"
    epochs = s["epochs"] or "the recipes'"
    reused = sum(1 for r in rows.values() if r.get("reused"))
    lines = [f"Budget benchmark: mdeq_tiny on {data} at {size}, {epochs} epochs per method "
             f"(C-DEQ: {s['distill_epochs']} distillation epochs), {first.get('val_images', '?')} val images; "
             f"{s['jobs']} training(s) at once, {s['threads']} thread(s) each, {result['environment']['cpus']} CPUs, "
             f"torch {result['environment']['torch']}; total wall time {result['wall_s'] / 60:.1f} min"
             + (f" ({reused} of {len(rows)} trainings reused from an earlier invocation)" if reused else ""), "",
             "| method | recipe | " + " | ".join(f"top-1 @{k}" for k in evals)
             + " | converged (mean steps) | train s | process s | process peak MB |",
             "|---|---|" + "---:|" * len(evals) + "---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "budgets" not in r:
            lines.append(f"| {r['label']} | {r['recipe']} | " + " | ".join("-" for _ in evals)
                         + f" | failed | - | - | - |")
            continue
        cells = [f"{b['top1']:.1f}" + ("" if b["exact"] else f" ({b['nfe']} f)") for b in r["budgets"]]
        c = r["converged"]
        conv = f"{c['top1']:.1f} ({c['deq_nstep_mean']:.1f})"
        reused = " (reused)" if r.get("reused") else ""
        lines.append(f"| {r['label']} | {r['recipe']}{reused} | " + " | ".join(cells) + f" | {conv} | "
                     f"{_fmt(r.get('train_seconds'), 0)} | {_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_mb'), 0)} |")
    lines += ["", f"top-1 @k: val top-1 (%) with exactly k f-evaluations per forward (`budget_options`: tolerance 0, "
                  "the head sees f's last output; Skip Reg. DEQ spends one on z0 = f(0); the stack is the cell applied "
                  "k times; C-DEQ takes k student steps); \"(n f)\": the solver made n evaluations, not k. "
                  f"Converged: the method's solver with max_iter {s['converge']['max_iter']} and tol "
                  f"{s['converge']['tol']:g} (mean solver steps per image); the stack at its own depth, C-DEQ's "
                  "student at its default steps. Train s: metrics.json `train_seconds` (C-DEQ: the distillation "
                  "only, on top of plain's training); process s / peak MB: wall time and peak RSS (`os.wait4` "
                  "ru_maxrss) of the training process."]
    mem = result.get("memory")
    if mem:
        ms = mem["settings"]
        lines += ["", f"Memory at equal depth: one training step of mdeq_tiny, batch {ms['batch']} at {ms['size']}x"
                      f"{ms['size']} ({ms['device']}, {ms['threads']} threads; `training.run_one`, each in its own "
                      "process): DEQ (Anderson + IFT, depth forward and backward iterations) vs. the stack (unrolled).",
                  "", "| depth | DEQ step peak MB | stack step peak MB | DEQ autograd-saved MB | "
                      "stack autograd-saved MB |",
                  "|---:|---:|---:|---:|---:|"]
        by = {(r["mode"], r["max_iter"]): r for r in mem["rows"]}
        for d in sorted({r["max_iter"] for r in mem["rows"]}):
            dq, un = by.get(("deq", d), {}), by.get(("unroll", d), {})
            lines.append(f"| {d} | {_fmt(dq.get('peak_mb'))} | {_fmt(un.get('peak_mb'))} | "
                         f"{_fmt(dq.get('saved_mb'))} | {_fmt(un.get('saved_mb'))} |")
        lines.append("Step peak MB: growth of the process's peak RSS over its size before the first step.")
    lines += ["", "Targets", ""]
    t = result["targets"]
    c = t.get("cheap_inference")
    if c:
        parts = [f"{rows[n]['label']} {_fmt(p['top1_at_1'])} at 1, {_fmt(p['top1_at_2'])} at 2 "
                 f"({'within' if p['met'] else 'not within'})" for n, p in c["methods"].items()]
        lines.append(f"- C-DEQ and Skip DEQ at 1-2 f-evaluations within {c['points']:g} points of plain DEQ at "
                     f"convergence ({c['plain_converged']:.1f}): {_yes(c['met'])}: " + "; ".join(parts) + ".")
    else:
        lines.append("- C-DEQ / Skip DEQ at 1-2 f-evaluations: not evaluated (needs plain and cdeq or skip).")
    j = t.get("jr_half_evals")
    if j:
        plain_k = (f"{j['plain_evals']}" if j["plain_evals_from"] == "budget"
                   else f"{_fmt(j['plain_evals'])} ({j['plain_evals_from']})")
        jr_k = j["jr_evals"] if j["jr_evals"] is not None else f"none of {evals}"
        lines.append(f"- JR reaches plain DEQ's accuracy ({j['plain_converged']:.1f}, within {j['tolerance']:g} "
                     f"points) with about half the f-evaluations: {_yes(j['met'])} at equal budgets: plain needs "
                     f"{plain_k}, JR {jr_k}. To convergence (tol {s['converge']['tol']:g}): JR "
                     f"{j['jr_converged_steps']:.1f} mean steps ({j['jr_converged']:.1f}%) vs plain "
                     f"{j['plain_converged_steps']:.1f} ({j['converged_steps_ratio']}x).")
    else:
        lines.append("- JR with half the f-evaluations: not evaluated (needs plain and jr).")
    mm = t.get("memory")
    if mm:
        parts = [f"depth {d}: peak {v['deq_peak_mb']:.1f} vs {v['stack_peak_mb']:.1f} MB, autograd-saved "
                 f"{v['deq_saved_mb']:.1f} vs {v['stack_saved_mb']:.1f} MB" for d, v in mm["depths"].items()]
        procs = mm["process_peak_mb"]
        proc = (f"; whole training processes (plain also runs unrolled, at depth 4, for its first 2 epochs): "
                f"plain {procs['plain']:.0f} MB vs stack {procs['stack']:.0f} MB" if len(procs) == 2 else "")
        lines.append(f"- DEQ training memory below the residual stack's at equal depth: {_yes(mm['met'])}: "
                     + "; ".join(parts) + proc + ".")
    else:
        lines.append("- DEQ vs. stack memory at equal depth: not measured.")
    if result.get("notes"):
        lines += ["", "Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> Path:
    """Top-1 vs. f-evaluations (log2 axis), one line per method; convergence as a star at its mean steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, r in enumerate(r for r in result["methods"].values() if "budgets" in r):
        color = f"C{i % 10}"
        xs = [b["nfe"] for b in r["budgets"]]
        ax.plot(xs, [b["top1"] for b in r["budgets"]], "o-", color=color, label=r["label"], ms=4)
        c = r["converged"]
        ax.plot([max(c["fevals_mean"], 0.5)], [c["top1"]], "*", color=color, ms=11, mec="k", mew=0.5)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(result["settings"]["evals"]) | {CONVERGE_MAX_ITER})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("f-evaluations per forward (star: at convergence, mean steps)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("accuracy vs. f-evaluations (mdeq_tiny, same data and training budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save(result: Dict, out_dir: Path, name: str = "budget") -> Dict[str, Path]:
    from .report import save_report

    paths = save_report(result, out_dir, name, to_markdown)
    paths["png"] = plot(result, out_dir / f"{name}.png")
    return paths
