"""The training loop shared by every task: ``Trainer`` holds what does not depend on the task.

A task (``ClassificationTrainer`` in ``classification_trainer.py``, ``SegmentationTrainer`` in
``segmentation_trainer.py``) supplies its datasets, model, loss, evaluation and what it reports through a few
methods; the loop here does the rest: the MDEQ schedule (``deq_schedule``: unrolled pre-training, then DEQ mode
with the Jacobian penalty), timm optimizers and schedulers, AMP (bf16, or fp16 with a GradScaler),
channels_last, gradient accumulation, clipping, EMA, SyncBN / DDP under torchrun, logging (TensorBoard, CSV,
tqdm) and atomic checkpoints. Its helpers each have a room: ``run_state`` (what a checkpoint holds and how a
resume restores it), ``deq_loss`` (the DEQ terms of the loss), ``train_stats`` (the logged running means),
``precise_bn`` (BatchNorm statistics recomputed before validation).

Resuming (``train.resume=<checkpoint>``) restores model, optimizer, scheduler, scaler, EMA, the step
counters (including the position inside an epoch), the RNG states and the phase; a single-process run killed
at any point and resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data.auto import choose_batch_size
from ..data.inspect import verify_datasets
from ..data.loaders import build_eval_loader, build_train_loader, resolve_workers, steps_per_epoch
from .amp import amp_dtype, autocast_context
from .checkpoint import load_checkpoint, plain_data, save_atomic
from .deq_loss import with_corrections, with_regularizers
from .deq_schedule import EXPLICIT, PRETRAIN, resolve_pretrain, schedule_for
from .distributed import DistEnv, all_reduce_sum
from .equilibria import Equilibria, log_skipped_mdeq_defaults, refuse_mdeq_settings
from .model_config import architecture_kwargs
from .precise_bn import PreciseBN
from .provenance import provenance
from .run_logger import RunLogger, write_json_atomic
from .run_state import Progress, RunParts, check_resumable, restore_run_state, run_state_dict, seed_everything
from .preemption import StopSignals
from .solver_health import warn_diverged
from .train_health import TrainingHealth
from .train_stats import LoaderWaitClock, StatsWindow

__all__ = ["Trainer"]

_log = logging.getLogger("mdeq.train")


class Trainer(ABC):
    """The task-independent training loop, built from a resolved config dict; see the module docstring.

    A task subclass sets ``task`` and ``score_name`` (the validation number ``best.pth`` follows) and
    implements the methods marked "task" below. ``overrides`` are the command line's config overrides: an MDEQ
    setting among them is refused for a model without an MDEQ (``equilibria.refuse_mdeq_settings``).
    """

    task = "task"
    score_name = "score"

    def __init__(self, cfg: Mapping[str, Any], env: DistEnv, output_dir: os.PathLike, overrides: Sequence[str] = ()):
        self.cfg = cfg
        self.overrides = list(overrides)
        self.env = env
        self.tcfg = dict(cfg["train"])
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        seed = int(self.tcfg["seed"])
        self.amp_dtype = amp_dtype(self.tcfg.get("amp"), self.tcfg.get("amp_dtype"))
        self.channels_last = bool(self.tcfg.get("channels_last", False))
        self.progress_bars = bool(self.tcfg.get("progress", True))
        self._stop = StopSignals()  # handlers are installed while ``fit`` trains

        # data
        self.train_set, self.val_set = self.build_datasets()
        self.num_classes = len(self.train_set.classes)
        if cfg["data"].get("verify"):  # every file's header now, all bad files in one error, before any epoch
            n = verify_datasets({"train": self.train_set, "val": self.val_set}, progress=self.progress_bars
                                and env.is_main)
            _log.info("data.verify: all %d files can be read", n)

        # model (+ the transforms, which may depend on it)
        torch.manual_seed(seed)  # the same init on every rank (DDP broadcasts rank 0's anyway)
        self.model_kwargs = architecture_kwargs(cfg["model"], cfg.get("deq") or {}, self.overrides)  # build_model's
        self.model = self.build_model()
        self.equilibria = Equilibria(self.model)
        if not self.equilibria:
            refuse_mdeq_settings(self.overrides, cfg["model"]["name"])
            if env.is_main:
                log_skipped_mdeq_defaults(cfg["model"]["name"])
        seed_everything(seed + env.rank)  # training randomness (dropout masks, probes, mixup) differs per rank
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
        if self.tcfg.get("compile_cell"):
            stages = list(self.equilibria.stages.values())
            if not stages or not all(hasattr(stage, "compile_cell") for stage in stages):
                raise ValueError(f"train.compile_cell=true needs an MDEQ model's equilibrium cell; "
                                 f"{cfg['model']['name']} has none (use train.compile_cell=false)")
            for stage in stages:
                stage.compile_cell()

        batch, why = choose_batch_size(cfg["data"]["batch_size"], len(self.train_set), env.world_size)
        if why and env.is_main:
            _log.info("data: %s", why)
        self.workers = resolve_workers(cfg["data"].get("workers"))
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
        run_steps = self.epochs * self.updates_per_epoch
        self.cfg = cfg = resolve_pretrain(cfg, min(run_steps, int(self.max_steps)) if self.max_steps else run_steps)
        self.schedule = schedule_for(cfg, self.model)

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
        self.health = TrainingHealth(self._likely_culprits())
        self._task_loss = float("nan")  # the last step's task loss (without the DEQ terms)
        self.precise_bn = PreciseBN(self.bn_dataset, int(self.tcfg.get("precise_bn_batches") or 0), batch, seed, env,
                                    workers=self.workers, channels_last=self.channels_last)
        self.logger: Optional[RunLogger] = None
        resume = self.tcfg.get("resume")
        self._resume_ckpt = load_checkpoint(resume) if resume else None
        if self._resume_ckpt is not None:
            check_resumable(self._resume_ckpt, resume, self.identity(), self.task, self.model, self._data_setup())

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
        """What the model is (architecture, classes, architecture kwargs, task): what a resumed run must share
        with this one, and all that ``rebuild.model_from_checkpoint`` needs to build the same modules."""
        return dict(arch=self.cfg["model"]["name"], num_classes=self.num_classes,
                    model_kwargs=dict(self.model_kwargs), task=self.task)

    def extra_state(self) -> Dict[str, Any]:
        """Extra checkpoint entries that tools read back (class names, data config)."""
        return dict(classes=list(self.train_set.classes))

    def restore_extra(self, ckpt: Mapping[str, Any]) -> None:
        """Read back what ``extra_state`` saved, on resume; nothing by default."""

    @abstractmethod
    def bn_dataset(self) -> Dataset:
        """task: the images precise BN recomputes the statistics from (a deterministic view of the train set)."""

    def chance_score(self) -> Optional[float]:
        """The validation score of a model that learnt nothing (e.g. always the most frequent class), for the
        "stalls at chance" warning; None: the task has none."""
        return None

    # ------------------------------------------------------------------ setup helpers
    def _likely_culprits(self) -> str:
        """The settings a diverging or stalled run most often needs changed, with this run's values."""
        cfg = self.cfg
        parts = [f"optim.lr={cfg['optim'].get('lr')}", f"sched.warmup_epochs={cfg['sched'].get('warmup_epochs')}",
                 f"train.clip_grad={self.tcfg.get('clip_grad')}"]
        if self.equilibria:
            jac = (cfg.get("schedule") or {}).get("jac") or {}
            parts.append(f"the Jacobian penalty (schedule.jac.weight={jac.get('weight')}, freq={jac.get('freq')})")
        return ", ".join(parts)

    def _data_setup(self) -> Dict[str, int]:
        """What fixes the order of batches and the schedule's length; a mid-epoch resume needs the same."""
        return dict(batch_size=self.train_loader.batch_size, world_size=self.env.world_size,
                    grad_accum_steps=self.accum, train_images=len(self.train_set))

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> RunParts:
        return RunParts(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                        scaler=self.scaler)

    def state_dict(self) -> Dict[str, Any]:
        state = run_state_dict(self._parts(), self.progress, self.identity(), self.cfg, self._data_setup(),
                               self.schedule.phase(self.progress.step), self.extra_state())
        state["health"] = self.health.state_dict()
        return state

    def save(self, name: str) -> Optional[Path]:
        if not self.env.is_main:
            return None
        return save_atomic(self.state_dict(), self.ckpt_dir / name)

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        self.progress = restore_run_state(self._parts(), ckpt, int(self.tcfg["seed"]), self.env.rank,
                                          self.env.world_size)
        self.health.load_state_dict(ckpt.get("health"))
        self.restore_extra(ckpt)

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
            with self._stop:  # SIGTERM / SIGUSR1 / Ctrl-C: finish the step, save, exit (outside: as usual)
                while p.epoch < self.epochs and p.step < total_steps:
                    self._train_epoch(total_steps)
                    epoch_done = p.batch_in_epoch >= self.updates_per_epoch * self.accum
                    if not epoch_done:  # stopped by max_steps inside the epoch
                        break
                    val = None
                    interval = int(self.tcfg.get("val_interval", 1))
                    if (p.epoch + 1) % interval == 0 or p.epoch + 1 == self.epochs:
                        self.save("last.pth")  # the trained epoch, before validation can fail (a resume validates)
                        val = self._validate()
                        final_eval, final_eval_step = val, p.step
                    self._end_epoch(val)
                    if self._stop.agreed(self.env):
                        self._save_and_stop()
            if final_eval is None or final_eval_step != p.step:  # evaluate the final weights if not just done
                final_eval = self._validate()
                if self.env.is_main:
                    ema = getattr(final_eval, "ema", None)
                    self.health.validated(self.score(ema if ema is not None else final_eval), self.chance_score(),
                                          p.epoch_loss_sum / max(p.epoch_steps, 1), self._past_warmup(),
                                          p.epoch + 1, final=True)
            metrics = self._final_metrics(final_eval)
            if self.env.is_main:
                self.save("last.pth")
                write_json_atomic({**metrics, "provenance": provenance()}, self.output_dir / "metrics.json")
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
        window = StatsWindow()
        micro: List = []
        t_epoch = t_start = time.perf_counter()
        clock = LoaderWaitClock()
        for images, targets in clock.timed(loader):
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
            if env.is_main:  # the reference: the first step (the first after a resume that has none)
                self.health.begin(self._task_loss)
            diverged = window.add(loss_value, n, stats, task_loss=self._task_loss)
            if diverged and env.is_main:
                warn_diverged(diverged, int(stats.diverged.numel()), "training")
            self.scheduler.step_update(num_updates=p.step)
            bar.update(1)
            if p.step % log_every == 0 or p.step == total_steps:
                window.data_seconds = clock.take()
                last_loss = self._log_window(window, plan)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{self._lr():.2e}", phase=plan.phase)
                window = StatsWindow()
            if p.step >= total_steps or p.batch_in_epoch >= self.updates_per_epoch * self.accum:
                break
            if ckpt_every and p.step % ckpt_every == 0:
                p.train_seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                self.save("last.pth")
            if self._stop.agreed(env):
                p.train_seconds += time.perf_counter() - t_epoch
                bar.close()
                self._save_and_stop()
        p.train_seconds += time.perf_counter() - t_epoch
        bar.close()
        if env.is_main:
            self.health.data_wait(clock.total, time.perf_counter() - t_start, p.epoch, loader.num_workers)

    def _save_and_stop(self) -> None:
        """A stop signal came (to any rank, after a step or an epoch): save ``last.pth`` and end the tool with
        ``TrainingStopped`` (exit status 128 + signal), printing how to resume."""
        p = self.progress
        path = self.ckpt_dir / "last.pth"
        self.save("last.pth")
        self.logger.flush()
        self.env.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
        stop = self._stop.exit(f"the run state after epoch {p.epoch} step {p.step} is in {path}",
                               resume_command(path))
        if self.env.is_main:
            print(str(stop), file=sys.stderr, flush=True)
            _log.warning("stopped by a signal at step %d; saved %s", p.step, path)
        raise stop

    def _optimizer_step(self, micro: List, plan) -> tuple:
        env = self.env
        self.optimizer.zero_grad(set_to_none=True)
        total = task = 0.0
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
                    task_loss = loss.detach()  # read after backward, with the total: one sync a micro-batch
                    stats = self.equilibria.stats()
                    if stats is not None and stats.aux_outputs:
                        loss = with_corrections(loss, stats, self.criterion, targets,
                                                float(self.equilibria.options["correction_gamma"]))
                loss = with_regularizers(loss, stats, plan)
                scaled = loss / self.accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total += loss.detach().item()
            task += task_loss.item()
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
        self._task_loss = task / len(micro)  # without the DEQ terms: what TrainingHealth watches
        finite = math.isfinite(loss_value)
        if self.env.distributed:  # every rank must stop together, not leave the others waiting in a collective
            finite = all_reduce_sum([0.0 if finite else 1.0], self.env)[0] == 0.0
        if not finite:
            diverged = int(stats.diverged.sum()) if stats is not None else 0
            why = (f"; the solve diverged for {diverged} of the batch's {stats.diverged.numel()} samples (a NaN/inf "
                   "image gives NaN logits: check the data)") if diverged else ""
            raise FloatingPointError(
                f"the training loss became non-finite (here: {loss_value}) at step {self.progress.step} "
                f"({plan.phase} phase){why}; lower optim.lr, set train.clip_grad, or resume from the last "
                "checkpoint")
        return loss_value, stats

    def _params(self):
        return [q for q in self.model.parameters() if q.requires_grad]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_window(self, w: StatsWindow, plan) -> float:
        """Log the window's means (the loss averaged over the ranks); returns that loss."""
        loss, n = all_reduce_sum([w.loss, w.n], self.env)
        loss = loss / max(n, 1)
        scalars = {"train/loss": loss, "train/lr": self._lr(), "train/samples_per_s": w.samples / w.seconds(),
                   "train/data_wait_fraction": w.data_seconds / w.seconds()}
        if self.equilibria:
            scalars.update({"train/phase": 0.0 if plan.phase == PRETRAIN else 1.0, **w.deq_scalars(),
                            "deq/jac_weight": plan.jac_weight})
        self.logger.scalars(scalars, self.progress.step)
        if self.env.is_main:
            self.health.loss(w.task_loss / max(w.n, 1), self.progress.step)
        return loss

    def _prepare_eval(self, model: nn.Module) -> None:
        self.schedule.apply_eval(model, self.progress.step)
        self.precise_bn(model)
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

    def _past_warmup(self) -> bool:
        """Whether the run is past unrolled pre-training and the learning-rate warmup."""
        warmup = float(self.cfg["sched"].get("warmup_epochs") or 0)
        return self.progress.step > self.schedule.pretrain_steps and self.progress.epoch + 1 > warmup

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
            if self.env.is_main:
                self.health.validated(score, self.chance_score(), row["train_loss"], self._past_warmup(),
                                      p.epoch + 1, final=p.epoch + 1 >= self.epochs)
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
            warnings=list(self.health.warnings), train_seconds=p.train_seconds, epochs=p.epoch, steps=p.step,
            phase=self.schedule.phase(max(p.step - 1, 0)), eval_solver=self.equilibria.options,
            has_mdeq=bool(self.equilibria), model=self.cfg["model"]["name"],
            parameters=sum(q.numel() for q in self.model.parameters()), recipe=self.cfg.get("recipe"),
            num_classes=self.num_classes, world_size=self.env.world_size,
            samples_per_s=p.samples_seen / p.train_seconds if p.train_seconds > 0 else None,
        )
        ema = getattr(val, "ema", None)
        if ema is not None:
            m.update({k.replace("val_", "val_ema_", 1): v for k, v in self.final_metrics(ema).items()
                      if k.startswith("val_")})
        return plain_data(m)

    def _log_summary(self) -> None:
        n_params = sum(q.numel() for q in self.model.parameters())
        kind = (f"MDEQ at {', '.join(p or '<model>' for p in self.equilibria.paths)}" if self.equilibria
                else "explicit network, no MDEQ")
        _log.info("model %s (%s): %.2fM parameters, %d classes; %d train / %d val images; %d steps/epoch x %d "
                  "epochs; output %s", self.cfg["model"]["name"], kind, n_params / 1e6, self.num_classes,
                  len(self.train_set), len(self.val_set), self.updates_per_epoch, self.epochs, self.output_dir)

    def _report(self, m: Mapping[str, Any]) -> None:
        mode = "an explicit network" if m["phase"] == EXPLICIT else f"{m['phase']} mode"
        lines = [f"final ({mode}, {m['epochs']} epochs, {m['steps']} steps, "
                 f"{m['train_seconds']:.0f} s training):"]
        lines += [f"  {line}" for line in self.report_lines(m)]
        lines += [
            f"  metrics: {self.output_dir / 'metrics.json'}",
            f"  checkpoint: {self.ckpt_dir / 'last.pth'}",
            f"  tensorboard --logdir {self.output_dir / 'tensorboard'}",
        ]
        print("\n".join(lines), flush=True)


def resume_command(ckpt: Path) -> str:
    """This process's command line with ``train.resume=<ckpt>`` (replacing any earlier one); under torchrun the
    same torchrun command with that override."""
    args = [a for a in sys.argv[1:] if not a.startswith(("train.resume=", "+train.resume="))]
    prog = sys.argv[0] if sys.argv else "tools/train_cls.py"
    cmd = " ".join(shlex.quote(a) for a in ["python", prog, *args, f"train.resume={ckpt}"])
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        cmd += "   (under torchrun: your torchrun command with the same overrides)"
    return cmd


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hparams(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    keep = ("model", "deq", "schedule", "data", "optim", "sched", "train")
    return {k: v for k, v in cfg.items() if k in keep}

