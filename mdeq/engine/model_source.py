"""Building a model for evaluation from what the user points at: a training checkpoint of this package,
a local weights file (safetensors, a state dict, an official MDEQ checkpoint) or a timm name with a tag."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from torch import nn

from ..models.convert import infer_preset, load_converted
from .checkpoint import load_checkpoint
from .deq_schedule import DEQSchedule
from .weights import read_state_dict, state_dict_from

__all__ = ["LoadedModel", "load_model_for_eval", "load_segmentation_model_for_eval"]


@dataclass
class LoadedModel:
    """A model ready for ``eval()``, with what its source says about data and solver settings."""

    model: nn.Module
    arch: str
    description: str
    classes: Optional[List[str]] = None          # class names in index order (training checkpoints)
    data_cfg: Optional[Dict[str, Any]] = None    # the transforms' data config used in training
    config: Optional[Dict[str, Any]] = None      # the training run's config
    schedule: Optional[DEQSchedule] = None
    step: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def load_model_for_eval(source: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                        use_ema: bool = False) -> LoadedModel:
    path = Path(source)
    if path.is_file():
        raw = _read_file(path)
        if isinstance(raw, dict) and "identity" in raw and "model" in raw:
            if raw["identity"].get("task", "classification") != "classification":
                raise ValueError(f"{path} is a {raw['identity']['task']} checkpoint; eval_cls evaluates classifiers "
                                 f"(use tools/eval_seg.py)")
            return _from_training_checkpoint(path, raw, use_ema)
        if use_ema:
            raise ValueError(f"--ema needs a training checkpoint with EMA weights; {path} is a plain weights file")
        sd = state_dict_from(raw, path) if raw is not None else read_state_dict(path)
        return _from_weights_file(path, sd, model_name, num_classes)
    if path.suffix in (".pth", ".pt", ".pkl", ".bin", ".safetensors", ".tar") or "/" in source:
        raise FileNotFoundError(f"{source} does not exist (expected a checkpoint or weights file, or a timm model "
                                f"name such as mdeq_small.<tag>)")
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    model = timm.create_model(source, pretrained="." in source, **kwargs)
    return LoadedModel(model=model, arch=source.split(".")[0], description=f"timm model {source}")


def _from_training_checkpoint(path: Path, ckpt: Dict[str, Any], use_ema: bool) -> LoadedModel:
    from .trainer import build_schedule

    ident, cfg = ckpt["identity"], ckpt["config"]
    model = timm.create_model(ident["arch"], num_classes=ident["num_classes"], **_model_kwargs(ident, cfg))
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("model_ema") is None:
            raise ValueError(f"{path} has no EMA weights (the run had train.ema.enabled=false)")
        weights = ckpt["model_ema"]
    model.load_state_dict(weights)
    schedule = build_schedule(cfg, model)
    step = int(ckpt["progress"]["step"])
    return LoadedModel(model=model, arch=ident["arch"], description=f"training checkpoint {path} (step {step})",
                       classes=ckpt.get("classes"), data_cfg=ckpt.get("data_cfg"), config=cfg, schedule=schedule,
                       step=step)


def _from_weights_file(path: Path, sd: Dict[str, torch.Tensor], model_name: Optional[str],
                       num_classes: Optional[int]) -> LoadedModel:
    if model_name is None:
        name, task, n = infer_preset(sd)
        if task != "cls":
            raise ValueError(f"{path} holds a segmentation model; eval_cls evaluates classifiers")
        model_name = name
    if num_classes is None:
        if "classifier.weight" not in sd:
            raise ValueError(f"{path} has no classifier.weight; pass the number of classes")
        num_classes = int(sd["classifier.weight"].shape[0])
    model = timm.create_model(model_name, num_classes=num_classes)
    load_converted(model, sd)
    return LoadedModel(model=model, arch=model_name.split(".")[0], description=f"weights file {path}")


def load_segmentation_model_for_eval(source: str, model_name: Optional[str] = None,
                                     num_classes: Optional[int] = None, use_ema: bool = False) -> LoadedModel:
    """A segmentation model from a ``train_seg`` checkpoint, a weights file (safetensors, state dict, or an
    official Cityscapes checkpoint; the preset is inferred unless ``model_name`` is given) or a published
    tag ``arch.tag`` (e.g. ``mdeq_small.cityscapes_official``)."""
    from ..models.segmentation import create_segmentation_model, list_segmentation_models

    path = Path(source)
    if path.is_file():
        raw = _read_file(path)
        if isinstance(raw, dict) and "identity" in raw and "model" in raw:
            return _seg_from_training_checkpoint(path, raw, use_ema)
        if use_ema:
            raise ValueError(f"--ema needs a training checkpoint with EMA weights; {path} is a plain weights file")
        sd = state_dict_from(raw, path) if raw is not None else read_state_dict(path)
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
    if path.suffix in (".pth", ".pt", ".pkl", ".bin", ".safetensors", ".tar") or "/" in source:
        raise FileNotFoundError(f"{source} does not exist (expected a checkpoint or weights file, or a published "
                                f"tag such as mdeq_small.cityscapes_official)")
    arch, _, tag = source.partition(".")
    if arch not in list_segmentation_models():
        raise ValueError(f"{source!r}: {arch!r} is not a segmentation preset ({list_segmentation_models()})")
    model = create_segmentation_model(arch, num_classes=num_classes or 19, pretrained=tag or True)
    return LoadedModel(model=model, arch=arch, description=f"published weights {source}")


def _seg_from_training_checkpoint(path: Path, ckpt: Dict[str, Any], use_ema: bool) -> LoadedModel:
    from ..models.segmentation import create_segmentation_model
    from .trainer import build_schedule

    ident, cfg = ckpt["identity"], ckpt["config"]
    if ident.get("task") != "segmentation":
        raise ValueError(f"{path} is a {ident.get('task', 'classification')} checkpoint; eval_seg evaluates "
                         f"segmentation models (use tools/eval_cls.py)")
    model = create_segmentation_model(ident["arch"], num_classes=ident["num_classes"], **_model_kwargs(ident, cfg))
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("model_ema") is None:
            raise ValueError(f"{path} has no EMA weights (the run had train.ema.enabled=false)")
        weights = ckpt["model_ema"]
    model.load_state_dict(weights)
    schedule = build_schedule(cfg, model)
    step = int(ckpt["progress"]["step"])
    return LoadedModel(model=model, arch=ident["arch"], description=f"training checkpoint {path} (step {step})",
                       classes=ckpt.get("classes"), data_cfg=ckpt.get("data_cfg"), config=cfg, schedule=schedule,
                       step=step, extra=dict(palette=ckpt.get("palette"), ignore_index=ckpt.get("ignore_index")))


def _model_kwargs(ident: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The identity's model kwargs, with the run's ``deq.init`` (checkpoints written before the identity
    recorded it lack the Skip DEQ predictor's setting)."""
    from .base_trainer import model_deq_options

    kwargs = dict(ident.get("model_kwargs") or {})
    init = model_deq_options(cfg).get("init", "zeros")
    if init != "zeros" and "init" not in dict(kwargs.get("deq") or {}):
        kwargs["deq"] = {**dict(kwargs.get("deq") or {}), "init": init}
    return kwargs


def _read_file(path: Path) -> Optional[Any]:
    """The unpickled content of a .pth/.pkl-style file (a training checkpoint or a state dict), or None when it is
    safetensors or not a safe pickle (``read_state_dict`` then reads it and reports what is wrong)."""
    if path.suffix == ".safetensors":
        return None
    try:
        return load_checkpoint(path)
    except Exception:
        return None
