"""Cityscapes in the official layout (leftImg8bit / gtFine), 19 classes.

Labels come from ``*_gtFine_labelTrainIds.png`` (0..18, 255) when present, else from ``*_gtFine_labelIds.png``
(the official ids 0..33), mapped on the fly through the 256-entry lookup table of ``cityscapes_labels``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from .cityscapes_labels import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX, VALID_LABEL_IDS,
                                label_id_to_train_id)
from .errors import DatasetLayoutError
from .segmentation import SegmentationDataset, allowed_values, existing_dirs, read_label_file

__all__ = ["CityscapesDataset", "cityscapes_layout_help", "read_cityscapes_label", "label_order", "split_folder",
           "left_images",
           "LABEL_SUFFIXES", "LABEL_TYPES"]

PathLike = Union[str, Path]
LABEL_SUFFIXES = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}
LABEL_TYPES = ("auto", "labelIds", "labelTrainIds")


def cityscapes_layout_help(root: PathLike) -> str:
    return (
        "expected the official Cityscapes layout:\n"
        f"  {root}/\n"
        "    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   "
        "e.g. leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png\n"
        "    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     "
        "(and/or ..._gtFine_labelTrainIds.png)\n"
        "(splits: train, val, test; labelIds hold the official ids 0..33 and are mapped to the 19 train ids, "
        "labelTrainIds hold 0..18 and 255)"
    )


_LUT = label_id_to_train_id()
_OK_IDS = allowed_values(VALID_LABEL_IDS)
_OK_TRAIN_IDS = allowed_values(list(range(len(CITYSCAPES_CLASSES))) + [IGNORE_INDEX])


def read_cityscapes_label(path: PathLike) -> np.ndarray:
    """A gtFine label file as train ids (uint8 H x W): ``*_labelTrainIds.png`` checked as 0..18 and 255, any other
    (``*_labelIds.png``) checked as the official ids 0..33 and mapped; a wrong value names the file."""
    if str(path).endswith(LABEL_SUFFIXES["labelTrainIds"]):
        return read_label_file(path, _OK_TRAIN_IDS, "Cityscapes train ids 0..18 and 255 = ignore")
    return _LUT[read_label_file(path, _OK_IDS, "official Cityscapes label ids 0..33")]


def label_order(label_type: str) -> Tuple[str, ...]:
    """The gtFine label files to look for, preferred first: "auto" takes ``labelTrainIds`` when present, else
    ``labelIds``; ValueError for a ``label_type`` not in ``LABEL_TYPES``."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be one of {list(LABEL_TYPES)}, got {label_type!r}")
    return ("labelTrainIds", "labelIds") if label_type == "auto" else (label_type,)


def split_folder(root: Path, images: str, split: str, layout_help: str, what: str) -> Path:
    """``root/<images>/<split>`` of a Cityscapes-style tree, or a ``DatasetLayoutError`` naming the part that is
    missing (and the folders found instead), followed by ``layout_help``."""
    if not root.is_dir():
        raise DatasetLayoutError(f"{what} root {root} does not exist or is not a folder; " + layout_help)
    base = root / images
    if not base.is_dir():
        raise DatasetLayoutError(f"no {images} folder in {root} (found folders: {existing_dirs(root) or 'none'}); "
                                 + layout_help)
    image_dir = base / split
    if not image_dir.is_dir():
        raise DatasetLayoutError(f"no '{split}' split in {base} (found splits: {existing_dirs(base) or 'none'}); "
                                 + layout_help)
    return image_dir


def left_images(image_dir: Path, what: str, layout_help: str) -> List[Path]:
    """The ``*_leftImg8bit.png`` files under ``image_dir``, sorted by relative path; none is a
    ``DatasetLayoutError`` naming ``what`` was looked for and an example of the other files found."""
    images = sorted(image_dir.rglob("*_leftImg8bit.png"), key=lambda p: p.relative_to(image_dir).as_posix())
    if not images:
        other = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file())
        raise DatasetLayoutError(
            f"no *_leftImg8bit.png {what} under {image_dir}"
            f"{f' (found {len(other)} other files, e.g. {other[0]})' if other else ''}; " + layout_help)
    return images


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations, 19 classes; labels from ``labelTrainIds`` or ``labelIds`` (mapped).

    ``label_type``: "auto" (per sample, ``labelTrainIds`` when that file exists, else ``labelIds``),
    "labelIds" or "labelTrainIds". ``require_labels=False`` allows images without labels (the test split):
    their masks are all 255.
    """

    def __init__(self, root: PathLike, split: str = "train", transform=None, label_type: str = "auto",
                 require_labels: bool = True):
        order = label_order(label_type)
        self.root, self.split, self.label_type = Path(root), split, label_type
        root = self.root
        image_dir = split_folder(root, "leftImg8bit", split, cityscapes_layout_help(root), "Cityscapes")
        images = left_images(image_dir, "images", cityscapes_layout_help(root))
        label_dir = root / "gtFine" / split
        samples: List[Tuple[str, Optional[str]]] = []
        missing: List[Tuple[Path, Path]] = []
        for image in images:
            rel = image.relative_to(image_dir)
            stem = rel.name[: -len("_leftImg8bit.png")]
            candidates = {k: label_dir / rel.parent / (stem + s) for k, s in LABEL_SUFFIXES.items()}
            label = next((candidates[k] for k in order if candidates[k].is_file()), None)
            if label is None:
                missing.append((image, candidates[order[-1]]))
            samples.append((str(image), None if label is None else str(label)))
        if missing and require_labels:
            image, expected = missing[0]
            wanted = ("a *_gtFine_labelTrainIds.png or *_gtFine_labelIds.png" if label_type == "auto"
                      else f"a *{LABEL_SUFFIXES[label_type]}")
            raise DatasetLayoutError(
                f"{len(missing)} of {len(images)} images in {image_dir} have no label file, e.g. {image}: expected "
                f"{expected} ({wanted}; pass require_labels=False for an unlabelled split such as test); "
                + cityscapes_layout_help(root))
        super().__init__(CITYSCAPES_CLASSES, samples, image_dir, transform=transform, ignore_index=IGNORE_INDEX,
                         palette=CITYSCAPES_PALETTE.copy())

    def read_label(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        assert path is not None
        return read_cityscapes_label(path)
