"""Data-aware training defaults: the input size, the training crop, the flip, the eval crop and the batch size chosen
from the images, for a run that leaves them to the data (``auto`` in ``data.overrides``, ``data.aug`` and
``data.batch_size``).

A fixed default cannot serve both ImageNet photos and 28-pixel scans: a random-resized crop down to 8% of the area
(ImageNet's) cuts a 32-pixel digit to a 9-pixel scrap, and training a 32-pixel image at 224 costs 49x for nothing.
The run measures its images' median shorter side (``inspect.typical_image_size``) and chooses:

* ``input_size``: that side, rounded to a size the model takes (a multiple of an MDEQ's ``size_divisor``), at least
  ``MIN_INPUT`` and at most the model's pretrained-cfg size (so ImageNet-sized images train at 224 and a published
  16x16 weight keeps its size); a model whose cfg says ``fixed_input_size`` (a ViT) keeps its size. An MDEQ on small
  images trains where its finest equilibrium branch is at most ``FINEST_BRANCH`` pixels a side (but at no less than
  half the images' side): the solve's budget (8 f-evaluations without a recipe) spreads information over a limited
  distance, so at 32x32 mdeq_tiny's solves stopped far from the fixed point (relative residual 0.14-0.54 on the
  digits) and a 3-epoch run reached 62-77% where at 16x16 they converge (0.017) and it reached 95%, in a quarter
  of the time (README, "Your own data"). A run from starting weights (a published tag, a checkpoint) trains at
  the size those weights were trained at (the model's pretrained cfg; a training checkpoint's own), where their
  features are;
* the training crop (``aug.policy``): a random-resized crop (``rrc``) whose smallest crop keeps ImageNet's smallest
  in pixels (8% of 224², about ``MIN_CROP_SIDE`` px a side), and at least ``MILD_SCALE`` of a small image with its
  aspect within ``MILD_RATIO`` (the digits recipe's crop: on the digits at 3 epochs it reached 94.9% against 91.6%
  with CIFAR's pad-4-and-crop and 93.7% padding 1 pixel, means of 3 seeds); inputs up to ``SMALL_INPUT`` pixels are
  evaluated whole (``crop_pct`` 1). ``pad_crop`` (pad, random crop back: CIFAR's) is there to be chosen
  (``data.aug.policy=pad_crop``, or ``data.aug.padding`` set);
* ``aug.hflip``: 0.5 when flipped images keep their classes, 0 when they look like other classes (digits, text):
  ``flip_check.flip_retention`` measures it on a sample of the training images (the caller does; this module
  reads no pixels); when it cannot tell, 0.5, as for natural images;
* ``batch_size`` (``data.batch_size=auto``): ``MAX_AUTO_BATCH`` images per process, less for a data set of a few
  hundred images so that an epoch still has ``MIN_STEPS_PER_EPOCH`` optimizer steps (a power of two, at least
  ``MIN_AUTO_BATCH``): schedules count epochs, and 160 images in batches of 32 give 5 steps an epoch.

Every choice is logged with its reason and any of them can be set instead (``data.overrides.input_size=64``,
``data.aug.policy=rrc``, ...). An explicit augmentation that would crop an image to under ``MIN_CROP_PIXELS`` is
refused before training starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .classification import CROP_POLICIES
from .flip_check import FLIP_KEEPS_CLASSES

__all__ = ["AUTO", "SMALL_INPUT", "MIN_INPUT", "MIN_CROP_SIDE", "MIN_CROP_PIXELS", "FINEST_BRANCH", "MILD_SCALE",
           "MILD_RATIO", "MAX_AUTO_BATCH", "MIN_AUTO_BATCH", "MIN_STEPS_PER_EPOCH", "DataChoices", "choose_input_size",
           "rrc_scale", "choose_training_crop", "choose_hflip", "wants_flip_check", "choose_batch_size",
           "check_crop_size", "resolve_data_choices"]

AUTO = "auto"
SMALL_INPUT = 64        # inputs up to this side are evaluated whole (crop_pct 1); MDEQs train small images smaller
MIN_INPUT = 16          # the smallest input size chosen (8x8 scans train at 16x16, as the digits recipe)
MIN_CROP_SIDE = 63      # ImageNet's smallest random-resized crop: 8% of 224x224 is about 63 px a side
MIN_CROP_PIXELS = 4     # an explicit augmentation cropping under this many pixels a side is refused
FINEST_BRANCH = 16      # an MDEQ on small images trains with its finest equilibrium branch at most this side
MAX_AUTO_BATCH = 32     # data.batch_size=auto: this many images per process ...
MIN_AUTO_BATCH = 8      # ... down to this many, so that an epoch has at least
MIN_STEPS_PER_EPOCH = 20  # this many optimizer steps
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3.0 / 4.0, 4.0 / 3.0)
MILD_SCALE = 0.85       # small images: a random-resized crop keeps at least this share of the area ...
MILD_RATIO = (0.9, 1.1)  # ... and its aspect within this range (the digits recipe's crop)


@dataclass
class DataChoices:
    """What a run trains and evaluates at: ``overrides`` for ``resolve_data_cfg`` (input_size, crop_pct, ...), the
    training ``aug`` options (with ``policy`` resolved), and why (one line per automatic choice)."""

    overrides: Dict[str, Any]
    aug: Dict[str, Any]
    reasons: List[str] = field(default_factory=list)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == AUTO


def choose_input_size(image_side: Optional[int], cfg_side: int, divisor: int = 1, fixed: bool = False,
                      branch_stride: Optional[int] = None, from_weights: bool = False) -> Tuple[int, str]:
    """(input side, why) for images whose median shorter side is ``image_side`` (None: unknown) and a model whose
    pretrained cfg says ``cfg_side``, taking multiples of ``divisor`` (``fixed``: only its cfg size).
    ``branch_stride``: an MDEQ's input pixels per pixel of its finest branch (2^downsample_times); on small
    images it trains with that branch at most ``FINEST_BRANCH`` a side, at no less than half the images' side.
    ``from_weights``: the model starts from weights trained at ``cfg_side``, which it keeps."""
    if fixed:
        return cfg_side, f"the model takes only its cfg's input size ({cfg_side})"
    if from_weights:
        return cfg_side, (f"the starting weights were trained at {cfg_side}x{cfg_side} (their cfg), where their "
                          "features are" + (f"; the images' median shorter side is {image_side} px" if image_side
                                            else ""))
    if not image_side:
        return cfg_side, "the images' size is unknown: the model's cfg size"
    divisor = max(int(divisor), 1)
    side = min(max(int(image_side), MIN_INPUT), cfg_side)
    solver_cap = None
    if branch_stride and image_side <= SMALL_INPUT:
        solver_cap = max(FINEST_BRANCH * int(branch_stride), image_side // 2, MIN_INPUT)
        side = min(side, solver_cap)
    side = max(divisor, int(round(side / divisor)) * divisor)
    if solver_cap is not None and solver_cap < min(image_side, cfg_side):
        why = (f"the images' median shorter side is {image_side} px; an MDEQ trains small images with its finest "
               f"equilibrium branch at most {FINEST_BRANCH}x{FINEST_BRANCH} (here {side // int(branch_stride)}), "
               "where its solves converge within the budget")
    elif image_side >= cfg_side:
        why = f"the model's cfg size: the images (median shorter side {image_side} px) are at least as large"
    elif side == image_side:
        why = f"the images' own size (median shorter side {image_side} px)"
    else:
        why = (f"the images' median shorter side {image_side} px" + (f", at least {MIN_INPUT}" if
               image_side < MIN_INPUT else "") + (f", as a multiple of {divisor} (the model's size divisor)"
                                                 if divisor > 1 else ""))
    return side, why


def choose_batch_size(batch_size: Any, train_images: int, world_size: int = 1) -> Tuple[int, Optional[str]]:
    """(images per process, why) of ``data.batch_size``: a number as it is (why None), or ``auto`` (see the module
    docstring) for ``train_images`` shared by ``world_size`` processes."""
    if not _is_auto(batch_size):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be a number of images >= 1 or auto, got {batch_size!r}")
        return batch_size, None
    per_process = max(int(train_images) // max(int(world_size), 1), 1)
    batch = MAX_AUTO_BATCH
    while batch > MIN_AUTO_BATCH and per_process // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    if batch == MAX_AUTO_BATCH:
        return batch, f"batch size {batch} per process"
    return batch, (f"batch size {batch} per process: {train_images} training images give {per_process // batch} "
                   f"optimizer steps an epoch (at {MAX_AUTO_BATCH}: {per_process // MAX_AUTO_BATCH})")


def wants_flip_check(data_cfg: Mapping[str, Any]) -> bool:
    """Whether the run leaves the horizontal flip to the data (``data.aug.hflip=auto``)."""
    return _is_auto((data_cfg.get("aug") or {}).get("hflip"))


def choose_hflip(retention: Optional[float]) -> Tuple[float, str]:
    """(flip probability, why) from ``flip_check.flip_retention`` (None: the check could not tell)."""
    if retention is None:
        return 0.5, "hflip 0.5: the flip check could not tell (its nearest-class-mean classifier is near chance), " \
                    "so flips are kept, as for natural images"
    if retention >= FLIP_KEEPS_CLASSES:
        return 0.5, (f"hflip 0.5: flipped training images keep their classes (a nearest-class-mean classifier keeps "
                     f"{retention:.0%} of its accuracy above chance on them)")
    return 0.0, (f"hflip 0: flipped images look like other classes here, as digits or text do (a nearest-class-mean "
                 f"classifier keeps only {retention:.0%} of its accuracy above chance on them); data.aug.hflip=0.5 "
                 "flips anyway")


def rrc_scale(image_side: Optional[int]) -> Tuple[List[float], List[float]]:
    """The random-resized crop's (scale, ratio) for images of ``image_side``: the smallest crop keeps about
    ``MIN_CROP_SIDE`` px a side (ImageNet's 8% of 224x224), and at least ``MILD_SCALE`` of a small image (the
    digits recipe's crop); a crop that keeps at least half the image keeps its aspect within ``MILD_RATIO``."""
    low = IMAGENET_SCALE[0]
    if image_side:
        low = min(MILD_SCALE, max(low, (MIN_CROP_SIDE / image_side) ** 2))
    ratio = MILD_RATIO if low >= 0.5 else IMAGENET_RATIO
    return [round(low, 3), 1.0], [round(ratio[0], 4), round(ratio[1], 4)]


def choose_training_crop(aug: Mapping[str, Any], input_side: int, image_side: Optional[int]
                         ) -> Tuple[Dict[str, Any], Optional[float], List[str]]:
    """The training augmentation with ``policy`` resolved (and the crop options it needs), the eval ``crop_pct`` that
    goes with it (None: the model's), and the reasons of the automatic choices."""
    aug = {k: v for k, v in dict(aug).items() if v is not None}
    reasons: List[str] = []
    policy = aug.get("policy", AUTO)
    if _is_auto(policy):
        policy = "pad_crop" if "padding" in aug and not ("scale" in aug or "ratio" in aug) else "rrc"
        if policy == "pad_crop":
            reasons.append("training crop: pad_crop (data.aug.padding is set)")
    elif policy not in CROP_POLICIES:
        raise ValueError(f"data.aug.policy must be auto or one of {list(CROP_POLICIES)}, got {policy!r}")
    aug["policy"] = policy
    if policy == "pad_crop":
        if "padding" not in aug:
            aug["padding"] = max(input_side // 8, 1)
            reasons.append(f"padding {aug['padding']} px (1/8 of the input side), random crop back, as CIFAR training")
    else:
        scale, ratio = rrc_scale(image_side)
        if "scale" not in aug:
            aug["scale"] = scale
            reasons.append(
                f"training crop: random-resized, keeping {scale[0]:.0%}-100% of the image's area" +
                (f" (a {image_side}-px image: stronger crops cut it to scraps; the digits recipe's crop)"
                 if scale[0] >= MILD_SCALE else f" (the smallest crop keeps about {MIN_CROP_SIDE} px a side, as "
                 "ImageNet's 8% of 224x224)" if image_side else " (ImageNet's)"))
        if "ratio" not in aug:
            aug["ratio"] = ratio
            if ratio[0] > IMAGENET_RATIO[0]:
                reasons.append(f"crop aspect within [{ratio[0]}, {ratio[1]}] (mild, as the crop keeps most of the "
                               "image)")
    crop_pct = 1.0 if input_side <= SMALL_INPUT else None
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
            f"least {min(need, 1.0):.2f}, or data.aug.scale=null (chosen from the images' size)")


def resolve_data_choices(data_cfg: Mapping[str, Any], cfg_side: int, image_side: Optional[int], divisor: int = 1,
                         fixed_input_size: bool = False, branch_stride: Optional[int] = None,
                         flip_retention: Optional[float] = None, from_weights: bool = False) -> DataChoices:
    """The data choices of a run: ``data_cfg`` (the ``data`` config: ``overrides`` and ``aug``) with every ``auto``
    resolved for images of median shorter side ``image_side``, a model of cfg size ``cfg_side`` and the measured
    ``flip_retention`` (see the module docstring); values that are set stay as they are."""
    overrides = dict(data_cfg.get("overrides") or {})
    reasons: List[str] = []
    size = overrides.get("input_size")
    if _is_auto(size):
        side, why = choose_input_size(image_side, cfg_side, divisor, fixed_input_size, branch_stride, from_weights)
        overrides["input_size"] = side
        reasons.append(f"input size {side}x{side}: {why}")
    input_side = _side(overrides.get("input_size")) or cfg_side
    aug, crop_pct, crop_reasons = choose_training_crop(data_cfg.get("aug") or {}, input_side, image_side)
    reasons += crop_reasons
    if _is_auto(aug.get("hflip")):
        aug["hflip"], why = choose_hflip(flip_retention)
        reasons.append(why)
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
