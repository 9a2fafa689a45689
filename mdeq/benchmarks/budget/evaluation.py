"""Evaluating one method of the budget benchmark: top-1 and latency with exactly k f-evaluations per forward
(the solver's declared fixed budget, ``mdeq.core.budget_options``), at convergence, and at the preset's official
solver setting (the original's Broyden with its thresholds and tolerance).

Latency: milliseconds per image of an eval forward at batch 1 (the first val image) and at batch 64 (the
first 64), median of ``LATENCY_REPEATS`` after two warm-up forwards, in this process's threads."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ...core import budget_options, solver_spec
from ...data.classification import build_transform, resolve_data_cfg
from ...data.factory import build_classification_split
from ...data.loaders import build_eval_loader
from ...engine.distributed import DistEnv
from ...engine.evaluate import evaluate_classifier
from ...engine.rebuild import model_from_checkpoint
from ...models.config import CLS_PRESETS, official_solver_of

__all__ = ["DEFAULT_EVALS", "CONVERGE_MAX_ITER", "CONVERGE_TOL", "LATENCY_BATCHES",
           "evaluate_method", "latency_ms"]

DEFAULT_EVALS = (1, 2, 4, 8, 16)
CONVERGE_MAX_ITER, CONVERGE_TOL = 50, 1e-4
LATENCY_BATCHES, LATENCY_REPEATS = (1, 64), 5


@torch.no_grad()
def latency_ms(model, images: torch.Tensor, repeats: int = LATENCY_REPEATS) -> float:
    """Milliseconds per image of an eval forward of ``images`` (median of ``repeats`` after two warm-ups)."""
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        model(images)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3 / images.shape[0], 3)


def _latency_images(loader, device) -> Dict[int, torch.Tensor]:
    """The first val images for each latency batch (repeated when the split is smaller than the batch)."""
    need, parts = max(LATENCY_BATCHES), []
    for batch in loader:
        parts.append(batch[0])
        if sum(p.shape[0] for p in parts) >= need:
            break
    images = torch.cat(parts)
    images = images.repeat(-(-need // images.shape[0]), 1, 1, 1)
    return {b: images[:b].to(device) for b in LATENCY_BATCHES}


def _val_loader(loaded, batch_size: Optional[int] = None):
    """The run's val split with its eval transforms (as tools/eval_cls.py builds it for a training checkpoint)."""
    data = loaded.config["data"]
    data_cfg = resolve_data_cfg(loaded.model, loaded.data_cfg)
    dataset = build_classification_split(data, data.get("val_split", "val"), transform=build_transform(data_cfg, False),
                                         classes=loaded.classes)
    batch = batch_size or data.get("eval_batch_size") or _train_batch(loaded)
    return build_eval_loader(dataset, int(batch), workers=0), data_cfg


def evaluate_method(checkpoint: Path, evals: Sequence[int] = DEFAULT_EVALS, env=None) -> Dict:
    """Top-1 of one checkpoint at each f-evaluation budget and at convergence."""
    env = env or DistEnv()
    loaded = model_from_checkpoint(checkpoint)  # in the run's evaluation settings
    model = loaded.model.to(env.device).eval()
    base = dict(model.deq.options)
    loader, data_cfg = _val_loader(loaded)
    timing = _latency_images(loader, env.device)

    def latency() -> Dict[str, float]:
        return {f"ms_per_image_b{b}": latency_ms(model, x) for b, x in timing.items()}

    rows = []
    for k in evals:
        model.configure_deq(**{**base, **budget_options(base, int(k))})
        res = evaluate_classifier(model, loader, env, progress=False)
        nfe = int(model.deq_stats.nfe)
        rows.append(dict(evals=int(k), nfe=nfe, exact=nfe == int(k), top1=round(res.top1, 2), top5=round(res.top5, 2),
                         solver=model.deq.options["solver"], **latency()))
    official = None
    if solver_spec(base["solver"]).stops_at_tol:  # the original's Broyden from this method's start
        model.configure_deq(**{**base, **official_solver_of(CLS_PRESETS[loaded.arch]), "final_step": False})
        res = evaluate_classifier(model, loader, env, progress=False)
        official = dict(top1=round(res.top1, 2), deq_nstep_mean=round(res.deq_nstep_mean, 2),
                        max_iter=int(model.deq.options["max_iter"]), solver="broyden", **latency())
    spec = solver_spec(base["solver"])
    if not spec.stops_at_tol:  # the stack at its own depth; C-DEQ's student at its own steps
        conv_options = dict(base)
    else:
        conv_options = {**base, "max_iter": CONVERGE_MAX_ITER, "tol": CONVERGE_TOL, "final_step": True}
    model.configure_deq(**conv_options)
    res = evaluate_classifier(model, loader, env, progress=False)
    extra = 1 if conv_options.get("init") == "skip_reg" and not spec.differentiable else 0  # z0 = f(0)
    converged = dict(top1=round(res.top1, 2), top5=round(res.top5, 2), deq_nstep_mean=round(res.deq_nstep_mean, 2),
                     fevals_mean=round(res.deq_nstep_mean + extra, 2), rel_residual_mean=res.deq_rel_residual_mean,
                     nfe_last_batch=int(model.deq_stats.nfe), solver=conv_options["solver"],
                     max_iter=int(conv_options["max_iter"]), tol=conv_options["tol"])
    return dict(budgets=rows, converged=converged, official=official, val_images=res.count, base_solver=base["solver"],
                input_size=list(data_cfg["input_size"]), batch_size=_train_batch(loaded),
                data=loaded.config["data"].get("name"))


def _train_batch(loaded) -> int:
    """The batch size per process a run trained with: its checkpoint's data setup (``data.batch_size=auto`` resolved
    there), else ``data.batch_size``."""
    return int((loaded.data_setup or {}).get("batch_size") or loaded.config["data"]["batch_size"])
