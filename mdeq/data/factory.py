"""Which dataset a data config names: one factory per task.

* Classification: ``data.name`` is a builtin dataset (``CLASSIFICATION_BUILTINS``: the bundled digits, CIFAR-10
  and CIFAR-100 from torchvision's archives, each written once into a cache), a source in another format
  (``CLASSIFICATION_SOURCES``: ``hfds`` Hugging Face datasets, ``wds`` WebDataset shards; ``data.root`` says where,
  ``data.image_key`` / ``data.label_key`` which fields) or anything else with ``data.root`` an ImageFolder root
  (``imagefolder``, your own). A new builtin is a function that writes its ImageFolder tree and returns the root,
  registered here, plus its config in ``mdeq/configs/data/``; a new format is a ``LabelledImages`` class taking
  (root, split, transform, class_to_idx, image_key, label_key).
* Segmentation: ``"cityscapes"`` (the official layout), ``"folder"`` (images/ + masks/), ``"synthetic"`` (the
  generated street scenes, built once into a cache) or ``"synthetic_video"`` (the generated video's frames as stills).
* Video segmentation: ``"synthetic_video"`` (generated street-scene clips in the Cityscapes sequence layout, built
  once into a cache), ``"cityscapes_sequence"`` (the official ``leftImg8bit_sequence`` layout) or ``"video_folder"``
  (one folder of frames per video, optional masks).

Builtins are prepared by one process first when several run (``env``: anything with ``is_main`` and
``barrier()``, such as ``mdeq.engine.distributed.DistEnv``); the others then read the complete cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .cifar import prepare_cifar10, prepare_cifar100
from .cityscapes import CityscapesDataset
from .classification import ImageFolderDataset, LabelledImages, build_imagefolder_datasets, find_split
from .digits import prepare_digits
from .hf_images import HuggingFaceImages
from .segmentation import FolderPairDataset, SegmentationDataset
from .synthetic_seg import prepare_synthetic_cityscapes
from .synthetic_video import prepare_synthetic_video
from .video import CityscapesSequenceDataset, FrameFolderDataset, VideoSegmentationDataset
from .wds_shards import WebDatasetShards

__all__ = ["CLASSIFICATION_BUILTINS", "CLASSIFICATION_SOURCES", "SEGMENTATION_DATASETS", "classification_root",
           "build_classification_datasets",
           "build_classification_split", "build_segmentation_dataset", "build_segmentation_datasets",
           "VIDEO_DATASETS", "build_video_dataset"]

PathLike = Union[str, Path]
CLASSIFICATION_BUILTINS: Dict[str, Callable[[Optional[PathLike]], Path]] = {
    "digits": prepare_digits, "cifar10": prepare_cifar10, "cifar100": prepare_cifar100}
CLASSIFICATION_SOURCES: Dict[str, Callable[..., LabelledImages]] = {
    "hfds": HuggingFaceImages,  # data.root: a save_to_disk folder, a local dataset folder or a Hub name
    "wds": WebDatasetShards,    # data.root: the folder of .tar shards
}
SEGMENTATION_DATASETS = ("cityscapes", "folder", "synthetic", "synthetic_video")
VIDEO_DATASETS = ("synthetic_video", "cityscapes_sequence", "video_folder")


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


def _source(data_cfg: Mapping[str, Any], root: Optional[PathLike]) -> Optional[Callable[..., LabelledImages]]:
    """The ``CLASSIFICATION_SOURCES`` class a data config names (bound to its root and keys), else None (an
    ImageFolder); ``image_key`` / ``label_key`` belong to those sources only."""
    name = data_cfg.get("name")
    keys = {k: data_cfg.get(k) for k in ("image_key", "label_key")}
    if name not in CLASSIFICATION_SOURCES:
        given = [f"data.{k}" for k, v in keys.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} name fields of data={'|'.join(CLASSIFICATION_SOURCES)} sources, "
                             f"not of data.name={name!r} (an ImageFolder's classes are its folders); set them to null")
        return None
    root = root or data_cfg.get("root")
    if not root:
        raise ValueError(f"data.root (a tool's --data-root) is required for data.name={name}: "
                         + ("a save_to_disk folder, a local dataset folder or a Hub name" if name == "hfds"
                            else "the folder of .tar shards"))
    cls = CLASSIFICATION_SOURCES[name]
    return lambda split, **kw: cls(str(root), split, **keys, **kw)


def build_classification_datasets(data_cfg: Mapping[str, Any], env: Any = None, root: Optional[PathLike] = None
                                  ) -> Tuple[LabelledImages, LabelledImages]:
    """(train, val) of a data config (``train_split`` / ``val_split``); val uses the train split's classes."""
    train_split, val_split = data_cfg.get("train_split", "train"), data_cfg.get("val_split", "val")
    source = _source(data_cfg, root)
    if source is not None:
        train = source(train_split)
        return train, source(val_split, class_to_idx=train.class_to_idx)
    return build_imagefolder_datasets(classification_root(data_cfg, root, env), train_split=train_split,
                                      val_split=val_split)


