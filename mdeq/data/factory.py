"""Which dataset a data config names: one factory per task.

* Classification: ``data.name`` is a builtin dataset (``CLASSIFICATION_BUILTINS``: the bundled digits, written
  once into a cache) or anything else with ``data.root`` an ImageFolder root (``imagefolder``, ``cifar10``, your
  own). A new builtin is a function that writes its ImageFolder tree and returns the root, registered here, plus
  its config in ``mdeq/configs/data/``.
* Segmentation: ``"cityscapes"`` (the official layout), ``"folder"`` (images/ + masks/) or ``"synthetic"`` (the
  generated street scenes, built once into a cache).

Builtins are prepared by one process first when several run (``env``: anything with ``is_main`` and
``barrier()``, such as ``mdeq.engine.distributed.DistEnv``); the others then read the complete cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .cityscapes import CityscapesDataset
from .classification import ImageFolderDataset, build_imagefolder_datasets, find_split
from .digits import prepare_digits
from .segmentation import FolderPairDataset, SegmentationDataset
from .synthetic_seg import prepare_synthetic_cityscapes

__all__ = ["CLASSIFICATION_BUILTINS", "SEGMENTATION_DATASETS", "classification_root", "build_classification_datasets",
           "build_classification_split", "build_segmentation_dataset", "build_segmentation_datasets"]

PathLike = Union[str, Path]
CLASSIFICATION_BUILTINS: Dict[str, Callable[[Optional[PathLike]], Path]] = {"digits": prepare_digits}
SEGMENTATION_DATASETS = ("cityscapes", "folder", "synthetic")


def _prepare_once(prepare: Callable[[], Any], env: Any = None) -> Any:
    """``prepare()`` on the main process first, then on the others (which find the cache complete)."""
    if env is not None and getattr(env, "distributed", False):
        if env.is_main:
            prepare()
        env.barrier()
    return prepare()


# ------------------------------------------------------------------------------------------------ classification
def classification_root(data_cfg: Mapping[str, Any], root: Optional[PathLike] = None, env: Any = None) -> Path:
    """The ImageFolder root of a classification data config: a builtin's cache (``root`` or ``data.root`` names
    where; default its own cache folder), else ``root`` or ``data.root``."""
    name = data_cfg.get("name")
    root = root or data_cfg.get("root")
    if name in CLASSIFICATION_BUILTINS:
        return _prepare_once(lambda: CLASSIFICATION_BUILTINS[name](root), env)
    if not root:
        raise ValueError(f"data.root (a tool's --data-root) is required for data.name={name!r}: an ImageFolder root "
                         f"with train/ and val/ class folders (builtin datasets that need none: "
                         f"{sorted(CLASSIFICATION_BUILTINS)})")
    return Path(root)


def build_classification_datasets(data_cfg: Mapping[str, Any], env: Any = None, root: Optional[PathLike] = None
                                  ) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """(train, val) of a data config (``train_split`` / ``val_split``); val uses the train split's classes."""
    return build_imagefolder_datasets(classification_root(data_cfg, root, env),
                                      train_split=data_cfg.get("train_split", "train"),
                                      val_split=data_cfg.get("val_split", "val"))


def build_classification_split(data_cfg: Mapping[str, Any], split: str, transform=None,
                               classes: Optional[Sequence[str]] = None, root: Optional[PathLike] = None,
                               env: Any = None) -> ImageFolderDataset:
    """One split of a data config; ``classes`` (a training run's, in index order) fixes the class indices."""
    class_to_idx = {c: i for i, c in enumerate(classes)} if classes else None
    return ImageFolderDataset(find_split(classification_root(data_cfg, root, env), split), transform=transform,
                              class_to_idx=class_to_idx)


# ------------------------------------------------------------------------------------------------ segmentation
def build_segmentation_dataset(name: str, root: Optional[PathLike], split: str, transform=None,
                               classes: Optional[Sequence[str]] = None, require_labels: bool = True,
                               label_type: str = "auto") -> SegmentationDataset:
    """One split of "cityscapes" (official layout), "folder" (``FolderPairDataset``) or "synthetic" (the
    generated Cityscapes-layout set, built once under ``root`` or the default cache when ``root`` is None)."""
    if name not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; choices: {list(SEGMENTATION_DATASETS)}")
    if name == "folder":
        if root is None:
            raise ValueError("the 'folder' dataset needs a root folder")
        if label_type != "auto":
            raise ValueError(f"label_type={label_type!r} applies to Cityscapes only, not to the 'folder' dataset")
        return FolderPairDataset(root, split, classes=classes, transform=transform, require_labels=require_labels)
    if classes is not None:
        raise ValueError(f"the {name!r} dataset has the fixed 19 Cityscapes classes; classes= is for 'folder'")
    if name == "synthetic":
        root = prepare_synthetic_cityscapes(root)
    elif root is None:
        raise ValueError("the 'cityscapes' dataset needs a root folder")
    return CityscapesDataset(root, split, transform=transform, label_type=label_type, require_labels=require_labels)


def build_segmentation_datasets(data_cfg: Mapping[str, Any], env: Any = None
                                ) -> Tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) of a segmentation data config (name, root, splits, classes, label_type); both must have
    the same classes."""
    kwargs: Dict[str, Any] = dict(classes=data_cfg.get("classes"), label_type=data_cfg.get("label_type", "auto"))
    name, root = data_cfg["name"], data_cfg.get("root")
    if name == "synthetic":  # generated once; the main process writes, the others wait and read
        _prepare_once(lambda: prepare_synthetic_cityscapes(root), env)
    train = build_segmentation_dataset(name, root, data_cfg.get("train_split", "train"), **kwargs)
    val = build_segmentation_dataset(name, root, data_cfg.get("val_split", "val"), **kwargs)
    if list(val.classes) != list(train.classes):
        raise ValueError(f"the val split's classes {val.classes} differ from the train split's {train.classes}")
    return train, val
