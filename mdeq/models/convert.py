"""Converting the released MDEQ checkpoints (locuslab/mdeq v1, locuslab/deq v2) to this package's state dicts.

Formats handled (detected from the keys):

* v2 classification: the model's own ``state_dict`` (weight norm as ``X.weight_g`` / ``X.weight_v``);
* v1: the same plus duplicates ``fullstage_copy.*``, ``deq.func.*``, ``deq.func_copy.*`` (dropped);
* segmentation ``FullModel``: everything under ``model.`` plus ``loss.*`` (prefix stripped, loss dropped);
* a ``module.`` prefix from (Distributed)DataParallel, and a ``{"state_dict": ...}`` wrapper.

Module names are the original's, so the only renaming is weight norm: ``X.weight_g`` ->
``X.parametrizations.weight.original0`` and ``X.weight_v`` -> ``X.parametrizations.weight.original1``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "convert_official_state_dict",
    "to_official_state_dict",
    "is_official_state_dict",
    "load_converted",
    "state_shapes",
    "describe_mismatch",
    "StateDictMismatch",
]

_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"
_DUPLICATE_PREFIXES = ("fullstage_copy.", "deq.")


class StateDictMismatch(ValueError):
    """A converted checkpoint does not fit the model; the message lists what is missing or unexpected."""


def _unwrap(sd: Mapping) -> Mapping:
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        return sd["state_dict"]
    return sd


def is_official_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in one of the original formats (needs ``convert_official_state_dict``)."""
    sd = _unwrap(sd)
    return any(
        k.endswith((".weight_g", ".weight_v")) or k.startswith(_DUPLICATE_PREFIXES + ("model.", "loss."))
        for k in sd
    )


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Any released MDEQ checkpoint -> a state dict that loads strictly into the matching preset."""
    sd = _unwrap(sd)
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise TypeError("expected a state dict (a mapping of parameter names to tensors)")
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("model.") for k in sd):  # segmentation FullModel(model, loss)
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_DUPLICATE_PREFIXES) or k.startswith("loss."):
            continue
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + _G
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + _V
        out[k] = v
    if not out:
        raise ValueError("the checkpoint holds no MDEQ weights (after dropping duplicates and the loss)")
    return out


def to_official_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This package's state dict -> the original v2 names (weight_g / weight_v)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_G):
            k = k[: -len(_G)] + "weight_g"
        elif k.endswith(_V):
            k = k[: -len(_V)] + "weight_v"
        out[k] = v
    return out


def state_shapes(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes, without BatchNorm's step counters: frozen BatchNorm (timm's FrozenBatchNorm2d,
    after fine-tuning with frozen layers) has none, and they carry no weights."""
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def describe_mismatch(expected: Dict[str, Tuple[int, ...]], got: Dict[str, Tuple[int, ...]],
                       limit: Optional[int] = None) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])

    def cut(items: List[str]) -> str:
        shown = items if limit is None else items[:limit]
        more = f" (+{len(items) - len(shown)} more)" if len(items) > len(shown) else ""
        return ", ".join(shown) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing [{cut(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected [{cut(unexpected)}]")
    if wrong:
        parts.append(f"{len(wrong)} with other shapes [{cut([f'{k} {got[k]} vs {expected[k]}' for k in wrong])}]")
    return "; ".join(parts) or "matches"


def load_converted(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Convert if needed and load strictly; a mismatch raises ``StateDictMismatch`` naming every key."""
    sd = convert_official_state_dict(sd) if is_official_state_dict(sd) else dict(sd)
    expected = state_shapes(model.state_dict())
    got = state_shapes(sd)
    if expected != got:
        raise StateDictMismatch(
            f"the checkpoint does not fit {type(model).__name__}: {describe_mismatch(expected, got, limit=20)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    left = [k for k in missing + unexpected if not k.endswith("num_batches_tracked")]
    if left:  # cannot happen after the shape check; a guard against a silent partial load
        raise StateDictMismatch(f"the checkpoint does not fit {type(model).__name__}: {left[:10]}")
