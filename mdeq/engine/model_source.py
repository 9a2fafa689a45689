"""Building a model for evaluation from what the user points at: a training checkpoint of this package
(``rebuild.model_from_checkpoint``), a local weights file (safetensors, a state dict, an official MDEQ
checkpoint) or a timm name with a tag."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from timm.models import get_pretrained_cfg_value

from ..models import (StateDictMismatch, create_segmentation_model, infer_preset, list_segmentation_models,
                      load_converted)
from .legacy import upgrade_checkpoint
from .rebuild import LoadedModel, is_training_checkpoint, model_from_checkpoint
from .weight_files import WEIGHTS_FORMATS, names_a_file, read_weights_file
from .weights import state_dict_from

__all__ = ["LoadedModel", "load_model_for_eval", "load_segmentation_model_for_eval"]


def load_model_for_eval(source: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                        use_ema: bool = False) -> LoadedModel:
    path = Path(source)
    if names_a_file(source):
        accepted = f"{WEIGHTS_FORMATS}; or a timm model name with a pretrained tag, e.g. mdeq_small.<tag>"
        raw = _read_file(path, accepted)
        if is_training_checkpoint(raw):
            if raw["identity"].get("task", "classification") != "classification":
                raise ValueError(f"{path} is a {raw['identity']['task']} checkpoint; eval_cls evaluates classifiers "
                                 f"(use tools/eval_seg.py)")
            return model_from_checkpoint(raw, use_ema, where=str(path))
        if use_ema:
            raise ValueError(f"--ema needs a training checkpoint with EMA weights; {path} is a plain weights file")
        return _from_weights_file(path, state_dict_from(raw, path, accepted=accepted), model_name, num_classes)
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    model = timm.create_model(source, pretrained="." in source, **kwargs)
    return LoadedModel(model=model, arch=source.split(".")[0], description=f"timm model {source}")


def _from_weights_file(path: Path, sd: Dict[str, torch.Tensor], model_name: Optional[str],
                       num_classes: Optional[int]) -> LoadedModel:
    if model_name is None:
        try:
            name, task, n = infer_preset(sd)
        except StateDictMismatch as e:
            raise StateDictMismatch(f"{path}: {e}\n(the weights of another timm model, e.g. resnet18, need its name: "
                                    f"--model resnet18)") from None
        if task != "cls":
            raise ValueError(f"{path} holds a segmentation model; eval_cls evaluates classifiers")
        model_name = name
    if num_classes is None:
        head = f"{_classifier_name(model_name)}.weight"
        if head not in sd:
            raise ValueError(f"{path} has no {head} (the classifier of {model_name}); pass the number of classes")
        num_classes = int(sd[head].shape[0])
    model = timm.create_model(model_name, num_classes=num_classes)
    load_converted(model, sd)
    return LoadedModel(model=model, arch=model_name.split(".")[0], description=f"weights file {path}")


def _classifier_name(model_name: str) -> str:
    """The classifier module of a timm architecture (its pretrained cfg's ``classifier``: ``fc`` for a ResNet)."""
    try:
        head = get_pretrained_cfg_value(model_name, "classifier")
    except RuntimeError:  # no registered cfg (hf-hub:, local-dir:)
        head = None
    return head[0] if isinstance(head, (list, tuple)) else head or "classifier"


def load_segmentation_model_for_eval(source: str, model_name: Optional[str] = None,
                                     num_classes: Optional[int] = None, use_ema: bool = False) -> LoadedModel:
    """A segmentation model from a ``train_seg`` checkpoint, a weights file (safetensors, state dict, or an
    official Cityscapes checkpoint; the preset is inferred unless ``model_name`` is given) or a published
    tag ``arch.tag`` (e.g. ``mdeq_small.cityscapes_official``)."""
    path = Path(source)
    if names_a_file(source):
        accepted = f"{WEIGHTS_FORMATS}; or a published tag such as mdeq_small.cityscapes_official"
        raw = _read_file(path, accepted)
        if is_training_checkpoint(raw):
            if raw["identity"].get("task") != "segmentation":
                raise ValueError(f"{path} is a {raw['identity'].get('task', 'classification')} checkpoint; eval_seg "
                                 f"evaluates segmentation models (use tools/eval_cls.py)")
            return model_from_checkpoint(raw, use_ema, where=str(path))
        if use_ema:
            raise ValueError(f"--ema needs a training checkpoint with EMA weights; {path} is a plain weights file")
        sd = state_dict_from(raw, path, accepted=accepted)
        if model_name is None:
            model_name, task, _ = infer_preset(sd)
            if task != "seg":
                raise ValueError(f"{path} holds a classification model; eval_seg evaluates segmentation models")
        if "last_layer.3.weight" not in sd:
            raise ValueError(f"{path} has no segmentation head (last_layer.3.weight)")
        classes = int(sd["last_layer.3.weight"].shape[0])
        if num_classes is not None and num_classes != classes:
            raise ValueError(f"{path} predicts {classes} classes, not {num_classes}")
        model = create_segmentation_model(model_name, num_classes=classes)
        load_converted(model, sd)
        return LoadedModel(model=model, arch=model_name, description=f"weights file {path}")
    arch, _, tag = source.partition(".")
    if arch not in list_segmentation_models():
        raise ValueError(f"{source!r}: {arch!r} is not a segmentation preset ({list_segmentation_models()})")
    model = create_segmentation_model(arch, num_classes=num_classes or 19, pretrained=tag or True)
    return LoadedModel(model=model, arch=arch, description=f"published weights {source}")


def _read_file(path: Path, accepted: str) -> Any:
    """The content of a weights or checkpoint file, a training checkpoint upgraded to the current format; a file
    that is not one raises ``WeightsFileError`` saying what it is."""
    raw = read_weights_file(path, accepted=accepted)
    return upgrade_checkpoint(raw) if is_training_checkpoint(raw) else raw
