"""The training loop shared by every task: ``Trainer`` holds what does not depend on the task.

A task (``ClassificationTrainer`` in ``trainer.py``, ``SegmentationTrainer`` in ``seg_trainer.py``) supplies its
datasets, model, loss, evaluation and what it reports through a few methods; the loop here does the rest:
the MDEQ recipe (``DEQSchedule``: unrolled pre-training, then DEQ mode with the Jacobian penalty), timm
optimizers and schedulers, AMP (bf16, or fp16 with a GradScaler), channels_last, gradient accumulation,
clipping, EMA, SyncBN / DDP under torchrun, optional precise BN, logging (TensorBoard, CSV, tqdm) and
atomic checkpoints.

Resuming (``train.resume=<checkpoint>``) restores model, optimizer, scheduler, scaler, EMA, the step
counters (including the position inside an epoch), the RNG states and the phase; with the per-sample
seeded augmentation and the (seed, epoch)-shuffled sampler, a single-process run killed at any point and
resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU). Under DDP only rank 0's
RNG state is saved, so the other ranks reseed from (seed, rank, step): reproducible, not bitwise-identical.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data.classification import build_eval_loader, build_train_loader, steps_per_epoch
from ..core.regularizers import fixed_point_correction
from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from .deq_schedule import PRETRAIN, DEQSchedule, JacobianSchedule
from .distributed import DistEnv, all_reduce_sum
from .evaluate import autocast_context
from .run_logger import RunLogger, write_json_atomic

__all__ = ["Trainer", "Progress", "build_schedule", "model_deq_options", "AMP_DTYPES", "CHECKPOINT_VERSION"]

_log = logging.getLogger("mdeq.train")

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CHECKPOINT_VERSION = 1


CHEAP_OPTIONS = ("init", "init_weight", "init_detach", "correction_states", "correction_gamma", "correction_steps")


def model_deq_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``deq`` config's initial-guess and fixed-point-correction settings (Skip / Skip Reg. DEQ, DEQ-Flow's
    correction): the model needs ``init`` when it is built (the Skip DEQ predictor is a module)."""
    d = dict(cfg.get("deq") or {})
    return {k: (float(d[k]) if k in ("init_weight", "correction_gamma") else d[k]) for k in CHEAP_OPTIONS if k in d}


def build_schedule(cfg: Mapping[str, Any], model: nn.Module) -> DEQSchedule:
    d = dict(cfg["deq"])
    jac = JacobianSchedule(**dict(cfg.get("jac") or {}))
    options = dict(solver=d["solver"], max_iter=int(d["f_thres"]), tol=float(d["tol"]), stop_mode=d["stop_mode"],
                   backward=d["backward"])
    if d["backward"] == "ift":
        options.update(b_solver=d["b_solver"], b_max_iter=int(d["b_thres"]),
                       b_tol=float(d["b_tol"]) if d.get("b_tol") is not None else None)
    if d["backward"] == "phantom":
        options.update(phantom_steps=int(d["phantom_steps"]), phantom_damping=float(d["phantom_damping"]))
    if d.get("solver_options"):
        options["solver_options"] = dict(d["solver_options"])
    if d.get("b_solver_options") and d["backward"] == "ift":
        options["b_solver_options"] = dict(d["b_solver_options"])
    options.update(model_deq_options(cfg))
    unroll = d.get("unroll_steps") or getattr(getattr(model, "cfg", None), "num_layers", None) or 1
    schedule = DEQSchedule(pretrain_steps=int(d.get("pretrain_steps") or 0), unroll_steps=int(unroll),
                           deq=options, eval_f_thres=d.get("eval_f_thres"),
                           rand_f_thres_delta=int(d.get("rand_f_thres_delta") or 0), jac=jac,
                           seed=int(cfg["train"]["seed"]))
    model.configure_deq(**options)  # validates the options now rather than at the first DEQ step
    return schedule


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

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Progress":
        state = dict(state)
        if "best_top1" in state:  # checkpoints written before the segmentation tasks existed
            state["best_score"] = state.pop("best_top1")
        return cls(**state)


