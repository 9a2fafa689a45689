"""ImageFolder classification data (the ImageNet layout) with timm's transforms, for training and evaluation.

``LabelledImages`` is what every classification source gives the tools (ImageFolder here; Hugging Face
datasets in ``hf_images``, WebDataset shards in ``wds_shards``). What ``ImageFolderDataset`` adds to timm's
``ImageDataset``: the layout is checked up front (a wrong root shows the layout
expected), an unreadable image raises an error naming the file instead of being skipped, and val uses the train
split's class indices. The loaders that make augmentation a pure function of (seed, epoch, index) are in
``loaders``; which dataset a config names is ``factory``'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch.utils.data import Dataset
from torchvision import transforms

from .errors import DatasetLayoutError, UnreadableImageError

__all__ = ["LabelledImages", "ImageFolderDataset", "find_split", "layout_help", "resolve_data_cfg", "build_transform",
           "training_aug", "pad_crop_transform", "CROP_POLICIES", "build_imagefolder_datasets", "SPLIT_ALIASES"]

SPLIT_ALIASES: Dict[str, Tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "eval", "evaluation"),
}
_EXTENSIONS = tuple(sorted(get_img_extensions(as_set=True)))


def layout_help(root: Union[str, Path]) -> str:
    return (
        "expected an ImageFolder root in the ImageNet layout:\n"
        f"  {root}/\n"
        "    train/<class_name>/<image>   e.g. train/n01440764/n01440764_10026.JPEG\n"
        "    val/<class_name>/<image>     e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG\n"
        f"(split aliases: {', '.join(SPLIT_ALIASES['train'])} / {', '.join(SPLIT_ALIASES['val'])}; "
        f"image extensions: {' '.join(_EXTENSIONS)}; class index = natural sort of the train class folders)"
    )


def find_split(root: Union[str, Path], split: str) -> Path:
    """The folder of ``split`` under ``root`` (accepting timm's aliases), or a ``DatasetLayoutError``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {root} does not exist or is not a folder; " + layout_help(root))
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DatasetLayoutError(
        f"no '{split}' split folder in {root} (found folders: {present or 'none'}); " + layout_help(root))


def _scan(folder: Path, class_to_idx: Optional[Mapping[str, int]]) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    root = folder.parent
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS]
    if loose:
        raise DatasetLayoutError(
            f"{folder} holds images directly ({len(loose)} files, e.g. {loose[0]}) instead of one sub-folder per "
            f"class (for the raw ILSVRC val set, sort the images into class folders first); " + layout_help(root))
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetLayoutError(f"{folder} has no class sub-folders; " + layout_help(root))
    samples, found = find_images_and_targets(str(folder), class_to_idx=None)
    if class_to_idx is None:
        class_to_idx = found
    else:
        unknown = sorted(set(found) - set(class_to_idx))
        if unknown:
            raise DatasetLayoutError(
                f"{folder} has classes that the train split does not have: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}; every class folder must exist under train/")
        inverse = {v: k for k, v in found.items()}
        samples = [(path, class_to_idx[inverse[t]]) for path, t in samples]
    empty = sorted(set(classes) - set(found))
    if empty:
        raise DatasetLayoutError(f"class folders without images in {folder}: {empty[:10]}; " + layout_help(root))
    return samples, dict(class_to_idx)


class LabelledImages(Dataset):
    """The classification datasets' common part: ``classes`` (names in index order), ``class_to_idx``, ``targets``
    (one class index per sample, read without decoding images), ``transform`` and ``location`` (where the data
    is, for results files). A source implements ``open(index)`` (the image opened lazily: PIL reads the header,
    the pixels on first use) and ``describe(index)`` (where the sample is, for error messages)."""

    classes: List[str]
    class_to_idx: Dict[str, int]
    targets: List[int]
    location: str
    transform: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The decoded RGB image, or an ``UnreadableImageError`` naming the sample."""
        try:
            with self.open(index) as img:
                return img.convert("RGB")  # decodes the pixels, so a truncated file fails here
        except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, DecompressionBomb)
            raise UnreadableImageError(f"cannot read image file {self.describe(index)}: {type(e).__name__}: {e}"
                                       ) from e

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class ImageFolderDataset(LabelledImages):
    """Images in ``<split folder>/<class>/<file>``; ``class_to_idx`` defaults to the natural sort of the folders."""

    def __init__(self, folder: Union[str, Path], transform=None, class_to_idx: Optional[Mapping[str, int]] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetLayoutError(f"{self.folder} is not a folder; " + layout_help(self.folder.parent))
        self.samples, self.class_to_idx = _scan(self.folder, class_to_idx)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.location = str(self.folder.parent)

    def open(self, index: int) -> Image.Image:
        return Image.open(self.samples[index][0])

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


# ------------------------------------------------------------------------------------------------ transforms
# training crop policies: "rrc" (timm's random-resized crop, the ImageNet recipe) and "pad_crop" (resize to the input
# size, pad, random crop back: the CIFAR recipe, for small images that a random-resized crop would destroy)
CROP_POLICIES = ("rrc", "pad_crop")
_POLICY_KEYS = {"rrc": ("scale", "ratio"), "pad_crop": ("padding",)}
_AUG_KEYS = ("policy", "scale", "ratio", "padding", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob",
             "re_mode", "re_count", "train_interpolation")


def resolve_data_cfg(model: torch.nn.Module, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) from the model's
    pretrained cfg, with the non-null entries of ``overrides`` taking precedence."""
    args = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    if "input_size" in args:
        size = args["input_size"]
        args["input_size"] = tuple(size) if isinstance(size, (list, tuple)) and len(size) == 3 else (
            3, *(size if isinstance(size, (list, tuple)) else (size, size)))
    if "mean" in args:
        args["mean"] = tuple(args["mean"])
    if "std" in args:
        args["std"] = tuple(args["std"])
    return resolve_data_config(args=args, model=model)


