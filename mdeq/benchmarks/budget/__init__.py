"""Budget benchmark: the DEQ training methods on the same data with the same budget, compared at equal
f-evaluations (``tools/benchmark.py budget``).

Methods (each a Hydra recipe of ``train_cls`` on the bundled digits at 16x16, mdeq_tiny, the same
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
the checkpoint's model in its evaluation settings (``engine.rebuild.model_from_checkpoint``), then for each budget k
``configure_deq(**{**base, **budget_options(base, k)})`` (``mdeq.core.budget_options``: one
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
kept at the recipes' 2 epochs (``schedule.pretrain_steps`` from that train set's size). ``train_overrides`` are
appended to every training command (``METHOD:key=value`` to one method's only), after the benchmark's own.

Rooms: ``methods`` (what each method trains, and the command), ``runs`` (the training subprocesses and their
reuse), ``evaluation`` (top-1 at each budget and at convergence), ``report`` (targets, Markdown, plot).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .evaluation import CONVERGE_MAX_ITER, CONVERGE_TOL, DEFAULT_EVALS, evaluate_method
from .methods import METHODS, Method
from .report import compute_targets, plot, save, to_markdown
from .runs import memory_rows, train_methods

__all__ = ["METHODS", "Method", "DEFAULT_EVALS", "run", "train_methods", "evaluate_method", "compute_targets",
           "to_markdown", "plot", "save"]


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
        memory = memory_rows(configs, size, batch, threads, progress)
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
