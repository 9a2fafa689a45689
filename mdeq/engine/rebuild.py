"""One function turns a training checkpoint into its model: ``model_from_checkpoint``.

Every tool, benchmark and test that needs a checkpoint's model uses it. The checkpoint is enough: its identity
says what the model is (architecture, classes, architecture kwargs such as ``skip_init`` or ``student``, task),
its weights load strictly, and its config's DEQ settings and training schedule configure the model as the
run evaluated it (DEQ mode, or unrolled if the run never left pre-training). Checkpoints of older formats are
upgraded on load (``legacy.upgrade_checkpoint``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import timm
from torch import nn

from ..models import create_segmentation_model, describe_mismatch, state_shapes
from .checkpoint import CheckpointError, load_checkpoint
from .deq_schedule import DEQSchedule, ExplicitSchedule, schedule_for
from .weight_files import CHECKPOINT_FORMATS, describe_content, weights_file_error

__all__ = ["LoadedModel", "model_from_checkpoint", "TASK_BUILDERS", "is_training_checkpoint",
           "require_training_checkpoint"]

# task -> build(arch, num_classes, **model_kwargs)
TASK_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "classification": lambda arch, num_classes, **kw: timm.create_model(arch, num_classes=num_classes, **kw),
    "segmentation": lambda arch, num_classes, **kw: create_segmentation_model(arch, num_classes=num_classes, **kw),
}


@dataclass
class LoadedModel:
    """A model ready for ``eval()``, with what its source says about data and solver settings."""

    model: nn.Module
    arch: str
    description: str
    classes: Optional[List[str]] = None          # class names in index order (training checkpoints)
    data_cfg: Optional[Dict[str, Any]] = None    # the transforms' data config used in training
    config: Optional[Dict[str, Any]] = None      # the training run's config
    data_setup: Optional[Dict[str, int]] = None  # what it trained with: batch size per process, processes, ...
    schedule: Optional[Union[DEQSchedule, ExplicitSchedule]] = None
    step: int = 0
    task: str = "classification"
    extra: Dict[str, Any] = field(default_factory=dict)


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "identity" in obj and "model" in obj


def require_training_checkpoint(obj: Any, where: str) -> None:
    """Raise ``WeightsFileError`` saying what ``obj`` (the content of file ``where``) is, unless it is a training
    checkpoint of this package."""
    if not is_training_checkpoint(obj):
        raise weights_file_error(where, f"it is {describe_content(obj)}, not a training checkpoint of this package "
                                        f"(it has no identity and model entries)", "checkpoint", CHECKPOINT_FORMATS)


def model_from_checkpoint(source: Union[str, Path, Mapping[str, Any]], use_ema: bool = False,
                          arch_overrides: Optional[Mapping[str, Any]] = None,
                          where: Optional[str] = None) -> LoadedModel:
    """The model of a training checkpoint (a path or the loaded dict), with its weights and the run's
    evaluation settings (``schedule.apply_eval`` at the checkpoint's step).

    ``use_ema`` takes the EMA weights. ``arch_overrides`` change architecture fields, e.g. ``student=True`` to
    distil into the model: weights the checkpoint lacks may then only be the model's add-ons
    (``addon_prefixes``), which keep their init; anything else missing, unexpected or mis-shaped is an error.
    ``where`` names a loaded dict's file in messages.
    """
    path = where or ("the checkpoint" if isinstance(source, Mapping) else str(source))
    ckpt = source if isinstance(source, Mapping) else load_checkpoint(source)
    require_training_checkpoint(ckpt, path)
    ident, cfg = ckpt["identity"], ckpt["config"]
    task = ident.get("task", "classification")
    if task not in TASK_BUILDERS:
        raise CheckpointError(f"{path}: unknown task {task!r}; known: {sorted(TASK_BUILDERS)}")
    kwargs = {**dict(ident.get("model_kwargs") or {}), **dict(arch_overrides or {})}
    model = TASK_BUILDERS[task](ident["arch"], ident["num_classes"], **kwargs)
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("model_ema") is None:
            raise CheckpointError(f"{path} has no EMA weights (the run had train.ema.enabled=false)")
        weights = ckpt["model_ema"]
    _load(model, weights, allow_missing=tuple(getattr(model, "addon_prefixes", lambda: ())()) if arch_overrides
          else (), where=path)
    schedule = schedule_for(cfg, model)
    step = int(ckpt["progress"]["step"])
    schedule.apply_eval(model, step)
    return LoadedModel(model=model, arch=ident["arch"], description=f"training checkpoint {path} (step {step})",
                       classes=ckpt.get("classes"), data_cfg=ckpt.get("data_cfg"), config=cfg,
                       data_setup=ckpt.get("data_setup"), schedule=schedule,
                       step=step, task=task,
                       extra=dict(palette=ckpt.get("palette"), ignore_index=ckpt.get("ignore_index")))


def _load(model: nn.Module, weights: Mapping[str, Any], allow_missing: tuple, where: str) -> None:
    """Load ``weights``: names and shapes must be the model's (BatchNorm step counters aside: frozen BatchNorm has
    none), except that keys under ``allow_missing`` may be absent."""
    expected = {k: v for k, v in state_shapes(model.state_dict()).items()
                if k in weights or not k.startswith(allow_missing)}
    mismatch = describe_mismatch(expected, state_shapes(weights), limit=5)
    if mismatch != "matches":
        raise CheckpointError(f"the weights of {where} do not fit the model its identity describes: {mismatch}")
    model.load_state_dict(weights, strict=False)
