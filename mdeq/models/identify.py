"""Which preset a state dict is: its names and shapes compared with those of every preset of its task, each
built on the meta device (no memory, no init).

The model files register how to build a preset of their task (``register_preset_builder``), so this module
needs no import of them and the converter (``pretrained.official_converter``) can check a download against
the presets without an import circle.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch
from torch import nn

from .config import CLS_PRESETS, SEG_PRESETS
from .convert import (StateDictMismatch, convert_official_state_dict, describe_mismatch, is_official_state_dict,
                      state_shapes)

__all__ = ["TASKS", "register_preset_builder", "build_preset", "infer_preset"]

TASKS = {"cls": CLS_PRESETS, "seg": SEG_PRESETS}
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_preset_builder(task: str, build: Callable[..., nn.Module]) -> None:
    """``build(name, num_classes=..., device=...)`` makes preset ``name`` of ``task`` ('cls' or 'seg')."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    _BUILDERS[task] = build


def build_preset(name: str, task: str, num_classes: int, device: str = "meta") -> nn.Module:
    """Preset ``name`` of ``task`` with ``num_classes`` outputs (on the meta device by default)."""
    if name not in TASKS.get(task, {}):
        raise ValueError(f"{name!r} is not a {task} preset; choose one of {sorted(TASKS.get(task, {}))}")
    return _BUILDERS[task](name, num_classes=num_classes, device=device)


def infer_preset(sd: Mapping[str, torch.Tensor]) -> Tuple[str, str, int]:
    """(preset name, task 'cls' | 'seg', num_classes) whose state dict has exactly these names and shapes."""
    sd = convert_official_state_dict(sd) if is_official_state_dict(sd) else dict(sd)
    shapes = state_shapes(sd)
    if "classifier.weight" in shapes:
        task, num_classes = "cls", shapes["classifier.weight"][0]
    elif "last_layer.3.weight" in shapes:
        task, num_classes = "seg", shapes["last_layer.3.weight"][0]
    else:
        raise StateDictMismatch("cannot tell the task: the checkpoint has neither 'classifier.weight' "
                                "(classification) nor 'last_layer.3.weight' (segmentation)")
    tried = []
    for name in TASKS[task]:
        model_shapes = state_shapes(build_preset(name, task, num_classes).state_dict())
        if model_shapes == shapes:
            return name, task, num_classes
        tried.append(f"{name}: {describe_mismatch(model_shapes, shapes, limit=3)}")
    raise StateDictMismatch("no preset matches the checkpoint's names and shapes:\n  " + "\n  ".join(tried))
