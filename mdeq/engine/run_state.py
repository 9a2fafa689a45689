"""Where a training run stands, what its checkpoint holds, and how a resumed run comes back to it.

A checkpoint holds the model (and EMA) weights, optimizer, scheduler and scaler states, ``Progress`` (the step
counters, including the position inside an epoch), the RNG states, the run's identity (what the model is:
architecture, classes, architecture kwargs, task) and config, and the data setup that fixes the order of
batches. With the per-sample seeded augmentation and the (seed, epoch)-shuffled sampler, a single-process run
killed at any point and resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU). Under DDP
only rank 0's RNG state is saved, so the other ranks reseed from (seed, rank, step): reproducible, not
bitwise-identical.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, capture_rng_state, plain_data, restore_rng_state
from .legacy import CHECKPOINT_VERSION

__all__ = ["Progress", "RunParts", "run_state_dict", "restore_run_state", "check_resumable", "seed_everything"]

_log = logging.getLogger("mdeq.train")


@dataclass
class Progress:
    """Counters that say where the run is; saved in every checkpoint."""

    epoch: int = 0            # current epoch (0-based)
    step: int = 0             # optimizer steps done in the whole run
    batch_in_epoch: int = 0   # batches of the current epoch already trained on
    best_score: float = -1.0  # the best validation score so far (the task's ``score_name``)
    best_epoch: int = -1
    train_seconds: float = 0.0
    samples_seen: int = 0
    epoch_loss_sum: float = 0.0   # this epoch's summed step losses (for the epoch row's train_loss)
    epoch_steps: int = 0


@dataclass
class RunParts:
    """The stateful parts of a run that a checkpoint saves and a resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[Any] = None      # timm ModelEmaV3
    scaler: Optional[Any] = None   # torch.amp.GradScaler


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def run_state_dict(parts: RunParts, progress: Progress, identity: Mapping[str, Any], config: Mapping[str, Any],
                   data_setup: Mapping[str, int], phase: str, extra: Mapping[str, Any]) -> Dict[str, Any]:
    """The checkpoint of a run (a plain dict that ``torch.load(weights_only=True)`` reads back)."""
    return dict(
        version=CHECKPOINT_VERSION,
        identity=plain_data(identity),
        data_setup=dict(data_setup),
        config=plain_data(config),
        model=parts.model.state_dict(),
        model_ema=parts.ema.module.state_dict() if parts.ema is not None else None,
        optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
        progress=dict(vars(progress)),
        phase=phase,
        rng=capture_rng_state(),
        **plain_data(extra),
    )


def restore_run_state(parts: RunParts, ckpt: Mapping[str, Any], seed: int, rank: int, world_size: int) -> Progress:
    """Load a checkpoint into ``parts``; returns its ``Progress`` (RNG states restored, or reseeded under DDP)."""
    parts.model.load_state_dict(ckpt["model"])
    if parts.ema is not None:
        if ckpt.get("model_ema") is None:
            raise CheckpointError("the checkpoint has no EMA weights but this run has train.ema.enabled=true")
        parts.ema.module.load_state_dict(ckpt["model_ema"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.scaler is not None and ckpt.get("scaler") is not None:
        parts.scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(**ckpt["progress"])
    if world_size == 1:
        restore_rng_state(ckpt["rng"])
    else:  # each rank reseeds from (seed, rank, step): reproducible, not tied to rank 0's state
        seed_everything(seed + 1000003 * rank + progress.step)
        if rank != 0:  # the epoch's running loss in the checkpoint is rank 0's
            progress.epoch_loss_sum, progress.epoch_steps = 0.0, 0
    return progress


def check_resumable(ckpt: Mapping[str, Any], path: str, identity: Mapping[str, Any], task: str, model: nn.Module,
                    data_setup: Mapping[str, int]) -> None:
    """Refuse to resume from a checkpoint of another task, architecture, class count or model kwargs, or in the
    middle of an epoch with another data setup (the rest of the epoch would be other batches)."""
    got = ckpt.get("identity") or {}
    got_task = got.get("task", "classification")
    if got_task != task:
        raise CheckpointError(f"cannot resume from {path}: it is a {got_task} checkpoint and this is a {task} "
                              f"run; resume it with the {got_task} tool or start a new run")
    if got.get("arch") != identity["arch"] or got.get("num_classes") != identity["num_classes"]:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a {got.get('arch')} run with "
            f"{got.get('num_classes')} classes, this run builds {identity['arch']} with {identity['num_classes']} "
            f"classes; pass model.name={got.get('arch')} (and the same data), or start a new run")
    own = model.state_dict()
    theirs = ckpt["model"]
    wrong = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    if wrong or len(theirs) != len(own):
        raise CheckpointError(
            f"cannot resume from {path}: its {got.get('arch')} weights do not fit this model "
            f"(model.kwargs differ? first mismatching keys: {wrong[:5]})")
    theirs_setup = ckpt.get("data_setup") or {}
    changed = {k: (theirs_setup.get(k), v) for k, v in data_setup.items() if theirs_setup.get(k) != v}
    if changed:
        text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if ckpt["progress"]["batch_in_epoch"]:
            raise CheckpointError(
                f"cannot resume from {path} in the middle of an epoch with a different data setup ({text}): "
                f"the rest of the epoch would not be the batches the run had not seen; use the same "
                f"data.batch_size, number of processes and train.grad_accum_steps")
        _log.warning("resuming with a different data setup (%s): the schedule's steps per epoch change", text)
