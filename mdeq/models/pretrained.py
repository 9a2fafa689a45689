"""Catalog-backed pretrained weights for the timm models: which tags exist, and a verified local file per tag.

The zoo's catalog (``zoo/catalog.json``) lists the published weight sets; each ``arch.tag`` becomes a timm
pretrained cfg whose ``file`` is the verified file in the zoo cache, so timm's own machinery (head
dropping for another ``num_classes``, ``in_chans`` adaptation, ``features_only``) loads it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .convert import convert_official_state_dict
from .identify import infer_preset

__all__ = ["catalog_cfgs", "general_use", "resolve_catalog_weights", "official_converter",
           "fetch_segmentation_weights"]


def _catalog() -> Dict[str, Dict]:
    try:
        from zoo.catalog import load_catalog
    except ImportError:  # the zoo package is not installed: no published weights
        return {}
    return load_catalog()


def catalog_cfgs(arch_prefix: str = "mdeq_") -> Dict[str, Dict[str, Any]]:
    """{'arch.tag': pretrained-cfg overrides} for every classification entry of the catalog (import time)."""
    from zoo.download import cache_dir

    out = {}
    for name, entry in _catalog().items():
        if name.startswith(arch_prefix) and entry.get("task", "classification") == "classification":
            out[name] = dict(_tuples(entry["pretrained_cfg"]), file=str(cache_dir() / entry["file"]),
                             license=entry["license"], description=entry.get("description", ""))
    return out


def general_use(cfg: Dict[str, Any], native: Dict[str, Any]) -> bool:
    """Whether a published weight's cfg may be its architecture's default (timm's first tag): trained at the
    architecture's native input size for its native label set (CIFAR presets 32x32 / 10 classes, ImageNet presets
    224 / 1000). A toy or demo weight (the 16x16 digits) is reached by its tag only, so it never sets the input
    size that ``timm.create_model(arch)`` and ``resolve_data_config`` give."""
    return (tuple(cfg.get("input_size", ())) == tuple(native["input_size"])
            and cfg.get("num_classes") == native["num_classes"])


def _tuples(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """JSON lists back to the tuples timm's cfgs use (input_size, mean, std, pool_size)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def resolve_catalog_weights(variant: str, pretrained_cfg: Any,
                            base_cfg: Dict[str, Any]) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(pretrained cfg, model arguments) for ``variant`` + tag when the catalog has it, with the cfg's ``file``
    set to the fetched, verified weights; None when the tag is not a catalog entry (timm then resolves it as
    usual). The model arguments are the entry's architecture fields (``model_args``) and, as ``deq``, the DEQ
    settings its metrics were measured with."""
    if isinstance(pretrained_cfg, str) or pretrained_cfg is None:
        tag = pretrained_cfg
    else:
        get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
        if any(get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
            return None  # the caller named its own weights (local-dir:, hf-hub:, a cfg with a file)
        tag = getattr(pretrained_cfg, "tag", None) or (pretrained_cfg.get("tag") if isinstance(pretrained_cfg, dict)
                                                       else None)
    catalog = _catalog()
    if tag is None:  # timm's default tag for the architecture (``default_cfgs`` order: see ``general_use``)
        from timm.models import get_pretrained_cfg

        tag = getattr(get_pretrained_cfg(variant), "tag", None)
    name = f"{variant}.{tag}"
    if tag is None or name not in catalog:
        return None
    from zoo.download import fetch

    entry = catalog[name]
    if entry.get("task", "classification") != "classification":
        raise ValueError(f"{name} holds {entry['task']} weights; use mdeq.create_segmentation_model")
    path = fetch(name, catalog, convert=official_converter(variant, "cls"))
    cfg = dict(base_cfg, **_tuples(entry["pretrained_cfg"]), file=str(path), architecture=variant, tag=tag,
               license=entry["license"])
    return cfg, {**dict(entry.get("model_args") or {}), "deq": dict(entry["solver"])}


def official_converter(arch: str, task: str):
    """``convert(upstream, out)`` for ``zoo.download.fetch``: an original MDEQ checkpoint -> safetensors, after
    checking that it is exactly the ``arch`` preset for ``task`` ('cls' or 'seg') and loads strictly."""
    def convert(upstream, out) -> None:
        with open(upstream, "rb") as f:
            head = f.read(512).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<")):
            raise ValueError("the file is a web page, not a checkpoint")
        sd = torch.load(upstream, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"expected a state dict, found {type(sd).__name__}")
        sd = convert_official_state_dict(sd)
        preset, got_task, _ = infer_preset(sd)  # exact names and shapes of a preset, i.e. a strict load
        if (preset, got_task) != (arch, task):
            raise ValueError(f"the file holds {preset} ({got_task}), the catalog entry is {arch} ({task})")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out),
                  metadata={"format": "pt", "arch": arch, "converted_from": "official"})
    return convert


def fetch_segmentation_weights(arch: str, tag: Optional[str] = None):
    """(state dict, entry) of a catalog segmentation entry of ``arch`` (the first one when ``tag`` is None)."""
    from zoo.download import fetch

    catalog = _catalog()
    names = [n for n, e in catalog.items() if n.split(".", 1)[0] == arch and e.get("task") == "segmentation"]
    name = f"{arch}.{tag}" if tag else (names[0] if names else None)
    if name not in names:
        raise ValueError(f"no published segmentation weights {name or arch}; available: {names}")
    path = fetch(name, catalog, convert=official_converter(arch, "seg"))
    return load_file(str(path)), catalog[name]
