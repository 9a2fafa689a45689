"""Model benchmark: eval-mode forward time, f-evaluations and residual of mdeq_* models per solver (CPU/GPU).

For each model and solver the forward runs under ``torch.no_grad()`` in eval mode with ``stop_mode='rel'`` and
``tol`` (1e-3 by default) and ``max_iter`` evaluations at most; ``unroll`` applies the cell ``num_layers`` times
(the official pre-training depth). Reported: median forward time over ``repeats`` (after one warm-up),
f-evaluations of the batch, mean per-sample steps, mean relative residual and the fraction of samples that
reached ``tol``. A freshly initialised MDEQ cell is not contractive (its residual stalls around 0.1-0.5), so
without ``--checkpoint`` the steps show the solvers' budgets, not convergence of a trained model.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mdeq.core import solver_spec

__all__ = ["run", "to_markdown", "save"]

DEFAULT_MODELS = (("mdeq_tiny", 32), ("mdeq_small", 224))
SOLVERS = ("fixed_point", "anderson", "broyden", "unroll")


def _load(name: str, checkpoint: Optional[Path]):
    import timm

    import mdeq  # noqa: F401  (registers the models)
    from mdeq.models.convert import load_converted

    model = timm.create_model(name)
    if checkpoint is not None:
        from mdeq.engine.weights import read_state_dict

        load_converted(model, read_state_dict(checkpoint))
    return model.eval()


def run(models: Sequence = DEFAULT_MODELS, batch: int = 8, repeats: int = 3, tol: float = 1e-3,
        max_iter: int = 30, checkpoint: Optional[Path] = None, threads: Optional[int] = None,
        progress: Callable[[str], None] = print) -> Dict:
    from .solvers import keep_heap

    heap_kept = keep_heap()
    if threads:
        torch.set_num_threads(threads)
    rows: List[Dict] = []
    for name, size in models:
        model = _load(name, checkpoint if len(models) == 1 else None)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        progress(f"[{name}] batch {batch} x 3 x {size} x {size}")
        for solver in SOLVERS:
            if solver_spec(solver).differentiable:  # the unrolled mode: the official pre-training depth
                model.configure_deq(solver="unroll", max_iter=model.cfg.num_layers, tol=tol, stop_mode="rel")
            else:
                model.configure_deq(solver=solver, max_iter=max_iter, tol=tol, stop_mode="rel")
            times = []
            with torch.no_grad():
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t0)
            s = model.deq_stats
            row = dict(model=name, input=size, batch=batch, solver=solver,
                       forward_ms=round(statistics.median(times[1:]) * 1e3, 1), nfe=s.nfe,
                       mean_nstep=round(s.nstep.float().mean().item(), 2),
                       rel_residual=round(s.rel_residual.float().mean().item(), 4),
                       converged=s.converged.float().mean().item())
            rows.append(row)
            progress(f"  {solver:12s} {row['forward_ms']:9.1f} ms  nfe={row['nfe']:3d}  "
                     f"rel_res={row['rel_residual']:.4f}  converged={row['converged']:.2f}")
    return dict(rows=rows, settings=dict(tol=tol, max_iter=max_iter, repeats=repeats, batch=batch,
                                         checkpoint=str(checkpoint) if checkpoint else None, heap_kept=heap_kept,
                                         threads=torch.get_num_threads()),
                environment=dict(torch=torch.__version__))


def to_markdown(result: Dict) -> str:
    s = result["settings"]
    lines = [f"Model benchmark (eval forward, batch {s['batch']}, rel tol {s['tol']}, max_iter {s['max_iter']}, "
             f"median of {s['repeats']}, {s['threads']} threads, torch {result['environment']['torch']}, "
             f"weights: {s['checkpoint'] or 'random init'})", "",
             "| model | input | solver | forward ms | nfe | mean steps | rel. residual | converged |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['input']} | {r['solver']} | {r['forward_ms']:.1f} | {r['nfe']} | "
                     f"{r['mean_nstep']} | {r['rel_residual']:.4f} | {r['converged']:.2f} |")
    return "\n".join(lines) + "\n"


def save(result: Dict, out_dir: Path) -> Dict[str, Path]:
    from .report import save_report

    return save_report(result, out_dir, "models", to_markdown)
