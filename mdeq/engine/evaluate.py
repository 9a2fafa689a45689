"""Classification evaluation: top-1/top-5, loss, and the solver's convergence, all-reduced over ranks."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import DistEnv, all_reduce_sum

__all__ = ["EvalResult", "evaluate_classifier", "sweep_solver_budgets", "autocast_context", "budget_options"]


@dataclass
class EvalResult:
    """Accuracies in percent; ``deq_*`` are per-image means of the solver's steps and relative residual."""

    top1: float
    top5: float
    loss: float
    count: int
    deq_nstep_mean: float
    deq_rel_residual_mean: float
    deq_abs_residual_mean: float

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, env: DistEnv, amp_dtype: Optional[torch.dtype] = None,
                        channels_last: bool = False, progress: bool = True, desc: str = "eval",
                        stats_model: Optional[nn.Module] = None) -> EvalResult:
    """Run ``model`` over ``loader`` (this rank's shard) and all-reduce the sums, so every rank gets the totals.

    ``stats_model`` is the module exposing ``deq_stats`` (the unwrapped model when ``model`` is DDP-wrapped).
    """
    was_training = model.training
    model.eval()
    stats_model = stats_model or model
    # correct@1, correct@5, loss, count, steps, rel. residual, abs. residual: summed on the device, read once
    sums = torch.zeros(7, dtype=torch.float64, device=env.device)
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
        stats = getattr(stats_model, "deq_stats", None)
        if stats is not None:
            batch += [stats.nstep.sum(), stats.rel_residual.sum(), stats.abs_residual.sum()]
        sums[:len(batch)] += torch.stack([b.double().to(env.device) for b in batch])
    c1, c5, loss, count, nstep, rel, absr = all_reduce_sum(sums.tolist(), env)
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return EvalResult(top1=100.0 * c1 / count, top5=100.0 * c5 / count, loss=loss / count, count=int(count),
                      deq_nstep_mean=nstep / count, deq_rel_residual_mean=rel / count,
                      deq_abs_residual_mean=absr / count)


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


def budget_options(options: Dict[str, Any], evals: int) -> Dict[str, Any]:
    """``configure_deq`` settings under which an inference forward makes exactly ``evals`` f-evaluations and
    the head sees the last one's output (the comparison axis of the accuracy-vs-compute benchmark).

    A solver with ``final_step`` returns f of its best iterate, computed when its residual was checked, so k
    evaluations end in f's output at no extra cost (tolerance 0: all k run). Skip Reg. DEQ spends one of them
    on z0 = f(0); the consistency solver spends one per student step; ``unroll`` (the explicit residual
    stack) applies f exactly k times.
    """
    if evals < 1:
        raise ValueError(f"the budget must be at least one f-evaluation, got {evals}")
    solver, init = options["solver"], options.get("init", "zeros")
    if solver == "consistency":
        return dict(solver=solver, max_iter=evals, solver_options=dict(measure_residual=False), final_step=False)
    if solver == "unroll":
        return dict(solver=solver, max_iter=evals, final_step=False)
    left = evals - (1 if init == "skip_reg" else 0)  # what the solve may use
    if left == 0:  # Skip Reg. DEQ with one evaluation: its start f(0) is the answer
        return dict(solver="unroll", max_iter=1, init="zeros", final_step=False)
    return dict(solver=solver, max_iter=left, tol=0.0, final_step=True,
                solver_options=dict(options.get("solver_options") or {}))