def training_aug(aug: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The set (non-null) training augmentation options, checked: known keys, a known crop ``policy``, and only
    the crop options of that policy (``scale``/``ratio`` for rrc, ``padding`` for pad_crop)."""
    aug = {k: v for k, v in dict(aug or {}).items() if v is not None}
    unknown = sorted(set(aug) - set(_AUG_KEYS))
    if unknown:
        raise ValueError(f"unknown augmentation options {unknown}; known: {list(_AUG_KEYS)}")
    policy = aug.setdefault("policy", "rrc")
    if policy not in CROP_POLICIES:
        raise ValueError(f"data.aug.policy must be one of {list(CROP_POLICIES)} (or auto in a training config), got "
                         f"{policy!r}")
    foreign = sorted(k for other, keys in _POLICY_KEYS.items() if other != policy for k in keys if k in aug)
    if foreign:
        raise ValueError(f"data.aug.{foreign[0]} is an option of another crop policy than data.aug.policy={policy} "
                         f"({', '.join(f'{p}: {list(k)}' for p, k in _POLICY_KEYS.items())}); set it to null or "
                         "change the policy")
    return aug


def build_transform(data_cfg: Mapping[str, Any], is_training: bool, aug: Optional[Mapping[str, Any]] = None):
    """timm's ``create_transform`` for train (random crop/flip/... from ``aug``) or eval (resize + center crop).

    Training crops follow ``aug["policy"]``: ``rrc`` is timm's random-resized crop (``scale``, ``ratio``);
    ``pad_crop`` resizes the image to the input size, pads it by ``padding`` pixels (zeros, default 1/8 of the
    input size) and takes a random crop of the input size, as CIFAR training does. The rest (flips, color jitter,
    auto-augment, normalisation, random erasing) is timm's either way.
    """
    kwargs: Dict[str, Any] = dict(
        input_size=data_cfg["input_size"], interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
        std=data_cfg["std"], crop_pct=data_cfg.get("crop_pct"), crop_mode=data_cfg.get("crop_mode"),
        is_training=is_training,
    )
    if not is_training:
        return create_transform(**kwargs)
    aug = training_aug(aug)
    policy = aug.pop("policy")
    padding = aug.pop("padding", None)
    if "train_interpolation" in aug:
        kwargs["interpolation"] = aug.pop("train_interpolation")
    for key in ("scale", "ratio"):
        if key in aug:
            aug[key] = tuple(aug[key])
    kwargs.update(aug)
    if policy == "rrc":
        return create_transform(**kwargs)
    _, secondary, final = create_transform(**kwargs, separate=True)
    crop = pad_crop_transform(data_cfg["input_size"][-2:], padding, kwargs["interpolation"],
                              float(aug.get("hflip", 0.5)), float(aug.get("vflip", 0.0)))
    return transforms.Compose([*crop.transforms, *secondary.transforms, *final.transforms])


def pad_crop_transform(size: Tuple[int, int], padding: Optional[int], interpolation: str, hflip: float = 0.5,
                       vflip: float = 0.0) -> transforms.Compose:
    """The CIFAR training crop at any size: resize to ``size`` (the shorter side; a longer side is then cropped at
    random), pad ``padding`` zero pixels on every side (None: 1/8 of the shorter side of ``size``), random crop of
    ``size``, then the flips."""
    h, w = int(size[0]), int(size[1])
    pad = max(min(h, w) // 8, 1) if padding is None else int(padding)
    if pad < 0 or pad >= min(h, w):
        raise ValueError(f"data.aug.padding must be in [0, {min(h, w)}) for a {h}x{w} input, got {pad}")
    interp = str_to_interp_mode(interpolation if interpolation not in (None, "random") else "bilinear")
    steps = [transforms.Resize(min(h, w) if h == w else (h, w), interpolation=interp),
             transforms.RandomCrop((h, w), padding=pad or None, pad_if_needed=True)]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(transforms.RandomVerticalFlip(p=vflip))
    return transforms.Compose(steps)


def build_imagefolder_datasets(root: Union[str, Path], train_transform=None, eval_transform=None,
                               train_split: str = "train", val_split: str = "val"):
    """(train, val) ``ImageFolderDataset``s; val uses the train split's class indices."""
    train = ImageFolderDataset(find_split(root, train_split), transform=train_transform)
    val = ImageFolderDataset(find_split(root, val_split), transform=eval_transform, class_to_idx=train.class_to_idx)
    return train, val
