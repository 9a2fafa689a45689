"""The Cityscapes label table: ids, train ids, the 19 classes and their colours, and the id lookup tables.

From the official table in ``torchvision.datasets.Cityscapes.classes`` (no cityscapesscripts needed). A module
of its own because the dataset (``cityscapes``), the generic segmentation data (the default palette) and the
generated scenes (``synthetic_seg``) all read it.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torchvision.datasets import Cityscapes as _TVCityscapes

__all__ = ["IGNORE_INDEX", "LABELS", "TRAIN_LABELS", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "VALID_LABEL_IDS",
           "label_id_to_train_id", "train_id_to_label_id", "to_label_ids"]

IGNORE_INDEX = 255

# the official label table (name, id, train_id, category, category_id, has_instances, ignore_in_eval, color)
LABELS = tuple(_TVCityscapes.classes)
TRAIN_LABELS = sorted((c for c in LABELS if 0 <= c.train_id < IGNORE_INDEX and not c.ignore_in_eval),
                      key=lambda c: c.train_id)
assert [c.train_id for c in TRAIN_LABELS] == list(range(19)), "unexpected Cityscapes label table"

CITYSCAPES_CLASSES: Tuple[str, ...] = tuple(c.name for c in TRAIN_LABELS)
CITYSCAPES_PALETTE: np.ndarray = np.array([c.color for c in TRAIN_LABELS], dtype=np.uint8)
VALID_LABEL_IDS = frozenset(c.id for c in LABELS if c.id >= 0)  # 0..33; license plate (-1) never appears


def label_id_to_train_id() -> np.ndarray:
    """uint8 (256,) lookup table: ``lut[labelId] = trainId``, 255 for every id that is not one of the 19 classes."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in TRAIN_LABELS:
        lut[c.id] = c.train_id
    return lut


def train_id_to_label_id() -> np.ndarray:
    """uint8 (256,) lookup table: ``lut[trainId] = labelId`` (ignore and unknown -> 0 'unlabeled'), for writing
    predictions in the id space the Cityscapes evaluation server scores."""
    lut = np.zeros(256, dtype=np.uint8)
    for c in TRAIN_LABELS:
        lut[c.train_id] = c.id
    return lut


def to_label_ids(train_id_mask) -> np.ndarray:
    """Cityscapes train ids (ignore 255 -> 0 'unlabeled') to official label ids, as uint8 numpy."""
    m = train_id_mask.detach().cpu().numpy() if isinstance(train_id_mask, torch.Tensor) else np.asarray(train_id_mask)
    if m.size and (m.min() < 0 or m.max() > 255):
        raise ValueError(f"train ids must be in 0..255, got {m.min()}..{m.max()}")
    return train_id_to_label_id()[m.astype(np.int64)]
