"""Reading model weights from whatever a user has: safetensors, a state dict, a training checkpoint of this
package, or a released official MDEQ checkpoint (converted on the fly)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from ..models.convert import (StateDictMismatch, convert_official_state_dict, describe_mismatch,
                              is_official_state_dict, state_shapes)
from .weight_files import WEIGHTS_FORMATS, describe_content, read_weights_file, weights_file_error

__all__ = ["read_state_dict", "state_dict_from", "load_backbone_weights", "FREEZE_GROUPS", "freeze_groups"]

# parts of an MDEQ model that fine-tuning can freeze (requires_grad off, BatchNorm in eval mode)
FREEZE_GROUPS = {"stem": ["downsample", "stage0"], "cell": ["fullstage"]}


def read_state_dict(path: Union[str, Path], prefer_ema: bool = False,
                    accepted: str = WEIGHTS_FORMATS) -> Dict[str, torch.Tensor]:
    """The model state dict stored in ``path`` (safetensors, or a ``torch.save`` file: .pth/.pt/.pkl/.bin).

    A training checkpoint of this package gives its ``model`` entry (``model_ema`` with ``prefer_ema``);
    an official MDEQ checkpoint is converted to this package's names. A file that is none of these raises
    ``WeightsFileError`` saying what it is and listing ``accepted``.
    """
    return state_dict_from(read_weights_file(path, accepted=accepted), path, prefer_ema, accepted)


def state_dict_from(content: object, path: Union[str, Path], prefer_ema: bool = False,
                    accepted: str = WEIGHTS_FORMATS) -> Dict[str, torch.Tensor]:
    """The model state dict inside an already loaded file's content (see ``read_state_dict``)."""
    sd = content
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):  # a training checkpoint
        sd = sd["model_ema"] if prefer_ema and isinstance(sd.get("model_ema"), Mapping) else sd["model"]
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise weights_file_error(path, f"it is {describe_content(content)}", accepted=accepted)
    if is_official_state_dict(sd):
        sd = convert_official_state_dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_backbone_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                          head_names: Sequence[str] = ("classifier",)) -> Tuple[List[str], List[str]]:
    """Load everything but a head whose shape differs (a new number of classes); strict otherwise.

    The model's add-ons (an MDEQ's ``addon_prefixes``: the Skip DEQ predictor, the C-DEQ student), which weights
    of a plain model lack, count as heads too. Returns (head keys left at their fresh init, keys skipped).
    Raises ``StateDictMismatch`` listing what is missing, unexpected or of the wrong shape in the backbone.
    """
    addons = tuple(p.rstrip(".") for p in getattr(model, "addon_prefixes", lambda: ())())
    head_names = tuple(head_names) + addons
    own = model.state_dict()
    head_keys = [k for k in own if any(k == h or k.startswith(h + ".") for h in head_names)]
    fresh = [k for k in head_keys if k not in state_dict or state_dict[k].shape != own[k].shape]
    skipped = [k for k in state_dict if k not in own and any(k.startswith(h + ".") for h in head_names)]
    body = {k: v for k, v in state_dict.items() if k not in fresh and k not in skipped}
    expected = {k: v for k, v in state_shapes(own).items() if k not in fresh}
    mismatch = describe_mismatch(expected, state_shapes(body), limit=8)
    if mismatch != "matches":
        raise StateDictMismatch(f"the weights do not fit this model (another architecture or preset?): {mismatch}")
    model.load_state_dict(body, strict=False)
    return fresh, skipped


def freeze_groups(model: nn.Module, groups: Sequence[str]) -> None:
    """Freeze the named ``FREEZE_GROUPS`` of ``model`` (timm.utils.freeze: no gradients, BatchNorm frozen).

    For a model without an MDEQ, ``stem`` is what timm's ``group_matcher`` calls the stem (``conv1``, ``bn1`` of a
    ResNet) and ``cell`` is refused: an explicit network has no equilibrium cell.
    """
    groups = list(groups or [])
    unknown = sorted(set(groups) - set(FREEZE_GROUPS))
    if unknown:
        raise ValueError(f"model.freeze accepts {sorted(FREEZE_GROUPS)}, got {unknown}")
    if not groups:
        return
    if getattr(model, "fullstage", None) is not None:
        modules = [m for g in groups for m in FREEZE_GROUPS[g] if getattr(model, m, None) is not None]
    elif not hasattr(model, "group_matcher"):
        raise ValueError(f"model.freeze={groups}: {type(model).__name__} has neither an MDEQ's stem and cell nor "
                         "timm's group_matcher naming its stem; freeze its parameters in its own code")
    else:
        if "cell" in groups:
            raise ValueError(f"model.freeze=[cell] freezes an MDEQ's equilibrium cell; {type(model).__name__} is an "
                             "explicit network without one (model.freeze=[stem] freezes its stem)")
        modules = _stem_modules(model)
    if modules:
        from timm.utils import freeze

        freeze(model, modules)


def _stem_modules(model: nn.Module) -> List[str]:
    """The modules holding the parameters that timm's ``group_matcher()['stem']`` pattern names."""
    pattern = model.group_matcher().get("stem")
    if not pattern:
        raise ValueError(f"model.freeze=[stem]: {type(model).__name__} names no stem (timm's group_matcher)")
    patterns = pattern if isinstance(pattern, (list, tuple)) else [pattern]
    names = [n for n, _ in model.named_parameters() if any(re.match(p, n) for p in patterns)]
    return sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
