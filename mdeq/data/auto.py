"""Data-aware training defaults: the input size, the training crop and the eval crop chosen from the images, for a
run that leaves them to the data (``auto`` in ``data.overrides`` and ``data.aug``).

A fixed default cannot serve both ImageNet photos and 28-pixel scans: a random-resized crop down to 8% of the area
(ImageNet's) cuts a 32-pixel digit to a 9-pixel scrap, and training a 32-pixel image at 224 costs 49x for nothing.
The run measures its images' median shorter side (``inspect.typical_image_size``) and chooses:

* ``input_size``: that side, rounded to a size the model takes (a multiple of an MDEQ's ``size_divisor``), at least
  ``MIN_INPUT`` and at most the model's pretrained-cfg size (so ImageNet-sized images train at 224 and a published
  16x16 weight keeps its size); a model whose cfg says ``fixed_input_size`` (a ViT) keeps its size;
* the training crop (``aug.policy``): for inputs up to ``SMALL_INPUT`` pixels the CIFAR crop (``pad_crop``: pad 1/8
  of the side, random crop back), evaluated on the whole image (``crop_pct`` 1); larger inputs a random-resized
  crop (``rrc``) whose smallest crop keeps ImageNet's smallest in pixels (8% of 224², about ``MIN_CROP_SIDE`` px a
  side), so mid-sized images are not cut to scraps either. Setting ``scale``/``ratio`` (``padding``) picks ``rrc``
  (``pad_crop``).

Every choice is logged with its reason and any of them can be set instead (``data.overrides.input_size=64``,
``data.aug.policy=rrc``, ...). An explicit augmentation that would crop an image to under ``MIN_CROP_PIXELS`` is
refused before training starts. Nothing here decodes pixels; it works on the measured side only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .classification import CROP_POLICIES

__all__ = ["AUTO", "SMALL_INPUT", "MIN_INPUT", "MIN_CROP_SIDE", "MIN_CROP_PIXELS", "DataChoices", "choose_input_size",
           "choose_training_crop", "check_crop_size", "resolve_data_choices"]

AUTO = "auto"
SMALL_INPUT = 64        # inputs up to this side get the CIFAR crop (pad + random crop) and are evaluated whole
MIN_INPUT = 16          # the smallest input size chosen (8x8 scans train at 16x16, as the digits recipe)
MIN_CROP_SIDE = 63      # ImageNet's smallest random-resized crop: 8% of 224x224 is about 63 px a side
MIN_CROP_PIXELS = 4     # an explicit augmentation cropping under this many pixels a side is refused
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass
class DataChoices:
    """What a run trains and evaluates at: ``overrides`` for ``resolve_data_cfg`` (input_size, crop_pct, ...), the
    training ``aug`` options (with ``policy`` resolved), and why (one line per automatic choice)."""

    overrides: Dict[str, Any]
    aug: Dict[str, Any]
    reasons: List[str] = field(default_factory=list)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == AUTO


def choose_input_size(image_side: Optional[int], cfg_side: int, divisor: int = 1, fixed: bool = False
                      ) -> Tuple[int, str]:
    """(input side, why) for images whose median shorter side is ``image_side`` (None: unknown) and a model whose
    pretrained cfg says ``cfg_side``, taking multiples of ``divisor`` (``fixed``: only its cfg size)."""
    if fixed:
        return cfg_side, f"the model takes only its cfg's input size ({cfg_side})"
    if not image_side:
        return cfg_side, "the images' size is unknown: the model's cfg size"
    divisor = max(int(divisor), 1)
    side = min(max(int(image_side), MIN_INPUT), cfg_side)
    side = max(divisor, int(round(side / divisor)) * divisor)
    if image_side >= cfg_side:
        why = f"the model's cfg size: the images (median shorter side {image_side} px) are at least as large"
    elif side == image_side:
        why = f"the images' own size (median shorter side {image_side} px)"
    else:
        why = (f"the images' median shorter side {image_side} px" + (f", at least {MIN_INPUT}" if
               image_side < MIN_INPUT else "") + (f", as a multiple of {divisor} (the model's size divisor)"
                                                 if divisor > 1 else ""))
    return side, why


def choose_training_crop(aug: Mapping[str, Any], input_side: int, image_side: Optional[int]
                         ) -> Tuple[Dict[str, Any], Optional[float], List[str]]:
    """The training augmentation with ``policy`` resolved (and the crop options it needs), the eval ``crop_pct`` that
    goes with it (None: the model's), and the reasons of the automatic choices."""
    aug = {k: v for k, v in dict(aug).items() if v is not None}
    reasons: List[str] = []
    policy = aug.get("policy", AUTO)
    if _is_auto(policy):
        if "scale" in aug or "ratio" in aug:
            policy, why = "rrc", "data.aug.scale/ratio are set"
        elif "padding" in aug:
            policy, why = "pad_crop", "data.aug.padding is set"
        elif input_side <= SMALL_INPUT:
            policy, why = "pad_crop", (f"a {input_side}-px input is small: a random-resized crop would cut it to "
                                       "scraps")
        else:
            policy, why = "rrc", f"a {input_side}-px input is large enough for random-resized crops"
        reasons.append(f"training crop: {policy} ({why})")
    elif policy not in CROP_POLICIES:
        raise ValueError(f"data.aug.policy must be auto or one of {list(CROP_POLICIES)}, got {policy!r}")
    aug["policy"] = policy
    crop_pct: Optional[float] = None
    if policy == "pad_crop":
        if "padding" not in aug:
            aug["padding"] = max(input_side // 8, 1)
            reasons.append(f"padding {aug['padding']} px (1/8 of the input side), random crop back, as CIFAR training")
        crop_pct = 1.0
    else:
        if "scale" not in aug:
            low = IMAGENET_SCALE[0]
            if image_side:
                low = min(1.0, max(low, (MIN_CROP_SIDE / image_side) ** 2))
            aug["scale"] = [round(low, 3), 1.0]
            reasons.append(f"crop scale [{aug['scale'][0]}, 1.0]: the smallest crop keeps about {MIN_CROP_SIDE} px a "
                           "side, as ImageNet's 8% of 224x224" if image_side else
                           "crop scale [0.08, 1.0] (ImageNet's)")
        aug.setdefault("ratio", list(IMAGENET_RATIO))
    return aug, crop_pct, reasons


def check_crop_size(aug: Mapping[str, Any], image_side: Optional[int], input_side: int) -> None:
    """Refuse a training crop that leaves under ``MIN_CROP_PIXELS`` pixels a side of an image of ``image_side``."""
    if aug.get("policy") == "pad_crop":
        pad = aug.get("padding")
        if pad is not None and not 0 <= int(pad) < input_side // 2:
            raise ValueError(f"data.aug.padding={pad} on a {input_side}-px input leaves under half of the image in "
                             f"some crops; use 0 <= padding < {input_side // 2} (auto: 1/8 of the side)")
        return
    if not image_side:
        return
    low = float(aug.get("scale", IMAGENET_SCALE)[0])
    ratio = aug.get("ratio", IMAGENET_RATIO)
    side = math.sqrt(max(low, 0.0) * image_side ** 2 * min(float(ratio[0]), 1.0 / float(ratio[1])))
    if side < MIN_CROP_PIXELS:
        need = (MIN_CROP_PIXELS / image_side) ** 2 / min(float(ratio[0]), 1.0 / float(ratio[1]))
        raise ValueError(
            f"data.aug.scale={list(aug.get('scale', IMAGENET_SCALE))} crops images of about {image_side} px (their "
            f"median shorter side) down to {side:.1f} px a side, which leaves nothing to learn from; use a scale of at "
            f"least {min(need, 1.0):.2f}, or data.aug.policy=pad_crop (or auto) for small images")


def resolve_data_choices(data_cfg: Mapping[str, Any], cfg_side: int, image_side: Optional[int], divisor: int = 1,
                         fixed_input_size: bool = False) -> DataChoices:
    """The data choices of a run: ``data_cfg`` (the ``data`` config: ``overrides`` and ``aug``) with every ``auto``
    resolved for images of median shorter side ``image_side`` and a model of cfg size ``cfg_side`` (see the module
    docstring); values that are set stay as they are."""
    overrides = dict(data_cfg.get("overrides") or {})
    reasons: List[str] = []
    size = overrides.get("input_size")
    if _is_auto(size):
        side, why = choose_input_size(image_side, cfg_side, divisor, fixed_input_size)
        overrides["input_size"] = side
        reasons.append(f"input size {side}x{side}: {why}")
    input_side = _side(overrides.get("input_size")) or cfg_side
    aug, crop_pct, crop_reasons = choose_training_crop(data_cfg.get("aug") or {}, input_side, image_side)
    reasons += crop_reasons
    if _is_auto(overrides.get("crop_pct")):
        overrides["crop_pct"] = crop_pct
        if crop_pct is not None:
            reasons.append(f"eval crop_pct {crop_pct:g}: evaluated on the whole image, as the crop trains on it")
    check_crop_size(aug, image_side, input_side)
    return DataChoices(overrides=overrides, aug=aug, reasons=reasons)


def _side(size: Any) -> Optional[int]:
    if size is None or _is_auto(size):
        return None
    if isinstance(size, (list, tuple)):
        return int(min(size[-2:]))
    return int(size)
