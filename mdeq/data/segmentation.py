"""Semantic segmentation data in general: the dataset base (image + label map, albumentations transform), a
user's own image/mask folders, the transforms that crop, scale and flip an image together with its labels, and
label-map pictures and files.

Masks are returned in train ids (class indices) with ``IGNORE_INDEX`` (255) for every pixel that does not
count. Label values are checked on every load with a boolean lookup table, so a wrong mask (a ``*_color.png``,
a VOC border value, an index that does not exist) fails with the file named instead of training on garbage.

Augmentation randomness comes from the global numpy RNG (one draw per item), so wrapping a dataset in
``loaders.SeededDataset`` makes every crop a pure function of (seed, epoch, index).
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from .cityscapes_labels import CITYSCAPES_PALETTE, IGNORE_INDEX
from .errors import DatasetLayoutError, UnreadableImageError

__all__ = [
    "IGNORE_INDEX", "IMAGE_EXTENSIONS", "LabelValueError", "default_palette", "allowed_values", "describe_values",
    "read_label_file", "existing_dirs", "SegmentationDataset", "FolderPairDataset", "folder_layout_help",
    "build_seg_train_transform", "build_seg_eval_transform", "colorize", "save_label_png", "as_numpy",
    "collate_same_size",
]

PathLike = Union[str, Path]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class LabelValueError(ValueError):
    """A label map holds values that are neither a known label nor the ignore index (the file is named)."""


def default_palette(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): the Cityscapes colours for the first 19 classes, then colours drawn from a
    fixed-seed generator (``default_rng(0)``), so a class keeps its colour in every run and every tool."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    head = np.asarray(CITYSCAPES_PALETTE[:num_classes], dtype=np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, size=(max(0, num_classes - len(head)), 3), dtype=np.uint8)
    return np.concatenate([head, extra]).astype(np.uint8)


def allowed_values(values: Iterable[int]) -> np.ndarray:
    ok = np.zeros(256, dtype=bool)
    ok[list(values)] = True
    return ok


def describe_values(values: Sequence[int]) -> str:
    """'0..18, 255' (runs of consecutive values collapsed), so an error message stays short."""
    values = sorted(set(int(v) for v in values))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}, {v}" if v == start + 1 else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def read_label_file(path: PathLike, allowed: np.ndarray, what: str) -> np.ndarray:
    """A single-channel label PNG as uint8 (H, W); values outside ``allowed`` raise ``LabelValueError``."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.array(img)  # 'P' (palette) masks give their indices, as VOC-style tools write them
    except Exception as e:
        raise UnreadableImageError(f"cannot read label file {path}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise LabelValueError(
            f"label file {path} has {arr.shape[-1] if arr.ndim == 3 else arr.ndim} channels (PIL mode {mode}); a "
            f"label map must be a single-channel PNG of {what} (a colour visualisation such as *_gtFine_color.png "
            f"cannot be used as labels)")
    if arr.dtype == bool:  # PIL mode '1'
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:  # 16-bit or float PNG/TIFF: accept only whole values that fit in 8 bits
        wrong = (arr < 0) | (arr > 255)
        if not np.issubdtype(arr.dtype, np.integer):
            wrong |= arr != np.round(arr)
        big = arr[wrong]
        if big.size:
            raise LabelValueError(f"label file {path} holds values {describe_values(np.unique(big)[:20])}; allowed: "
                                  f"{describe_values(np.flatnonzero(allowed))} ({what})")
        arr = arr.astype(np.uint8)
    if not allowed[arr].all():  # one gather; np.unique only on the failure path
        bad = np.unique(arr[~allowed[arr]])
        raise LabelValueError(f"label file {path} holds values {describe_values(bad[:20])}"
                              f"{' ...' if bad.size > 20 else ''} that are not allowed; allowed: "
                              f"{describe_values(np.flatnonzero(allowed))} ({what})")
    return arr


def _to_chw_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.float()
    arr = np.asarray(image)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


