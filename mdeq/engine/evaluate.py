"""Classification evaluation: top-1/top-5, loss, and the solver's convergence, all-reduced over ranks; the
accuracy at several solver budgets (``sweep_solver_budgets``) and its table and plot (``write_sweep``)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core import budget_options  # noqa: F401  (its home is the core; kept importable from here)
from .amp import autocast_context
from .distributed import DistEnv, all_reduce_sum
from .equilibria import Equilibria
from .solver_health import warn_diverged

__all__ = ["EvalResult", "evaluate_classifier", "sweep_solver_budgets", "write_sweep"]


@dataclass
class EvalResult:
    """Accuracies in percent; ``deq_*`` are per-image means of the solver's steps and relative residual, and
    ``deq_diverged`` the number of images whose solve diverged (a non-finite image counts here); all None for a
    model without an MDEQ (nothing is solved)."""

    top1: float
    top5: float
    loss: float
    count: int
    deq_nstep_mean: Optional[float]
    deq_rel_residual_mean: Optional[float]
    deq_abs_residual_mean: Optional[float]
    deq_diverged: Optional[int] = 0

    @property
    def solved(self) -> bool:
        """Whether the model solved for an equilibrium (holds an MDEQ)."""
        return self.deq_nstep_mean is not None

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, env: DistEnv, amp_dtype: Optional[torch.dtype] = None,
                        channels_last: bool = False, progress: bool = True, desc: str = "eval",
                        stats_model: Optional[nn.Module] = None) -> EvalResult:
    """Run ``model`` over ``loader`` (this rank's shard) and all-reduce the sums, so every rank gets the totals.

    ``stats_model`` is the module holding the MDEQs whose solver statistics are averaged (the unwrapped model when
    ``model`` is DDP-wrapped); a model holding none gives ``deq_*`` None.
    """
    was_training = model.training
    model.eval()
    equilibria = Equilibria(stats_model or model)
    # correct@1, correct@5, loss, count, steps, rel. residual, abs. residual, diverged: summed on the device
    sums = torch.zeros(8, dtype=torch.float64, device=env.device)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (progress and env.is_main))
    for images, targets in bar:
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        batch = [hit[:, 0].sum(), hit.any(dim=1).sum(), F.cross_entropy(logits, targets, reduction="sum"),
                 torch.tensor(targets.numel(), device=env.device)]
        stats = equilibria.stats()
        if stats is not None:
            batch += [stats.nstep.sum(), stats.rel_residual.sum(), stats.abs_residual.sum(), stats.diverged.sum()]
        sums[:len(batch)] += torch.stack([b.double().to(env.device) for b in batch])
    c1, c5, loss, count, nstep, rel, absr, diverged = all_reduce_sum(sums.tolist(), env)
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    if not equilibria:
        return EvalResult(top1=100.0 * c1 / count, top5=100.0 * c5 / count, loss=loss / count, count=int(count),
                          deq_nstep_mean=None, deq_rel_residual_mean=None, deq_abs_residual_mean=None,
                          deq_diverged=None)
    if env.is_main:
        warn_diverged(int(diverged), int(count), "evaluation")
    return EvalResult(top1=100.0 * c1 / count, top5=100.0 * c5 / count, loss=loss / count, count=int(count),
                      deq_nstep_mean=nstep / count, deq_rel_residual_mean=rel / count,
                      deq_abs_residual_mean=absr / count, deq_diverged=int(diverged))


def sweep_solver_budgets(model: nn.Module, loader: Iterable, env: DistEnv, budgets: Sequence[int],
                         configure, **kwargs: Any) -> List[Dict[str, float]]:
    """Accuracy at each forward-solver budget: ``configure(max_iter)`` sets the model up before each pass."""
    rows = []
    for k in budgets:
        if int(k) < 1:
            raise ValueError(f"solver budgets must be >= 1, got {k}")
        configure(int(k))
        res = evaluate_classifier(model, loader, env, desc=f"max_iter={k}", **kwargs)
        rows.append(dict(max_iter=int(k), **res.as_dict()))
    return rows


def write_sweep(rows: List[Dict[str, float]], out: Path, title: str) -> None:
    """``sweep.csv``, ``sweep.json`` and the accuracy-vs-budget plot ``sweep.png`` in ``out``."""
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    iters = [r["max_iter"] for r in rows]
    ax.plot(iters, [r["top1"] for r in rows], "o-", label="top-1")
    ax.plot(iters, [r["top5"] for r in rows], "s--", label="top-5")
    ax.set_xlabel("forward solver budget (max_iter)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs. solver iterations: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png")
    plt.close(fig)
