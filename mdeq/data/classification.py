"""ImageFolder classification data (the ImageNet layout) with timm's transforms, for training and evaluation.

What this adds to timm's ``ImageDataset``: the layout is checked up front (a wrong root shows the layout
expected), an unreadable image raises an error naming the file instead of being skipped, val uses the train
split's class indices, and augmentation randomness is a pure function of (seed, epoch, sample index), so a
run resumed in the middle of an epoch sees exactly the images it would have seen (any number of workers).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = [
    "DatasetLayoutError", "UnreadableImageError", "ImageFolderDataset", "SeededDataset", "ResumableSampler",
    "ShardSampler", "find_split", "resolve_data_cfg", "build_transform", "build_imagefolder_datasets",
    "build_train_loader", "build_eval_loader",
]

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


class DatasetLayoutError(ValueError):
    """The data root does not have the layout the loader expects (the message shows that layout)."""


class UnreadableImageError(RuntimeError):
    """An image file could not be opened or decoded (the message names the file)."""


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


class ImageFolderDataset(Dataset):
    """Images in ``<split folder>/<class>/<file>``; ``class_to_idx`` defaults to the natural sort of the folders."""

    def __init__(self, folder: Union[str, Path], transform=None, class_to_idx: Optional[Mapping[str, int]] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetLayoutError(f"{self.folder} is not a folder; " + layout_help(self.folder.parent))
        self.samples, self.class_to_idx = _scan(self.folder, class_to_idx)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # decodes the pixels, so a truncated file fails here
        except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, DecompressionBomb)
            raise UnreadableImageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


class SeededDataset(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index).

    Each item is produced under its own seed for torch, ``random`` and numpy, and the caller's RNG states
    are restored afterwards, so results do not depend on worker count, prefetching or where a run resumed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def item_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def __getitem__(self, index: int):
        seed = self.item_seed(index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch shuffle from ``seed + epoch``) that can skip the samples already seen.

    ``set_epoch(epoch, skip=n)`` drops this rank's first ``n`` indices of that epoch's order, which is how a
    run killed mid-epoch continues with exactly the batches it had not trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``: an exact split of an eval set (no padding duplicates)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------ transforms
_AUG_KEYS = ("scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob", "re_mode", "re_count",
             "train_interpolation")


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


def build_transform(data_cfg: Mapping[str, Any], is_training: bool, aug: Optional[Mapping[str, Any]] = None):
    """timm's ``create_transform`` for train (random crop/flip/... from ``aug``) or eval (resize + center crop)."""
    kwargs: Dict[str, Any] = dict(
        input_size=data_cfg["input_size"], interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
        std=data_cfg["std"], crop_pct=data_cfg.get("crop_pct"), crop_mode=data_cfg.get("crop_mode"),
        is_training=is_training,
    )
    if is_training:
        aug = {k: v for k, v in dict(aug or {}).items() if v is not None}
        unknown = sorted(set(aug) - set(_AUG_KEYS))
        if unknown:
            raise ValueError(f"unknown augmentation options {unknown}; known: {list(_AUG_KEYS)}")
        if "train_interpolation" in aug:
            kwargs["interpolation"] = aug.pop("train_interpolation")
        for key in ("scale", "ratio"):
            if key in aug:
                aug[key] = tuple(aug[key])
        kwargs.update(aug)
    return create_transform(**kwargs)


def build_imagefolder_datasets(root: Union[str, Path], train_transform=None, eval_transform=None,
                               train_split: str = "train", val_split: str = "val"):
    """(train, val) ``ImageFolderDataset``s; val uses the train split's class indices."""
    train = ImageFolderDataset(find_split(root, train_split), transform=train_transform)
    val = ImageFolderDataset(find_split(root, val_split), transform=eval_transform, class_to_idx=train.class_to_idx)
    return train, val


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_train_loader(dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                       workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Shuffled, seeded, resumable loader; full batches only (BatchNorm and mixup want equal batch sizes)."""
    if len(dataset) < batch_size * num_replicas:  # type: ignore[arg-type]
        raise ValueError(f"the train set has {len(dataset)} images, fewer than one global batch "
                         f"({batch_size} x {num_replicas} processes); lower data.batch_size")
    seeded = SeededDataset(dataset, seed)
    sampler = ResumableSampler(seeded, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # a private generator: creating an iterator must not consume the global RNG (dropout masks, Jacobian
    # probes), or a run resumed mid-epoch would draw different numbers than an uninterrupted one
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True, worker_init_fn=_worker_init if workers else None,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def build_eval_loader(dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, workers: int = 2,
                      pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """In-order loader over this rank's exact shard of the eval set."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), num_replicas, rank),
                      num_workers=workers, pin_memory=pin_memory, collate_fn=collate_fn,
                      worker_init_fn=_worker_init if workers else None, generator=torch.Generator().manual_seed(0))


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in one full epoch of a train loader (independent of any skip in progress)."""
    sampler = loader.sampler
    n = sampler.num_samples if isinstance(sampler, DistributedSampler) else len(sampler)  # type: ignore[arg-type]
    return n // loader.batch_size if loader.drop_last else math.ceil(n / loader.batch_size)