class Trainer(ABC):
    """The task-independent training loop, built from a resolved config dict; see the module docstring.

    A task subclass sets ``task`` and ``score_name`` (the validation number ``best.pth`` follows) and
    implements the methods marked "task" below.
    """

    task = "task"
    score_name = "score"

    def __init__(self, cfg: Mapping[str, Any], env: DistEnv, output_dir: os.PathLike):
        self.cfg = cfg
        self.env = env
        self.tcfg = dict(cfg["train"])
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        seed = int(self.tcfg["seed"])
        self.amp_dtype = self._amp_dtype()
        self.channels_last = bool(self.tcfg.get("channels_last", False))
        self.progress_bars = bool(self.tcfg.get("progress", True))

        # data
        self.train_set, self.val_set = self.build_datasets()
        self.num_classes = len(self.train_set.classes)

        # model (+ the transforms, which may depend on it)
        torch.manual_seed(seed)  # the same init on every rank (DDP broadcasts rank 0's anyway)
        self.model = self.build_model()
        _seed_everything(seed + env.rank)  # training randomness (dropout masks, probes, mixup) differs per rank
        self.setup_transforms()
        self.sync_bn = bool(self.tcfg.get("sync_bn")) and env.distributed
        if self.sync_bn and env.device.type == "cpu":  # torch's SyncBatchNorm runs on accelerators only
            _log.warning("train.sync_bn: SyncBatchNorm needs GPUs; on CPU each process keeps its own BatchNorm "
                         "statistics (averaged over the processes before every validation)")
            self.sync_bn = False
        if self.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(env.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.schedule = build_schedule(cfg, self.model)

        batch = int(cfg["data"]["batch_size"])
        self.workers = int(cfg["data"].get("workers", 2))
        pin = env.device.type == "cuda"
        self.train_loader = build_train_loader(self.train_set, batch, seed, env.world_size, env.rank, self.workers,
                                               pin)
        self.val_loader = build_eval_loader(self.val_set, int(cfg["data"].get("eval_batch_size") or batch),
                                            env.world_size, env.rank, self.workers, pin, collate_fn=self.eval_collate)
        self.accum = int(self.tcfg.get("grad_accum_steps", 1))
        if self.accum < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.accum}")
        self.batches_per_epoch = steps_per_epoch(self.train_loader)
        self.updates_per_epoch = self.batches_per_epoch // self.accum
        if self.updates_per_epoch < 1:
            raise ValueError("an epoch has fewer batches than train.grad_accum_steps")
        self.epochs = int(self.tcfg["epochs"])
        self.max_steps = self.tcfg.get("max_steps")

        # optimisation
        self.optimizer = create_optimizer_v2(self.model, **dict(cfg["optim"]))
        self.scheduler, _ = create_scheduler_v2(self.optimizer, num_epochs=self.epochs,
                                                updates_per_epoch=self.updates_per_epoch, **dict(cfg["sched"]))
        self.scaler = torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16 else None
        ema = dict(self.tcfg.get("ema") or {})
        self.ema = None
        if ema.get("enabled"):
            self.ema = ModelEmaV3(self.model, decay=float(ema.get("decay", 0.9998)),
                                  use_warmup=bool(ema.get("warmup", False)))
        self.setup_loss()
        self.ddp_model: nn.Module = self.model
        if env.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

        self.progress = Progress()
        self._bn_loader = None
        self.logger: Optional[RunLogger] = None
        resume = self.tcfg.get("resume")
        self._resume_ckpt = load_checkpoint(resume) if resume else None
        if self._resume_ckpt is not None:
            self._check_compatible(self._resume_ckpt, resume)

    # ------------------------------------------------------------------ what a task provides
    @abstractmethod
    def build_datasets(self) -> Tuple[Dataset, Dataset]:
        """task: (train set, val set); both have ``classes`` and a settable ``transform``."""

    eval_collate = None  # a task's collate function for evaluation batches (None: default_collate)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """task: the model, on the CPU, with any starting weights loaded."""

    @abstractmethod
    def setup_transforms(self) -> None:
        """task: set the datasets' transforms (called once the model exists)."""

    @abstractmethod
    def setup_loss(self) -> None:
        """task: build what ``criterion`` and ``prepare_batch`` use."""

    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A training batch on the device, before the forward (e.g. mixup)."""
        return images, targets

    @abstractmethod
    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """task: the training loss of a batch (called under autocast)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, desc: str) -> Any:
        """task: evaluate ``model`` on the val loader (all ranks take part; every rank gets the totals)."""

    @abstractmethod
    def score(self, result: Any) -> float:
        """task: the number ``best.pth`` follows (higher is better)."""

    @abstractmethod
    def eval_scalars(self, result: Any) -> Dict[str, float]:
        """task: TensorBoard scalars of an evaluation (logged under val/ and val_ema/)."""

    def log_eval_details(self, model: nn.Module, result: Any, prefix: str, step: int) -> None:
        """More than scalars for TensorBoard (per-class numbers, images); nothing by default."""

    @abstractmethod
    def val_row(self, result: Optional[Any], prefix: str = "val_") -> Dict[str, Any]:
        """task: the CSV columns of an evaluation; blank values when ``result`` is None (same columns)."""

    @abstractmethod
    def final_metrics(self, result: Any) -> Dict[str, Any]:
        """task: the task's numbers in ``metrics.json``."""

    def hparam_metrics(self, metrics: Mapping[str, Any]) -> Dict[str, float]:
        """The metrics shown next to the config in TensorBoard's HPARAMS tab."""
        return {self.score_name: metrics[self.score_name]}

    @abstractmethod
    def report_lines(self, metrics: Mapping[str, Any]) -> List[str]:
        """task: the lines printed at the end of a run, between the header and the file paths."""

    def identity(self) -> Dict[str, Any]:
        """What a resumed run must share with this one (architecture, classes, ...); ``model_kwargs`` rebuild
        the same modules (a Skip DEQ predictor needs ``deq.init``)."""
        kwargs = dict(self.cfg["model"].get("kwargs") or {})
        init = model_deq_options(self.cfg).get("init", "zeros")
        if init != "zeros":
            kwargs["deq"] = {**dict(kwargs.get("deq") or {}), "init": init}
        return dict(arch=self.cfg["model"]["name"], num_classes=self.num_classes, model_kwargs=kwargs, task=self.task)

    def extra_state(self) -> Dict[str, Any]:
        """Extra checkpoint entries that tools read back (class names, data config)."""
        return dict(classes=list(self.train_set.classes))

    def restore_extra(self, ckpt: Mapping[str, Any]) -> None:
        """Read back what ``extra_state`` saved, on resume; nothing by default."""

    @abstractmethod
    def bn_dataset(self) -> Dataset:
        """task: the images precise BN recomputes the statistics from (a deterministic view of the train set)."""

    # ------------------------------------------------------------------ setup helpers
    def _amp_dtype(self) -> Optional[torch.dtype]:
        amp = self.tcfg.get("amp")
        if not amp:
            return None
        name = str(self.tcfg.get("amp_dtype", "bfloat16"))
        if name not in AMP_DTYPES:
            raise ValueError(f"train.amp_dtype must be one of {sorted(AMP_DTYPES)}, got {name!r}")
        return AMP_DTYPES[name]

    def _data_setup(self) -> Dict[str, int]:
        """What fixes the order of batches and the schedule's length; a mid-epoch resume needs the same."""
        return dict(batch_size=self.train_loader.batch_size, world_size=self.env.world_size,
                    grad_accum_steps=self.accum, train_images=len(self.train_set))

    def _check_compatible(self, ckpt: Mapping[str, Any], path: str) -> None:
        want, got = self.identity(), ckpt.get("identity") or {}
        got_task = got.get("task", "classification")
        if got_task != self.task:
            raise CheckpointError(f"cannot resume from {path}: it is a {got_task} checkpoint and this is a {self.task} "
                                  f"run; resume it with the {got_task} tool or start a new run")
        if got.get("arch") != want["arch"] or got.get("num_classes") != want["num_classes"]:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by a {got.get('arch')} run with "
                f"{got.get('num_classes')} classes, this run builds {want['arch']} with {want['num_classes']} "
                f"classes; pass model.name={got.get('arch')} (and the same data), or start a new run")
        own = self.model.state_dict()
        theirs = ckpt["model"]
        wrong = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
        if wrong or len(theirs) != len(own):
            raise CheckpointError(
                f"cannot resume from {path}: its {got.get('arch')} weights do not fit this model "
                f"(model.kwargs differ? first mismatching keys: {wrong[:5]})")
        theirs_setup, ours = ckpt.get("data_setup") or {}, self._data_setup()
        changed = {k: (theirs_setup.get(k), v) for k, v in ours.items() if theirs_setup.get(k) != v}
        if changed:
            text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            if ckpt["progress"]["batch_in_epoch"]:
                raise CheckpointError(
                    f"cannot resume from {path} in the middle of an epoch with a different data setup ({text}): "
                    f"the rest of the epoch would not be the batches the run had not seen; use the same "
                    f"data.batch_size, number of processes and train.grad_accum_steps")
            _log.warning("resuming with a different data setup (%s): the schedule's steps per epoch change", text)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return dict(
            version=CHECKPOINT_VERSION,
            identity=self.identity(),
            data_setup=self._data_setup(),
            config=_plain(self.cfg),
            model=self.model.state_dict(),
            model_ema=self.ema.module.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            progress=dict(vars(self.progress)),
            phase=self.schedule.phase(self.progress.step),
            rng=capture_rng_state(),
            **_plain(self.extra_state()),
        )

    def save(self, name: str) -> Optional[Path]:
        if not self.env.is_main:
            return None
        return save_atomic(self.state_dict(), self.ckpt_dir / name)

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("model_ema") is None:
                raise CheckpointError("the checkpoint has no EMA weights but this run has train.ema.enabled=true")
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress.from_state(ckpt["progress"])
        self.restore_extra(ckpt)
        if self.env.world_size == 1:
            restore_rng_state(ckpt["rng"])
        else:  # each rank reseeds from (seed, rank, step): reproducible, not tied to rank 0's state
            _seed_everything(int(self.tcfg["seed"]) + 1000003 * self.env.rank + self.progress.step)
            if not self.env.is_main:  # the epoch's running loss in the checkpoint is rank 0's
                self.progress.epoch_loss_sum, self.progress.epoch_steps = 0.0, 0

    # ------------------------------------------------------------------ training
    def fit(self) -> Dict[str, Any]:
        """Train to ``train.epochs`` (or ``train.max_steps``), then evaluate; returns the final metrics."""
        if self._resume_ckpt is not None:
            self._restore(self._resume_ckpt)
            self._resume_ckpt = None
        p = self.progress
        if p.step:
            _log.info("resumed at epoch %d, step %d (%s phase)", p.epoch, p.step, self.schedule.phase(p.step))
        self.logger = RunLogger(self.output_dir, enabled=self.env.is_main,
                                resume_step=p.step if p.step else None, resume_epoch=p.epoch if p.step else None)
        if self.env.is_main:
            self._log_summary()
        total_steps = self.epochs * self.updates_per_epoch
        if self.max_steps is not None:
            total_steps = min(total_steps, int(self.max_steps))
        final_eval: Optional[Any] = None
        final_eval_step = -1
        try:
            while p.epoch < self.epochs and p.step < total_steps:
                self._train_epoch(total_steps)
                epoch_done = p.batch_in_epoch >= self.updates_per_epoch * self.accum
                if not epoch_done:  # stopped by max_steps inside the epoch
                    break
                val = None
                interval = int(self.tcfg.get("val_interval", 1))
                if (p.epoch + 1) % interval == 0 or p.epoch + 1 == self.epochs:
                    val = self._validate()
                    final_eval, final_eval_step = val, p.step
                self._end_epoch(val)
            if final_eval is None or final_eval_step != p.step:  # evaluate the final weights if not just done
                final_eval = self._validate()
            metrics = self._final_metrics(final_eval)
            if self.env.is_main:
                self.save("last.pth")
                write_json_atomic(metrics, self.output_dir / "metrics.json")
                self.logger.hparams(_hparams(self.cfg), self.hparam_metrics(metrics))
                self._report(metrics)
            return metrics
        finally:
            self.logger.close()

    def on_train_epoch_start(self) -> None:
        """Per-epoch switches of a task (e.g. mixup off after some epoch)."""

    def _train_epoch(self, total_steps: int) -> None:
        p, env = self.progress, self.env
        loader = self.train_loader
        loader.dataset.set_epoch(p.epoch)
        loader.sampler.set_epoch(p.epoch, skip=p.batch_in_epoch * loader.batch_size)
        self.ddp_model.train()
        self.on_train_epoch_start()
        log_every = int(self.tcfg.get("log_interval", 10))
        ckpt_every = int(self.tcfg.get("checkpoint_interval", 0) or 0)
        bar = tqdm(total=self.updates_per_epoch, initial=p.batch_in_epoch // self.accum, dynamic_ncols=True,
                   desc=f"epoch {p.epoch + 1}/{self.epochs}", disable=not (self.progress_bars and env.is_main))
        window = _new_window()
        micro: List = []
        t_epoch = time.perf_counter()
        for images, targets in loader:
            micro.append((images, targets))
            if len(micro) < self.accum:
                continue
            plan = self.schedule.plan(p.step, p.epoch)
            self.schedule.apply(self.model, plan)
            loss_value, stats = self._optimizer_step(micro, plan)
            micro = []
            p.step += 1
            p.batch_in_epoch += self.accum
            n = self.accum * loader.batch_size * env.world_size
            p.samples_seen += n
            p.epoch_loss_sum += loss_value
            p.epoch_steps += 1
            window["loss"] += loss_value
            window["n"] += 1
            window["samples"] += n
            if stats is not None:
                window["nstep"] += stats.nstep.float().mean().item()
                window["rel"] += stats.rel_residual.float().mean().item()
                if stats.backward is not None:
                    window["bnstep"] += stats.backward.nstep.float().mean().item()
                    window["bn"] += 1
                if stats.jac_loss is not None:
                    window["jac"] += float(stats.jac_loss.detach())
                    window["jn"] += 1
            self.scheduler.step_update(num_updates=p.step)
            bar.update(1)
            if p.step % log_every == 0 or p.step == total_steps:
                self._log_window(window, plan)
                bar.set_postfix(loss=f"{window['last_loss']:.3f}", lr=f"{self._lr():.2e}", phase=plan.phase)
                window = _new_window()
            if p.step >= total_steps or p.batch_in_epoch >= self.updates_per_epoch * self.accum:
                break
            if ckpt_every and p.step % ckpt_every == 0:
                p.train_seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                self.save("last.pth")
        p.train_seconds += time.perf_counter() - t_epoch
        bar.close()

    def _optimizer_step(self, micro: List, plan) -> tuple:
        env = self.env
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        stats = None
        for i, (images, targets) in enumerate(micro):
            images = images.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            images, targets = self.prepare_batch(images, targets)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = i == len(micro) - 1
            sync = self.ddp_model.no_sync() if (env.distributed and not last) else contextlib.nullcontext()
            with sync:
                with autocast_context(env.device, self.amp_dtype):
                    loss = self.criterion(self.ddp_model(images), targets)
                    stats = self.model.deq_stats
                    if stats is not None and stats.aux_outputs:  # fixed-point correction over trajectory states
                        losses = [self.criterion(o, targets) for o in stats.aux_outputs] + [loss]
                        loss = fixed_point_correction(losses, float(self.model.deq.options["correction_gamma"]))
                if plan.compute_jac and stats is not None and stats.jac_loss is not None:
                    loss = loss + plan.jac_weight * stats.jac_loss.float()
                if stats is not None and stats.init_loss is not None:  # Skip / Skip Reg. DEQ initial-guess loss
                    loss = loss + stats.init_loss.float()
                scaled = loss / self.accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total += loss.detach().item()
        clip = self.tcfg.get("clip_grad")
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self._params(), float(clip), mode=self.tcfg.get("clip_mode", "norm"))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                dispatch_clip_grad(self._params(), float(clip), mode=self.tcfg.get("clip_mode", "norm"))
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step)
        loss_value = total / len(micro)
        finite = math.isfinite(loss_value)
        if self.env.distributed:  # every rank must stop together, not leave the others waiting in a collective
            finite = all_reduce_sum([0.0 if finite else 1.0], self.env)[0] == 0.0
        if not finite:
            raise FloatingPointError(
                f"the training loss became non-finite (here: {loss_value}) at step {self.progress.step} "
                f"({plan.phase} phase); lower optim.lr, set train.clip_grad, or resume from the last checkpoint")
        return loss_value, stats

    def _params(self):
        return [q for q in self.model.parameters() if q.requires_grad]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_window(self, w: Dict[str, Any], plan) -> None:
        loss, n = all_reduce_sum([w["loss"], w["n"]], self.env)
        seconds = max(time.perf_counter() - w["t"], 1e-9)
        w["last_loss"] = loss / max(n, 1)
        k = max(w["n"], 1)
        scalars = {
            "train/loss": w["last_loss"], "train/lr": self._lr(), "train/samples_per_s": w["samples"] / seconds,
            "train/phase": 0.0 if plan.phase == PRETRAIN else 1.0,
            "deq/fwd/nstep": w["nstep"] / k, "deq/fwd/rel_residual": w["rel"] / k,
        }
        if w["bn"]:
            scalars["deq/bwd/nstep"] = w["bnstep"] / w["bn"]
        if w["jn"]:
            scalars["deq/jac_loss"] = w["jac"] / w["jn"]
        scalars["deq/jac_weight"] = plan.jac_weight
        self.logger.scalars(scalars, self.progress.step)

    def _precise_bn(self, model: nn.Module) -> None:
        """Recompute BatchNorm statistics at the current weights from ``train.precise_bn_batches`` train batches.

        The running averages lag behind weights that still move fast (a short schedule, or Adam on small
        weights); Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021). The images are a fixed random
        subset of ``bn_dataset()`` (drawn once from the seed, so the result is reproducible), split over the
        ranks.
        """
        n = int(self.tcfg.get("precise_bn_batches") or 0)
        if n <= 0:
            return
        if self._bn_loader is None:
            data = self.bn_dataset()
            batch = self.train_loader.batch_size
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(int(self.tcfg["seed"])))
            world = self.env.world_size  # equal shards, so every rank runs the same number of (SyncBN) batches
            count = min(n * batch * world, len(data) // world * world)
            subset = torch.utils.data.Subset(data, order[:count].tolist())
            self._bn_loader = build_eval_loader(subset, batch, self.env.world_size, self.env.rank,
                                                workers=self.workers)

        def batches():
            for images, _ in self._bn_loader:
                images = images.to(self.env.device)
                yield images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

        update_bn(batches(), model)

    def _prepare_eval(self, model: nn.Module) -> None:
        self.schedule.apply_eval(model, self.progress.step)
        self._precise_bn(model)
        if self.env.distributed and not self.sync_bn:
            distribute_bn(model, self.env.world_size, reduce=True)

    def _validate(self) -> Any:
        step = self.progress.step
        self._prepare_eval(self.model)
        res = self.evaluate(self.model, "val")
        self.logger.scalars({f"val/{k}": v for k, v in self.eval_scalars(res).items()}, step)
        self.log_eval_details(self.model, res, "val", step)
        if self.ema is not None:
            self._prepare_eval(self.ema.module)
            ema_res = self.evaluate(self.ema.module, "val (EMA)")
            self.logger.scalars({f"val_ema/{k}": v for k, v in self.eval_scalars(ema_res).items()}, step)
            self.log_eval_details(self.ema.module, ema_res, "val_ema", step)
            res.ema = ema_res
        return res

    def _end_epoch(self, val: Optional[Any]) -> None:
        p = self.progress
        loss_sum, loss_n = all_reduce_sum([p.epoch_loss_sum, p.epoch_steps], self.env)
        row = dict(epoch=p.epoch, step=p.step, phase=self.schedule.phase(p.step - 1), lr=self._lr(),
                   train_loss=loss_sum / max(loss_n, 1), train_seconds=round(p.train_seconds, 3))
        ema = getattr(val, "ema", None)
        row.update(self.val_row(val))  # the same columns in every row (blank when an epoch was not validated)
        if self.ema is not None:
            row.update(self.val_row(ema, prefix="val_ema_"))
        improved = False
        if val is not None:
            score = self.score(ema if ema is not None else val)
            improved = score > p.best_score
            if improved:
                p.best_score, p.best_epoch = score, p.epoch
        if self.env.is_main:
            self.logger.epoch_row(row)
            self.logger.flush()
            _log.info("epoch %d: %s", p.epoch, ", ".join(f"{k}={_short(v)}" for k, v in row.items()))
        p.epoch += 1
        p.batch_in_epoch = 0
        p.epoch_loss_sum, p.epoch_steps = 0.0, 0
        self.save("last.pth")
        if improved:
            self.save("best.pth")

    def _final_metrics(self, val: Any) -> Dict[str, Any]:
        p = self.progress
        m: Dict[str, Any] = dict(self.final_metrics(val))
        m[f"best_{self.score_name}"] = max(p.best_score, self.score(val))
        m.update(
            train_seconds=p.train_seconds, epochs=p.epoch, steps=p.step,
            phase=self.schedule.phase(max(p.step - 1, 0)), eval_solver=dict(self.model.deq.options),
            model=self.cfg["model"]["name"], recipe=self.cfg.get("recipe"), num_classes=self.num_classes,
            world_size=self.env.world_size,
            samples_per_s=p.samples_seen / p.train_seconds if p.train_seconds > 0 else None,
        )
        ema = getattr(val, "ema", None)
        if ema is not None:
            m.update({k.replace("val_", "val_ema_", 1): v for k, v in self.final_metrics(ema).items()
                      if k.startswith("val_")})
        return _plain(m)

    def _log_summary(self) -> None:
        n_params = sum(q.numel() for q in self.model.parameters())
        _log.info("model %s: %.2fM parameters, %d classes; %d train / %d val images; %d steps/epoch x %d epochs; "
                  "output %s", self.cfg["model"]["name"], n_params / 1e6, self.num_classes, len(self.train_set),
                  len(self.val_set), self.updates_per_epoch, self.epochs, self.output_dir)

    def _report(self, m: Mapping[str, Any]) -> None:
        lines = [f"final ({m['phase']} mode, {m['epochs']} epochs, {m['steps']} steps, "
                 f"{m['train_seconds']:.0f} s training):"]
        lines += [f"  {line}" for line in self.report_lines(m)]
        lines += [
            f"  metrics: {self.output_dir / 'metrics.json'}",
            f"  checkpoint: {self.ckpt_dir / 'last.pth'}",
            f"  tensorboard --logdir {self.output_dir / 'tensorboard'}",
        ]
        print("\n".join(lines), flush=True)


def _new_window() -> Dict[str, Any]:
    return dict(loss=0.0, n=0, samples=0, t=time.perf_counter(), nstep=0.0, rel=0.0, bnstep=0.0, bn=0, jac=0.0,
                jn=0)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plain(obj: Any) -> Any:
    """Containers of str/int/float/bool/None only (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return str(obj)
    return str(obj)


def _hparams(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    keep = ("model", "deq", "jac", "data", "optim", "sched", "train")
    return {k: v for k, v in cfg.items() if k in keep}
