"""The classification training loop shared by ``tools/train_cls.py`` and ``tools/finetune.py``.

``ClassificationTrainer(cfg, env, output_dir).fit()`` builds everything from a plain config dict (the
resolved Hydra config), trains with the MDEQ recipe (``DEQSchedule``), evaluates every ``val_interval``
epochs, logs (TensorBoard, CSV, tqdm), checkpoints atomically and returns the final metrics, which are
also written to ``<output_dir>/metrics.json``.

Resuming (``train.resume=<checkpoint>``) restores model, optimizer, scheduler, scaler, EMA, the step
counters (including the position inside an epoch), the RNG states and the phase; with the per-sample
seeded augmentation and the (seed, epoch)-shuffled sampler, a single-process run killed at any point and
resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU). Under DDP only rank 0's
RNG state is saved, so the other ranks reseed from (seed, rank, step): reproducible, not bitwise-identical.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn, freeze
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from ..data.classification import (
    build_eval_loader, build_imagefolder_datasets, build_train_loader, build_transform, resolve_data_cfg,
    steps_per_epoch,
)
from ..data.digits import prepare_digits
from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from .deq_schedule import PRETRAIN, DEQSchedule, JacobianSchedule
from .distributed import DistEnv, all_reduce_sum
from .evaluate import EvalResult, autocast_context, evaluate_classifier
from .run_logger import RunLogger, write_json_atomic
from .weights import load_backbone_weights, read_state_dict

__all__ = ["ClassificationTrainer", "build_model", "build_schedule", "AMP_DTYPES", "CHECKPOINT_VERSION"]

_log = logging.getLogger("mdeq.train")

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CHECKPOINT_VERSION = 1
FREEZE_GROUPS = {"stem": ["downsample", "stage0"], "cell": ["fullstage"]}


# ---------------------------------------------------------------------------------------------- builders
def build_model(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """A timm model from ``model`` config: name, pretrained, weights (local file), kwargs, drop_rate, freeze."""
    name = model_cfg["name"]
    kwargs = dict(model_cfg.get("kwargs") or {})
    model = timm.create_model(name, pretrained=bool(model_cfg.get("pretrained", False)), num_classes=num_classes,
                              drop_rate=float(model_cfg.get("drop_rate", 0.0) or 0.0), **kwargs)
    weights = model_cfg.get("weights")
    if weights:
        fresh, _ = load_backbone_weights(model, read_state_dict(weights, prefer_ema=bool(model_cfg.get("ema_weights"))))
        if fresh:
            _log.info("loaded %s; new head (%d classes): %s", weights, num_classes, fresh)
    groups = list(model_cfg.get("freeze") or [])
    unknown = sorted(set(groups) - set(FREEZE_GROUPS))
    if unknown:
        raise ValueError(f"model.freeze accepts {sorted(FREEZE_GROUPS)}, got {unknown}")
    modules = [m for g in groups for m in FREEZE_GROUPS[g] if getattr(model, m, None) is not None]
    if modules:
        freeze(model, modules)  # requires_grad off and BatchNorm frozen (timm.utils.freeze)
    return model


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
    best_top1: float = -1.0
    best_epoch: int = -1
    train_seconds: float = 0.0
    samples_seen: int = 0
    epoch_loss_sum: float = 0.0   # this epoch's summed step losses (for the epoch row's train_loss)
    epoch_steps: int = 0


class ClassificationTrainer:
    """Everything a classification run needs, built from a resolved config dict."""

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
        self.train_set, self.val_set = self._datasets()
        self.num_classes = len(self.train_set.classes)

        # model (+ transforms from its pretrained cfg)
        torch.manual_seed(seed)  # the same init on every rank (DDP broadcasts rank 0's anyway)
        self.model = build_model(cfg["model"], self.num_classes)
        _seed_everything(seed + env.rank)  # training randomness (dropout masks, probes, mixup) differs per rank
        self.data_cfg = resolve_data_cfg(self.model, cfg["data"].get("overrides"))
        self.train_set.transform = build_transform(self.data_cfg, True, cfg["data"].get("aug"))
        self.val_set.transform = build_transform(self.data_cfg, False)
        if self.tcfg.get("sync_bn") and env.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(env.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.schedule = build_schedule(cfg, self.model)

        batch = int(cfg["data"]["batch_size"])
        workers = int(cfg["data"].get("workers", 2))
        pin = env.device.type == "cuda"
        self.train_loader = build_train_loader(self.train_set, batch, seed, env.world_size, env.rank, workers, pin)
        self.val_loader = build_eval_loader(self.val_set, int(cfg["data"].get("eval_batch_size") or batch),
                                            env.world_size, env.rank, workers, pin)
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
        ocfg = dict(cfg["optim"])
        self.optimizer = create_optimizer_v2(self.model, **ocfg)
        scfg = dict(cfg["sched"])
        self.scheduler, _ = create_scheduler_v2(self.optimizer, num_epochs=self.epochs,
                                                updates_per_epoch=self.updates_per_epoch, **scfg)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16 else None
        ema = dict(self.tcfg.get("ema") or {})
        self.ema = None
        if ema.get("enabled"):
            self.ema = ModelEmaV3(self.model, decay=float(ema.get("decay", 0.9998)),
                                  use_warmup=bool(ema.get("warmup", False)))
        self.mixup = self._mixup()
        self.train_loss_fn = self._train_loss()
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

    # ------------------------------------------------------------------ setup helpers
    def _amp_dtype(self) -> Optional[torch.dtype]:
        amp = self.tcfg.get("amp")
        if not amp:
            return None
        name = str(self.tcfg.get("amp_dtype", "bfloat16"))
        if name not in AMP_DTYPES:
            raise ValueError(f"train.amp_dtype must be one of {sorted(AMP_DTYPES)}, got {name!r}")
        return AMP_DTYPES[name]

    def _datasets(self):
        dcfg = self.cfg["data"]
        root = dcfg.get("root")
        if dcfg.get("name") == "digits":
            if self.env.is_main:
                root = prepare_digits(root)
            self.env.barrier()
            root = prepare_digits(root)  # every rank: returns at once now that the cache is complete
        if not root:
            raise ValueError("data.root is required: an ImageFolder root with train/ and val/ class folders")
        return build_imagefolder_datasets(root, train_split=dcfg.get("train_split", "train"),
                                          val_split=dcfg.get("val_split", "val"))

    def _mixup(self) -> Optional[Mixup]:
        m = dict(self.tcfg.get("mixup") or {})
        if not (m.get("mixup_alpha", 0) > 0 or m.get("cutmix_alpha", 0) > 0 or m.get("cutmix_minmax")):
            return None
        return Mixup(mixup_alpha=m.get("mixup_alpha", 0.0), cutmix_alpha=m.get("cutmix_alpha", 0.0),
                     cutmix_minmax=m.get("cutmix_minmax"), prob=m.get("prob", 1.0),
                     switch_prob=m.get("switch_prob", 0.5), mode=m.get("mode", "batch"),
                     label_smoothing=float(self.tcfg.get("smoothing", 0.0)), num_classes=self.num_classes)

    def _train_loss(self) -> nn.Module:
        smoothing = float(self.tcfg.get("smoothing", 0.0))
        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=smoothing)
        return nn.CrossEntropyLoss()

    def _identity(self) -> Dict[str, Any]:
        return dict(arch=self.cfg["model"]["name"], num_classes=self.num_classes,
                    model_kwargs=dict(self.cfg["model"].get("kwargs") or {}))

    def _data_setup(self) -> Dict[str, int]:
        """What fixes the order of batches and the schedule's length; a mid-epoch resume needs the same."""
        return dict(batch_size=self.train_loader.batch_size, world_size=self.env.world_size,
                    grad_accum_steps=self.accum, train_images=len(self.train_set))

    def _check_compatible(self, ckpt: Mapping[str, Any], path: str) -> None:
        want, got = self._identity(), ckpt.get("identity") or {}
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
            identity=self._identity(),
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
            data_cfg=_plain(self.data_cfg),
            classes=list(self.train_set.classes),
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
        self.progress = Progress(**ckpt["progress"])
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
        final_eval: Optional[EvalResult] = None
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
                self.logger.hparams(_hparams(self.cfg), {k: metrics[k] for k in ("val_top1", "val_top5")})
                self._report(metrics)
            return metrics
        finally:
            self.logger.close()

    def _train_epoch(self, total_steps: int) -> None:
        p, env = self.progress, self.env
        loader = self.train_loader
        loader.dataset.set_epoch(p.epoch)
        loader.sampler.set_epoch(p.epoch, skip=p.batch_in_epoch * loader.batch_size)
        self.ddp_model.train()
        if self.mixup is not None:
            off = self.tcfg["mixup"].get("off_epoch")
            self.mixup.mixup_enabled = not (off is not None and p.epoch >= int(off))
        log_every = int(self.tcfg.get("log_interval", 10))
        ckpt_every = int(self.tcfg.get("checkpoint_interval", 0) or 0)
        bar = tqdm(total=self.updates_per_epoch, initial=p.batch_in_epoch // self.accum, dynamic_ncols=True,
                   desc=f"epoch {p.epoch + 1}/{self.epochs}", disable=not (self.progress_bars and env.is_main))
        window = dict(loss=0.0, n=0, samples=0, t=time.perf_counter(), nstep=0.0, rel=0.0, bnstep=0.0, bn=0,
                      jac=0.0, jn=0)
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
                window.update(loss=0.0, n=0, samples=0, t=time.perf_counter(), nstep=0.0, rel=0.0, bnstep=0.0,
                              bn=0, jac=0.0, jn=0)
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
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = i == len(micro) - 1
            sync = self.ddp_model.no_sync() if (env.distributed and not last) else contextlib.nullcontext()
            with sync:
                with autocast_context(env.device, self.amp_dtype):
                    logits = self.ddp_model(images)
                    loss = self.train_loss_fn(logits.float(), targets)
                stats = self.model.deq_stats
                if plan.compute_jac and stats is not None and stats.jac_loss is not None:
                    loss = loss + plan.jac_weight * stats.jac_loss.float()
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
        subset of the train set (drawn once from the seed, so every class is represented and the result is
        reproducible), with eval transforms, split over the ranks.
        """
        n = int(self.tcfg.get("precise_bn_batches") or 0)
        if n <= 0:
            return
        if self._bn_loader is None:
            data = copy.copy(self.train_set)
            data.transform = self.val_set.transform
            batch = self.train_loader.batch_size
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(int(self.tcfg["seed"])))
            subset = torch.utils.data.Subset(data, order[: n * batch * self.env.world_size].tolist())
            self._bn_loader = build_eval_loader(subset, batch, self.env.world_size, self.env.rank,
                                                workers=int(self.cfg["data"].get("workers", 2)))

        def batches():
            for images, _ in self._bn_loader:
                images = images.to(self.env.device)
                yield images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

        update_bn(batches(), model)

    def _validate(self) -> EvalResult:
        p = self.progress
        self.schedule.apply_eval(self.model, p.step)
        self._precise_bn(self.model)
        if self.env.distributed and not self.tcfg.get("sync_bn"):
            distribute_bn(self.model, self.env.world_size, reduce=True)
        res = evaluate_classifier(self.model, self.val_loader, self.env, self.amp_dtype, self.channels_last,
                                  self.progress_bars, desc="val")
        self.logger.scalars({"val/top1": res.top1, "val/top5": res.top5, "val/loss": res.loss,
                             "val/deq_nstep": res.deq_nstep_mean, "val/deq_rel_residual": res.deq_rel_residual_mean},
                            p.step)
        if self.ema is not None:
            self.schedule.apply_eval(self.ema.module, p.step)
            self._precise_bn(self.ema.module)
            if self.env.distributed and not self.tcfg.get("sync_bn"):
                distribute_bn(self.ema.module, self.env.world_size, reduce=True)
            ema_res = evaluate_classifier(self.ema.module, self.val_loader, self.env, self.amp_dtype,
                                          self.channels_last, self.progress_bars, desc="val (EMA)")
            self.logger.scalars({"val_ema/top1": ema_res.top1, "val_ema/top5": ema_res.top5}, p.step)
            res.ema = ema_res  # type: ignore[attr-defined]
        return res

    def _end_epoch(self, val: Optional[EvalResult]) -> None:
        p = self.progress
        loss_sum, loss_n = all_reduce_sum([p.epoch_loss_sum, p.epoch_steps], self.env)
        row = dict(epoch=p.epoch, step=p.step, phase=self.schedule.phase(p.step - 1), lr=self._lr(),
                   train_loss=loss_sum / max(loss_n, 1), train_seconds=round(p.train_seconds, 3))
        improved = False
        # the same columns in every row (blank when an epoch was not validated)
        row.update(val_top1="", val_top5="", val_loss="", deq_nstep_mean="", deq_rel_residual_mean="")
        if self.ema is not None:
            row.update(val_ema_top1="", val_ema_top5="")
        if val is not None:
            score = getattr(val, "ema", val).top1
            row.update(val_top1=val.top1, val_top5=val.top5, val_loss=val.loss,
                       deq_nstep_mean=val.deq_nstep_mean, deq_rel_residual_mean=val.deq_rel_residual_mean)
            if getattr(val, "ema", None) is not None:
                row.update(val_ema_top1=val.ema.top1, val_ema_top5=val.ema.top5)
            improved = score > p.best_top1
            if improved:
                p.best_top1, p.best_epoch = score, p.epoch
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

    def _final_metrics(self, val: EvalResult) -> Dict[str, Any]:
        p = self.progress
        m: Dict[str, Any] = dict(
            val_top1=val.top1, val_top5=val.top5, val_loss=val.loss, val_count=val.count,
            deq_nstep_mean=val.deq_nstep_mean, deq_rel_residual_mean=val.deq_rel_residual_mean,
            deq_abs_residual_mean=val.deq_abs_residual_mean, train_seconds=p.train_seconds,
            epochs=p.epoch, steps=p.step, phase=self.schedule.phase(max(p.step - 1, 0)),
            best_val_top1=max(p.best_top1, val.top1), eval_solver=dict(self.model.deq.options),
            model=self.cfg["model"]["name"], recipe=self.cfg.get("recipe"), num_classes=self.num_classes,
            world_size=self.env.world_size,
            samples_per_s=p.samples_seen / p.train_seconds if p.train_seconds > 0 else None,
        )
        if getattr(val, "ema", None) is not None:
            m.update(val_ema_top1=val.ema.top1, val_ema_top5=val.ema.top5)
        return _plain(m)

    def _log_summary(self) -> None:
        n_params = sum(q.numel() for q in self.model.parameters())
        _log.info("model %s: %.2fM parameters, %d classes; %d train / %d val images; %d steps/epoch x %d epochs; "
                  "output %s", self.cfg["model"]["name"], n_params / 1e6, self.num_classes, len(self.train_set),
                  len(self.val_set), self.updates_per_epoch, self.epochs, self.output_dir)

    def _report(self, m: Mapping[str, Any]) -> None:
        lines = [
            f"final ({m['phase']} mode, {m['epochs']} epochs, {m['steps']} steps, {m['train_seconds']:.0f} s training):",
            f"  val top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%  loss {m['val_loss']:.4f}",
            f"  solver: {m['deq_nstep_mean']:.1f} steps/image, relative residual {m['deq_rel_residual_mean']:.3g}",
            f"  metrics: {self.output_dir / 'metrics.json'}",
            f"  checkpoint: {self.ckpt_dir / 'last.pth'}",
            f"  tensorboard --logdir {self.output_dir / 'tensorboard'}",
        ]
        print("\n".join(lines), flush=True)


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
