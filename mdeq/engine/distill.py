"""Consistency distillation (C-DEQ) of a trained MDEQ classifier: a student that jumps towards z* in 1-4 steps.

``distill_classifier`` takes a training checkpoint of ``train_cls`` (the frozen teacher), rebuilds the model with
a student (``MDEQConfig.student``: per-resolution 1x1-conv generator with a time embedding), and trains only the
student on teacher trajectories of the train images: the teacher's solver runs K steps from zeros with its
iterates recorded (``collect_trajectory``), step k gets the Karras time t_k, and the loss is 0.9 x global
(SmoothL1 of F(z_{t_n}, t_n) to z_K) + 0.1 x local (MSE to an EMA student at t_{n+1}), with n drawn per image.
The result is a checkpoint whose solver is ``consistency`` (``max_iter`` student steps), which ``eval_cls``,
``publish_weights`` and the benchmarks read like any other.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..core import budget_options, collect_trajectory, consistency_losses, distillation_loss, karras_times, make_ema
from ..core.scope import forward_scope
from ..data.classification import build_transform, resolve_data_cfg
from ..data.factory import build_classification_datasets
from ..data.loaders import build_eval_loader, build_train_loader
from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from .distributed import DistEnv
from .evaluate import evaluate_classifier
from .model_config import is_mdeq_name
from .preemption import StopSignals
from .rebuild import model_from_checkpoint, require_training_checkpoint
from .provenance import provenance
from .run_logger import write_json_atomic

__all__ = ["distill_classifier"]

_log = logging.getLogger("mdeq.distill")


def distill_classifier(checkpoint: str, output_dir: Path, env: DistEnv, data_root: Optional[str] = None,
                       teacher_solver: str = "anderson", teacher_steps: int = 16, epochs: int = 10,
                       batch_size: int = 64, lr: float = 4e-3, weight_decay: float = 0.0, ema_decay: float = 0.98,
                       global_weight: float = 0.9, local_weight: float = 0.1, eval_iters: Sequence[int] = (1, 2, 4),
                       seed: int = 0, workers: int = 2, progress: bool = True,
                       student_kernel_size: int = 1, resume: Optional[str] = None,
                       resume_hint: str = "the same command with --resume") -> Dict[str, Any]:
    """Distil a student into the classifier of ``checkpoint``; writes ``distilled.pth`` and ``metrics.json``.

    On SIGTERM / SIGUSR1 / Ctrl-C the current step finishes, ``last.pth`` (the distillation's state) is written
    atomically and ``TrainingStopped`` ends the tool; ``resume=<that file>`` continues bitwise where it stopped
    (``resume_hint``: the command line the message shows)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(checkpoint)
    require_training_checkpoint(ckpt, str(checkpoint))  # else: what the file is, and what is accepted
    if ckpt["identity"].get("task", "classification") != "classification":
        raise ValueError(f"{checkpoint} is not a classification training checkpoint of this package")
    if not is_mdeq_name(ckpt["identity"]["arch"]):
        raise CheckpointError(f"{checkpoint} holds {ckpt['identity']['arch']}, an explicit network: consistency "
                              "distillation trains a C-DEQ student of an MDEQ teacher (an mdeq_* checkpoint)")
    cfg = ckpt["config"]
    torch.manual_seed(seed)
    # the teacher with a student added (the teacher's weights loaded, the student at its init) in the teacher's
    # own DEQ settings, for the comparison below; eval mode: BatchNorm statistics stay the teacher's
    student_arch = dict(student=True, student_kernel_size=int(student_kernel_size))
    loaded = model_from_checkpoint(ckpt, arch_overrides=student_arch, where=str(checkpoint))
    model, schedule, step = loaded.model.to(env.device).eval(), loaded.schedule, loaded.step
    teacher_options = dict(model.deq.options)
    stage = model.fullstage
    student = stage.student
    for p in model.parameters():  # only the student's generator is trained
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)

    # data: the run's train images with eval transforms (the teacher's inputs), and its val set
    train_set, val_set = build_classification_datasets(cfg["data"], env, root=data_root)
    data_cfg = resolve_data_cfg(model, ckpt.get("data_cfg"))
    train_set.transform = val_set.transform = build_transform(data_cfg, False)
    loader = build_train_loader(train_set, batch_size, seed, env.world_size, env.rank, workers)
    val_loader = build_eval_loader(val_set, batch_size, env.world_size, env.rank, workers)

    times = karras_times(teacher_steps, T=student.T, eps=student.eps, rho=student.rho)
    ema = make_ema(student, decay=ema_decay)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    gen = torch.Generator().manual_seed(seed)
    history: List[Dict[str, float]] = []
    pos = dict(epoch=0, batch=0, sums=[0.0, 0.0, 0], seconds=0.0)  # where the run is (what a resume restores)
    settings = dict(teacher=str(checkpoint), teacher_solver=teacher_solver, teacher_steps=teacher_steps,
                    epochs=epochs, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
                    student_kernel_size=int(student_kernel_size), world_size=env.world_size)
    parts = dict(student=student, ema=ema, optimizer=opt, scheduler=sched)
    if resume:
        history, pos = _restore_distill_state(resume, settings, parts, gen)
    last = output_dir / "last.pth"
    t0 = time.perf_counter() - pos["seconds"]
    stop = StopSignals()

    def save_and_stop():
        pos["seconds"] = time.perf_counter() - t0
        _save_and_stop(stop, last, settings, parts, gen, history, pos, env, resume_hint)

    with stop:
        for epoch in range(pos["epoch"], epochs):
            loader.dataset.set_epoch(epoch)
            loader.sampler.set_epoch(epoch, skip=pos["batch"] * loader.batch_size)  # a resumed epoch: the rest
            sums = pos["sums"]
            bar = tqdm(loader, desc=f"distill {epoch + 1}/{epochs}", leave=False, initial=pos["batch"],
                       total=len(loader), disable=not (progress and env.is_main))
            for images, _ in bar:
                images = images.to(env.device)
                with torch.no_grad(), forward_scope(stage):
                    _, inj = model.forward_stem(images)

                    def teacher_step(z, inj=inj):
                        return stage.cell(list(z), inj)

                    traj, z_end = collect_trajectory(teacher_step, stage.initial_state(inj), solver=teacher_solver,
                                                     num_steps=teacher_steps)
                n = torch.randint(0, teacher_steps, (images.shape[0],), generator=gen).to(env.device)
                with forward_scope(stage):
                    g_loss, l_loss = consistency_losses(student, ema, traj, times, n, teacher_step, z_end)
                loss = distillation_loss(g_loss, l_loss, global_weight, local_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema.update_parameters(student)
                sums[0] += g_loss.item()
                sums[1] += l_loss.item()
                sums[2] += 1
                pos["batch"] += 1
                bar.set_postfix(global_loss=f"{g_loss.item():.4f}", local_loss=f"{l_loss.item():.4f}")
                if pos["batch"] < len(loader) and stop.agreed(env):  # the epoch's end is checked below
                    bar.close()
                    save_and_stop()
            bar.close()
            row = dict(epoch=epoch, global_loss=sums[0] / max(sums[2], 1), local_loss=sums[1] / max(sums[2], 1))
            history.append(row)
            _log.info("distill epoch %d: global %.5f local %.5f", epoch, row["global_loss"], row["local_loss"])
            pos.update(epoch=epoch + 1, batch=0, sums=[0.0, 0.0, 0])
            if epoch + 1 < epochs and stop.agreed(env):
                save_and_stop()
    seconds = time.perf_counter() - t0
    student.num_train_steps = teacher_steps

    # compare at equal f-evaluations: the student's k steps vs the teacher's solver with k evaluations
    results: Dict[str, Any] = dict(teacher={}, student={})
    for k in eval_iters:
        model.configure_deq(**budget_options(dict(teacher_options, solver="consistency"), int(k)))
        results["student"][int(k)] = evaluate_classifier(model, val_loader, env, progress=False).top1
        model.configure_deq(**{**teacher_options, **budget_options(teacher_options, int(k))})
        results["teacher"][int(k)] = evaluate_classifier(model, val_loader, env, progress=False).top1
    model.configure_deq(**{**teacher_options, "final_step": False})
    results["teacher"]["converged"] = evaluate_classifier(model, val_loader, env, progress=False).top1

    # the distilled checkpoint: the run's checkpoint with the student and solver='consistency'
    k_default = int(min(eval_iters))
    new_cfg = copy.deepcopy(cfg)
    new_cfg["deq"].update(solver="consistency", max_iter=k_default, solver_options=None)
    new_cfg.setdefault("schedule", {})["eval_max_iter"] = None
    student_kwargs = dict(student=True, student_kernel_size=int(student_kernel_size))
    new_cfg["model"]["kwargs"] = {**dict(new_cfg["model"].get("kwargs") or {}), **student_kwargs}
    ident = dict(ckpt["identity"], model_kwargs={**dict(ckpt["identity"].get("model_kwargs") or {}), **student_kwargs})
    out = dict(ckpt, identity=ident, config=new_cfg, model=model.state_dict(), model_ema=None, optimizer=None,
               scheduler=None, scaler=None,
               distillation=dict(teacher=str(checkpoint), teacher_solver=teacher_solver, teacher_steps=teacher_steps,
                                 epochs=epochs, lr=lr, ema_decay=ema_decay, seconds=seconds))
    out["progress"] = dict(ckpt["progress"], step=max(step, schedule.pretrain_steps))  # evaluated in DEQ mode
    metrics = dict(val_top1_student={str(k): v for k, v in results["student"].items()},
                   val_top1_teacher={str(k): v for k, v in results["teacher"].items()},
                   teacher_solver=teacher_options["solver"], teacher_steps=teacher_steps, distill_seconds=seconds,
                   history=history, default_student_steps=k_default, val_top1=results["student"][k_default],
                   deq_nstep_mean=float(k_default), deq_rel_residual_mean=math.nan, val_top5=None)
    if env.is_main:
        save_atomic(out, output_dir / "distilled.pth")
        write_json_atomic({**metrics, "provenance": provenance()}, output_dir / "metrics.json")
    return metrics


def _save_and_stop(stop: StopSignals, path: Path, settings, parts, gen, history, pos, env, resume_hint: str):
    """Write the distillation's state to ``path`` (rank 0, atomically) and end the tool with ``TrainingStopped``."""
    if env.is_main:
        save_atomic(dict(kind="distillation", settings=settings, history=history, position=pos,
                         generator=gen.get_state(), rng=capture_rng_state(),
                         **{k: v.state_dict() for k, v in parts.items()}), path)
    env.barrier()
    exc = stop.exit(f"the distillation state after epoch {pos['epoch']}, batch {pos['batch']} is in {path}",
                    f"{resume_hint} {path}")
    if env.is_main:
        print(str(exc), file=sys.stderr, flush=True)
    raise exc


def _restore_distill_state(path: str, settings, parts, gen):
    """(history, position) of a stopped distillation, with the student, EMA, optimizer, schedule and random
    state restored; refuses a file of another kind or of other settings."""
    state = load_checkpoint(path)
    if state.get("kind") != "distillation":
        raise ValueError(f"--resume {path} is not a distillation state (tools/distill.py writes one as last.pth in "
                         "its output folder when stopped by a signal)")
    differ = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if differ:
        raise ValueError(f"--resume {path} was written with other settings: "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items()))
    for k, part in parts.items():
        part.load_state_dict(state[k])
    gen.set_state(state["generator"])
    restore_rng_state(state["rng"])
    _log.info("resumed the distillation at epoch %d, batch %d", state["position"]["epoch"],
              state["position"]["batch"])
    return list(state["history"]), dict(state["position"])