class SegmentationDataset(Dataset, ABC):
    """Common base: ``samples`` are (image path, label path or None); items are (image CHW float, mask HW long).

    ``transform`` is an albumentations ``Compose`` (or None: ImageNet normalisation only). Before each call
    its RNG is reseeded from one draw of the global numpy RNG, so ``np.random.seed`` (or ``SeededDataset``)
    makes augmentation reproducible; all transforms share one generator, so e.g. flip and scale stay
    independent. A transform without ``ToTensorV2`` still yields tensors (the image converted as is).
    """

    classes: List[str]
    samples: List[Tuple[str, Optional[str]]]

    def __init__(self, classes: Sequence[str], samples: Sequence[Tuple[str, Optional[str]]], image_root: PathLike,
                 transform=None, ignore_index: int = IGNORE_INDEX, palette: Optional[np.ndarray] = None):
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = int(ignore_index)
        self.palette = np.asarray(palette if palette is not None else default_palette(self.num_classes), np.uint8)
        self.samples = list(samples)
        self.image_root = Path(image_root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @abstractmethod
    def read_label(self, index: int) -> np.ndarray:
        """The sample's label file as uint8 class indices with ``ignore_index`` (each layout maps/validates)."""

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 HWC image, uint8 HW mask in class indices, ignore = ``ignore_index``), untransformed."""
        image_path, label_path = self.samples[index]
        try:
            with Image.open(image_path) as img:
                image = np.array(img.convert("RGB"))  # decodes (a truncated file fails here); writable
        except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, DecompressionBomb)
            raise UnreadableImageError(f"cannot read image file {image_path}: {type(e).__name__}: {e}") from e
        if label_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        mask = self.read_label(index)
        if mask.shape != image.shape[:2]:
            raise DatasetLayoutError(f"label file {label_path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                                     f"{image_path} is {image.shape[0]}x{image.shape[1]} (H x W); they must match")
        return image, mask

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transform is None:
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
            mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
            return (x - mean) / std, torch.from_numpy(mask).long()
        if hasattr(self.transform, "set_random_state"):
            s = int(np.random.randint(2 ** 31))  # the global RNG: seeded per item by SeededDataset
            self.transform.set_random_state(np.random.default_rng(s), random.Random(s))
        out = self.transform(image=image, mask=mask)
        return _to_chw_tensor(out["image"]), torch.as_tensor(np.asarray(out["mask"])).long()

    def relative_name(self, index: int) -> str:
        """The image path relative to the split folder, without extension (where to write its prediction)."""
        return Path(self.samples[index][0]).relative_to(self.image_root).with_suffix("").as_posix()


def existing_dirs(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ image/mask folders
def folder_layout_help(root: PathLike) -> str:
    return (
        "expected an image/mask folder pair:\n"
        f"  {root}/\n"
        "    classes.txt                  one class name per line (line i = class index i), or pass classes=\n"
        "    images/<split>/**/<name>.<ext>   e.g. images/train/street/0001.jpg\n"
        "    masks/<split>/**/<name>.png      e.g. masks/train/street/0001.png (same relative path, PNG)\n"
        f"(image extensions: {' '.join(IMAGE_EXTENSIONS)}; masks are single-channel class indices 0..C-1, "
        "with the ignore index for pixels that do not count)"
    )


class FolderPairDataset(SegmentationDataset):
    """A user's own segmentation data: ``images/<split>/**`` with ``masks/<split>/**`` holding class indices.

    ``classes`` is a list of names or None to read ``root/classes.txt``. The palette is ``default_palette``
    (Cityscapes colours for the first 19 classes, then fixed-seed random colours).
    """

    def __init__(self, root: PathLike, split: str = "train", classes: Optional[Sequence[str]] = None,
                 transform=None, ignore_index: int = IGNORE_INDEX, require_labels: bool = True):
        self.root, self.split = Path(root), split
        root = self.root
        if not root.is_dir():
            raise DatasetLayoutError(f"data root {root} does not exist or is not a folder; " + folder_layout_help(root))
        if classes is None:
            names_file = root / "classes.txt"
            if not names_file.is_file():
                raise DatasetLayoutError(f"no class names: pass classes=[...] or write {names_file}; "
                                         + folder_layout_help(root))
            classes = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError(f"the class list for {root} is empty")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")
        if not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"ignore_index must be in 0..255 (masks are 8-bit), got {ignore_index}")
        if int(ignore_index) < len(classes):
            raise ValueError(f"ignore_index {ignore_index} is a class index ({len(classes)} classes); "
                             f"use a value >= {len(classes)}, usually 255")
        image_dir = root / "images" / split
        if not image_dir.is_dir():
            raise DatasetLayoutError(f"no '{split}' split in {root / 'images'} (found splits: "
                                     f"{existing_dirs(root / 'images') or 'none'}); " + folder_layout_help(root))
        images = sorted((p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                        key=lambda p: p.relative_to(image_dir).as_posix())
        if not images:
            raise DatasetLayoutError(f"no images under {image_dir}; " + folder_layout_help(root))
        mask_dir = root / "masks" / split
        samples: List[Tuple[str, Optional[str]]] = []
        missing: List[Tuple[Path, Path]] = []
        seen = {}
        for image in images:
            rel = image.relative_to(image_dir).with_suffix("")
            if rel in seen:
                raise DatasetLayoutError(f"{seen[rel]} and {image} would share the mask "
                                         f"{mask_dir / rel.with_suffix('.png')}; keep one image per name")
            seen[rel] = image
            mask = mask_dir / rel.with_suffix(".png")
            if not mask.is_file():
                missing.append((image, mask))
            samples.append((str(image), str(mask) if mask.is_file() else None))
        if missing and require_labels:
            image, expected = missing[0]
            raise DatasetLayoutError(f"{len(missing)} of {len(images)} images in {image_dir} have no mask, e.g. "
                                     f"{image}: expected {expected}; " + folder_layout_help(root))
        super().__init__(classes, samples, image_dir, transform=transform, ignore_index=ignore_index,
                         palette=default_palette(len(classes)))
        self._ok = allowed_values(list(range(self.num_classes)) + [self.ignore_index])

    def read_label(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        assert path is not None
        return read_label_file(path, self._ok, f"class indices 0..{self.num_classes - 1} and {self.ignore_index} = "
                                            f"ignore, for {self.num_classes} classes")


# ------------------------------------------------------------------------------------------------ transforms
def build_seg_train_transform(crop_size: Tuple[int, int] = (512, 1024), scale_range: Tuple[float, float] = (0.5, 2.0),
                              flip: bool = True, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                              std: Sequence[float] = IMAGENET_DEFAULT_STD, ignore_index: int = IGNORE_INDEX):
    """Random scale -> pad (image 0, mask ``ignore_index``, bottom/right) -> random crop (H, W) -> flip ->
    normalize -> tensor. Masks are resized nearest-neighbour, so no label values are invented."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    try:
        h, w = (int(v) for v in crop_size)
    except (TypeError, ValueError):
        raise ValueError(f"crop_size must be (height, width), got {crop_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"crop_size must be positive (height, width), got {tuple(crop_size)}")
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise ValueError(f"scale_range must be (low, high), got {scale_range!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
    if not 0 <= int(ignore_index) <= 255:
        raise ValueError(f"ignore_index must be in 0..255 (masks are 8-bit), got {ignore_index}")
    steps = [
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
        A.PadIfNeeded(min_height=h, min_width=w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=int(ignore_index)),
        A.RandomCrop(height=h, width=w),
    ]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(steps)


def build_seg_eval_transform(mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = IMAGENET_DEFAULT_STD):
    """Normalize + tensor at full resolution; the mask is left as it is."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


# ------------------------------------------------------------------------------------------------ label maps
def as_numpy(mask) -> np.ndarray:
    """A mask (numpy or tensor) as numpy."""
    return mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)


def colorize(mask, palette: np.ndarray, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """uint8 (H, W, 3) picture of a class-index mask (numpy or tensor); every value that is not a class index
    (the ignore index, or anything out of range) gets ``ignore_color``."""
    m = as_numpy(mask).astype(np.int64)
    if m.ndim != 2:
        raise ValueError(f"colorize expects an (H, W) mask, got shape {m.shape}")
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    n = len(palette)
    table = np.concatenate([palette, np.asarray(ignore_color, dtype=np.uint8).reshape(1, 3)])
    return table[np.where((m >= 0) & (m < n), m, n)]


def save_label_png(path: PathLike, label_array) -> Path:
    """Write an (H, W) label map (values 0..255) as a single-channel 8-bit PNG, creating parent folders."""
    arr = as_numpy(label_array)
    if arr.ndim != 2:
        raise ValueError(f"a label PNG needs an (H, W) array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.array_equal(arr, np.round(arr))):
            raise ValueError(f"label values must be integers in 0..255 for {path}, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")
    return path


def collate_same_size(batch):
    """``default_collate`` for (image, mask) pairs, with a clear error when the images differ in size."""
    from torch.utils.data import default_collate

    sizes = sorted({tuple(image.shape[-2:]) for image, _ in batch})
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes ({', '.join(f'{h}x{w}' for h, w in sizes)}) cannot share an "
                         f"evaluation batch; use an eval batch size of 1 (data.eval_batch_size=1, or eval_seg "
                         f"--batch-size 1)")
    return default_collate(batch)
