"""Hugging Face ``datasets`` as classification data (``data=hfds``).

``data.root`` is a folder written by ``DatasetDict.save_to_disk`` (or one holding a ``Dataset.save_to_disk`` folder
per split), or anything ``datasets.load_dataset`` opens: a Hub name such as ``user/dataset`` (downloaded into
Hugging Face's cache; ``HF_HUB_OFFLINE=1`` reads only that cache) or a local folder of parquet / image files in a
Hub dataset's layout. timm's ``create_dataset("hfds/...")`` covers the last two but not a ``save_to_disk`` folder,
so one source here serves all three with the same checks: the image and label columns (``data.image_key``,
``data.label_key``; default ``image`` and ``label``) must exist, and an error names a missing one and lists those
there are. Split names accept the usual aliases (``val`` finds ``validation``).

Class names come from the label column's ``ClassLabel`` feature; plain integer labels are their own indices, string
labels are sorted into indices. Images stay encoded in the Arrow files and are decoded per sample, so a dataset
larger than memory is read as an ImageFolder would be; the map-style access gives exact shards under torchrun.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from PIL import Image

from .classification import SPLIT_ALIASES, LabelledImages
from .errors import DatasetLayoutError

__all__ = ["HuggingFaceImages", "HF_IMAGE_KEY", "HF_LABEL_KEY", "hf_split_names"]

HF_IMAGE_KEY = "image"
HF_LABEL_KEY = "label"


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError('data=hfds reads Hugging Face datasets: pip install "mdeq-zoo[hf]" (the datasets package)'
                          ) from e
    return datasets


def _saved_kind(path: Path) -> Optional[str]:
    """"dict" for a ``DatasetDict.save_to_disk`` folder, "dataset" for a ``Dataset.save_to_disk`` folder, else None."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def hf_split_names(source: str) -> List[str]:
    """The split names of a saved folder or of what ``datasets.load_dataset`` opens."""
    path = Path(source)
    kind = _saved_kind(path) if path.is_dir() else None
    if kind == "dict":
        return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    if path.is_dir() and kind is None and any(_saved_kind(p) == "dataset" for p in path.iterdir() if p.is_dir()):
        return sorted(p.name for p in path.iterdir() if p.is_dir() and _saved_kind(p) == "dataset")
    if kind == "dataset":
        raise DatasetLayoutError(
            f"{source} is one saved Dataset without splits; save a DatasetDict (train/validation) with "
            "DatasetDict.save_to_disk, or put one saved Dataset per split in <root>/train and <root>/validation")
    try:
        return list(_datasets().get_dataset_split_names(source))
    except Exception as e:  # FileNotFoundError, offline ConnectionError, DatasetNotFoundError, ...
        raise DatasetLayoutError(
            f"cannot open {source!r} as a Hugging Face dataset ({type(e).__name__}: {e}); data.root is a folder "
            "written by save_to_disk, a local dataset folder (parquet / image files), or a Hub name (offline "
            "(HF_HUB_OFFLINE=1) only one already in the Hugging Face cache)") from e


def _resolve_split(source: str, split: str, names: Sequence[str]) -> str:
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in names:
            return name
    raise DatasetLayoutError(f"{source} has no split {split!r} (splits: {list(names)}); set data.train_split / "
                             "data.val_split to one of them")


def _load_split(source: str, split: str):
    datasets = _datasets()
    path = Path(source)
    kind = _saved_kind(path) if path.is_dir() else None
    if kind == "dict":
        return datasets.load_from_disk(str(path))[split]
    if path.is_dir() and _saved_kind(path / split) == "dataset":
        return datasets.load_from_disk(str(path / split))
    return datasets.load_dataset(source, split=split)


class HuggingFaceImages(LabelledImages):
    """One split of a Hugging Face dataset with an image column and a class-label column (see the module
    docstring for ``source``); ``class_to_idx`` (a training run's) fixes the class indices of another split."""

    def __init__(self, source: str, split: str, transform=None, class_to_idx: Optional[Mapping[str, int]] = None,
                 image_key: Optional[str] = None, label_key: Optional[str] = None):
        datasets = _datasets()
        self.source, self.location = str(source), str(source)
        self.image_key, self.label_key = image_key or HF_IMAGE_KEY, label_key or HF_LABEL_KEY
        self.split = _resolve_split(self.source, split, hf_split_names(self.source))
        data = _load_split(self.source, self.split)
        for what, key in (("image", self.image_key), ("label", self.label_key)):
            if key not in data.column_names:
                raise DatasetLayoutError(
                    f"{self.source} [{self.split}] has no {what} column {key!r} (columns: {data.column_names}); set "
                    f"data.{what}_key to the column holding the {what}s")
        feature = data.features[self.image_key]
        if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("string", "large_string")):
            raise DatasetLayoutError(f"{self.source} [{self.split}]: column {self.image_key!r} does not hold images "
                                     f"({feature}); expected an Image feature or image file paths")
        # keep the encoded bytes (or the file path): decoding is per sample, in the loader's workers
        data = data.cast_column(self.image_key, datasets.Image(decode=False))
        labels = list(data.select_columns([self.label_key])[self.label_key])
        feature = data.features[self.label_key]
        names = list(getattr(feature, "names", None) or [])
        self.targets, self.class_to_idx = self._indices(labels, names, class_to_idx)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.data = data.select_columns([self.image_key])
        self.transform = transform

    def _indices(self, labels: List[Any], names: List[str], class_to_idx: Optional[Mapping[str, int]]):
        where = f"{self.source} [{self.split}] column {self.label_key!r}"
        if any(label is None or (isinstance(label, int) and label < 0) for label in labels):
            bad = next(i for i, v in enumerate(labels) if v is None or (isinstance(v, int) and v < 0))
            raise DatasetLayoutError(f"{where} has samples without a label (row {bad}: {labels[bad]!r}; a test split "
                                     "often has none): choose a labelled split")
        if not labels:
            raise DatasetLayoutError(f"{where}: the split is empty")
        if all(isinstance(v, str) for v in labels):  # class names in the column
            found = sorted(set(labels))
            as_names = labels
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            found = names or [str(i) for i in range(max(labels) + 1)]
            if max(labels) >= len(found):
                raise DatasetLayoutError(f"{where}: label {max(labels)} but only {len(found)} class names")
            as_names = [found[v] for v in labels]
        else:
            raise DatasetLayoutError(f"{where} holds {type(labels[0]).__name__} values; expected class indices "
                                     "(int / ClassLabel) or class names (str)")
        mapping = dict(class_to_idx) if class_to_idx else {c: i for i, c in enumerate(found)}
        unknown = sorted(set(as_names) - set(mapping))
        if unknown:
            raise DatasetLayoutError(f"{where} has classes that the training split does not have: {unknown[:10]}")
        return [mapping[n] for n in as_names], mapping

    def open(self, index: int) -> Image.Image:
        image = self.data[index][self.image_key]
        if image.get("bytes"):
            return Image.open(io.BytesIO(image["bytes"]))
        if image.get("path"):
            return Image.open(image["path"])
        raise ValueError("the image cell holds neither bytes nor a path")

    def describe(self, index: int) -> str:
        return f"{self.source} [{self.split} row {index}, column {self.image_key!r}]"

    def info(self) -> Dict[str, Any]:
        return dict(source=self.source, split=self.split, image_key=self.image_key, label_key=self.label_key)