def build_classification_split(data_cfg: Mapping[str, Any], split: str, transform=None,
                               classes: Optional[Sequence[str]] = None, root: Optional[PathLike] = None,
                               env: Any = None) -> LabelledImages:
    """One split of a data config; ``classes`` (a training run's, in index order) fixes the class indices."""
    class_to_idx = {c: i for i, c in enumerate(classes)} if classes else None
    source = _source(data_cfg, root)
    if source is not None:
        return source(split, transform=transform, class_to_idx=class_to_idx)
    return ImageFolderDataset(find_split(classification_root(data_cfg, root, env), split), transform=transform,
                              class_to_idx=class_to_idx)


# ------------------------------------------------------------------------------------------------ segmentation
def _check_layout_options(name: str, own: str, root: Optional[PathLike], classes: Optional[Sequence[str]],
                          label_type: str, layout: str) -> bool:
    """True when ``name`` is the user's own layout ``own`` (which needs a root, ``layout`` describing it, and takes
    ``classes`` but no Cityscapes ``label_type``); the other layouts have the fixed 19 Cityscapes classes."""
    if name == own:
        if root is None:
            raise ValueError(f"the {own!r} dataset needs a root folder{layout}")
        if label_type != "auto":
            raise ValueError(f"label_type={label_type!r} applies to Cityscapes only, not to the {own!r} dataset")
        return True
    if classes is not None:
        raise ValueError(f"the {name!r} dataset has the fixed 19 Cityscapes classes; classes= is for {own!r}")
    return False


def build_segmentation_dataset(name: str, root: Optional[PathLike], split: str, transform=None,
                               classes: Optional[Sequence[str]] = None, require_labels: bool = True,
                               label_type: str = "auto") -> SegmentationDataset:
    """One split of "cityscapes" (official layout), "folder" (``FolderPairDataset``), "synthetic" (the
    generated Cityscapes-layout set, built once under ``root`` or the default cache when ``root`` is None) or
    "synthetic_video" (every frame of the generated video clips as a still image: what a model that streams them is
    trained on)."""
    if name not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; choices: {list(SEGMENTATION_DATASETS)}")
    if _check_layout_options(name, "folder", root, classes, label_type, ""):
        return FolderPairDataset(root, split, classes=classes, transform=transform, require_labels=require_labels)
    if name == "synthetic_video":
        return build_video_dataset(name, root, split, transform=transform, label_type=label_type,
                                   require_labels=require_labels).frame_table
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
    elif name == "synthetic_video":
        _prepare_once(lambda: prepare_synthetic_video(root), env)
    train = build_segmentation_dataset(name, root, data_cfg.get("train_split", "train"), **kwargs)
    val = build_segmentation_dataset(name, root, data_cfg.get("val_split", "val"), **kwargs)
    if list(val.classes) != list(train.classes):
        raise ValueError(f"the val split's classes {val.classes} differ from the train split's {train.classes}")
    return train, val


# ------------------------------------------------------------------------------------------------ video
def build_video_dataset(name: str, root: Optional[PathLike], split: str, transform=None,
                        classes: Optional[Sequence[str]] = None, label_type: str = "auto", require_labels: bool = True,
                        env: Any = None) -> VideoSegmentationDataset:
    """One split of "synthetic_video" (the generated clips, built once under ``root`` or the default cache when
    ``root`` is None; the main process writes first under DDP), "cityscapes_sequence"
    (``CityscapesSequenceDataset``) or "video_folder" (``FrameFolderDataset``; ``require_labels``: every video
    has at least one mask)."""
    if name not in VIDEO_DATASETS:
        raise ValueError(f"unknown video dataset {name!r}; choices: {list(VIDEO_DATASETS)}")
    if _check_layout_options(name, "video_folder", root, classes, label_type, " (images/<split>/<video>/<frame>)"):
        return FrameFolderDataset(root, split, classes=classes, transform=transform, require_labels=require_labels)
    if name == "synthetic_video":
        root = _prepare_once(lambda: prepare_synthetic_video(root), env)
    elif root is None:
        raise ValueError("the 'cityscapes_sequence' dataset needs a root folder (holding leftImg8bit_sequence/)")
    return CityscapesSequenceDataset(root, split, transform=transform, label_type=label_type,
                                     require_labels=require_labels)
