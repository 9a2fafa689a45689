"""Building the segmentation model of a run: a preset, optionally initialised from published or local
segmentation weights, or its backbone from ImageNet classification weights (transfer learning)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..models.convert import StateDictMismatch
from ..models.segmentation import create_segmentation_model, list_segmentation_models
from .model_config import check_mdeq_kwargs, set_kwargs
from .weight_files import WEIGHTS_FORMATS, names_a_file
from .weights import freeze_groups, load_backbone_weights, read_state_dict

__all__ = ["build_segmentation_model", "load_classification_backbone", "SEG_HEAD"]

_log = logging.getLogger("mdeq.train")

SEG_HEAD = "last_layer"           # the segmentation head (absent from classification weights)
SEG_CLASSIFIER = "last_layer.3"   # its last conv: the only part that depends on the number of classes


def load_classification_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Copy the backbone tensors of classification weights into a segmentation model.

    Like the original (``MODEL.PRETRAINED``), the classification head is ignored and the segmentation head
    keeps its init. Unlike it, nothing fails silently: a backbone tensor of another shape (another preset)
    raises, and so does weights sharing no backbone tensor with the model. Returns counts for the log.
    """
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith((SEG_HEAD + ".",) + model.addon_prefixes())]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in backbone
             if k in state_dict and state_dict[k].shape != own[k].shape]
    if wrong:
        raise StateDictMismatch(f"the classification weights are for another architecture: {len(wrong)} backbone "
                                f"tensors have other shapes, e.g. {wrong[:3]}")
    loaded = [k for k in backbone if k in state_dict]
    if not loaded:
        raise StateDictMismatch(f"none of the {len(backbone)} backbone tensors of this model is in the "
                                f"classification weights (keys such as {list(state_dict)[:3]}); is it an MDEQ "
                                f"checkpoint?")
    model.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    missing = [k for k in backbone if k not in state_dict]
    return dict(loaded=len(loaded), backbone=len(backbone), missing=missing)


def _classification_state_dict(source: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Weights from a local file (checkpoint, safetensors, official .pkl) or a timm name with a tag."""
    path = Path(source)
    if names_a_file(source):
        accepted = f"classification weights: {WEIGHTS_FORMATS}; or a timm tag such as mdeq_small.in1k_official"
        return read_state_dict(path, accepted=accepted), str(path)
    if "." not in source:
        raise FileNotFoundError(f"model.backbone={source!r} is neither a file nor a pretrained timm tag such as "
                                f"mdeq_small.in1k_official")
    import timm

    return timm.create_model(source, pretrained=True).state_dict(), f"timm {source}"


def build_segmentation_model(model_cfg: Mapping[str, Any], num_classes: int,
                             kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model of a ``model`` config (name, kwargs, pretrained, weights, backbone, freeze) and what was loaded;
    ``kwargs``: the architecture keywords resolved (``model_config.architecture_kwargs``; default: the config's set
    ones).

    - ``pretrained``: a published segmentation tag (or true for the first) from the zoo catalog;
    - ``weights``: a local file with full segmentation weights (a training checkpoint of this package,
      safetensors, an official Cityscapes .pkl); with another number of classes the last conv is new;
    - ``backbone``: ImageNet classification weights (file or ``arch.tag``) for the backbone only.
    """
    name = model_cfg["name"]
    if name not in list_segmentation_models():
        raise ValueError(f"model.name={name!r} is not a segmentation preset; choose one of "
                         f"{list_segmentation_models()}")
    sources = [k for k in ("pretrained", "weights", "backbone") if model_cfg.get(k)]
    if len(sources) > 1:
        raise ValueError(f"set at most one of model.pretrained, model.weights, model.backbone (got {sources})")
    kwargs = dict(set_kwargs(model_cfg) if kwargs is None else kwargs)  # MDEQConfig fields (skip_init, dropout, ...)
    check_mdeq_kwargs(kwargs, name)
    info: Dict[str, Any] = dict(log=[], summary="random init")
    pretrained = model_cfg.get("pretrained")
    model = create_segmentation_model(name, num_classes=num_classes, pretrained=pretrained or False, **kwargs)
    if pretrained:
        info["summary"] = f"published segmentation weights {name}.{pretrained if isinstance(pretrained, str) else ''}"
    elif model_cfg.get("weights"):
        path = model_cfg["weights"]
        sd = read_state_dict(path, prefer_ema=bool(model_cfg.get("ema_weights")))
        fresh, _ = load_backbone_weights(model, sd, head_names=(SEG_CLASSIFIER,))
        fresh = [k for k in fresh if k.startswith(SEG_CLASSIFIER + ".")]
        info["summary"] = f"segmentation weights {path}" + (f" (new {num_classes}-class classifier)" if fresh else "")
    elif model_cfg.get("backbone"):
        sd, what = _classification_state_dict(str(model_cfg["backbone"]))
        counts = load_classification_backbone(model, sd)
        info.update(counts)
        info["summary"] = f"backbone from {what}: {counts['loaded']}/{counts['backbone']} tensors"
        if counts["missing"]:
            _log.warning("%d backbone tensors are not in %s and keep their init, e.g. %s", len(counts["missing"]),
                         what, counts["missing"][:3])
    info["log"].append(f"model {name} ({num_classes} classes): {info['summary']}")
    freeze_groups(model, model_cfg.get("freeze") or [])
    return model, info
