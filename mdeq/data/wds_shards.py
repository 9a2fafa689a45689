"""WebDataset tar shards as classification data (``data=wds``).

A shard is a plain tar file in WebDataset's convention: the files of one sample share a key (the path up to the
first dot of the file name) and differ in extension, e.g. ``n01440764_10026.jpg`` + ``n01440764_10026.cls``.
``data.root`` is the folder of shards; a split (``data.train_split`` / ``data.val_split``) is a sub-folder of .tar
files (``<root>/train/*.tar``), the shards named ``<split>-*.tar`` / ``*-<split>-*.tar`` in the root (timm's and
webdataset's ``ShardWriter`` naming, e.g. ``imagenet-train-000000.tar``), or a brace pattern relative to the root
(``imagenet-train-{000000..001281}.tar``). ``data.image_key`` lists the image extensions tried in order (default
``jpg;jpeg;png;webp``); ``data.label_key`` is the extension of the file holding the class index as text (default
``cls``) or a field of the sample's ``.json``. Class names: ``classes.txt`` in the root (one per line, in index
order) when there is one, else the indices themselves.

The shards are indexed once at start-up (tar headers only: each shard is read from its start, skipping file data)
and read by random access, so the tools' samplers work as for an ImageFolder: each torchrun rank a distinct
part of every epoch, evaluation counts every sample once, a killed run resumes mid-epoch. The price against
WebDataset's streaming reader is a seek per sample: shards on local or network file systems serve well, object
stores (``pipe:`` / ``s3://`` URLs) are not read here. A shard that is not a tar file, is compressed or is cut
short, and a sample without an image or a label, is an error naming the shard (and key).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .classification import LabelledImages
from .errors import DatasetLayoutError

__all__ = ["WebDatasetShards", "WDS_IMAGE_KEY", "WDS_LABEL_KEY", "find_shards", "split_key"]

WDS_IMAGE_KEY = "jpg;jpeg;png;webp"
WDS_LABEL_KEY = "cls"
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's sample key: directory + name up to the first dot


def split_key(member: str) -> Optional[Tuple[str, str]]:
    """(sample key, extension) of a member name in WebDataset's convention, None for a name without extension."""
    match = _KEY.match(member)
    return (match.group(1), match.group(2).lower()) if match else None


def _expand(pattern: str) -> List[str]:
    try:
        from braceexpand import braceexpand
    except ImportError as e:
        raise ImportError('brace patterns of WebDataset shards need braceexpand: pip install "mdeq-zoo[wds]"') from e
    return list(braceexpand(pattern))


def find_shards(root: Union[str, Path], split: str) -> List[Path]:
    """The shard files of ``split`` under ``root`` (see the module docstring), or an error showing what is there."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"WebDataset root {root} does not exist or is not a folder")
    if ".tar" in split:
        shards = [root / name for name in _expand(split)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise DatasetLayoutError(f"{len(missing)} of the {len(shards)} shards of {split!r} are not in {root}: "
                                     f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return shards
    if (root / split).is_dir():
        shards = sorted((root / split).glob("*.tar"))
    else:
        token = re.compile(rf"(^|[-_.]){re.escape(split)}([-_.]|$)")
        shards = sorted(p for p in root.glob("*.tar") if token.search(p.name[:-len(".tar")]))
    if not shards:
        present = sorted(p.name for p in root.iterdir())[:20]
        raise DatasetLayoutError(
            f"no shards of split {split!r} in {root} (found: {present or 'nothing'}); expected {root}/{split}/*.tar, "
            f"shards named {split}-*.tar or *-{split}-*.tar, or a brace pattern such as "
            f"data.{'train' if split == 'train' else 'val'}_split='{split}-{{000000..000009}}.tar'")
    return shards


def _index_shard(path: Path) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """{key: {extension: (data offset, size)}} of one uncompressed tar shard, from its headers."""
    samples: Dict[str, Dict[str, Tuple[int, int]]] = {}
    end = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > end:
                    raise DatasetLayoutError(f"shard {path} is cut short: {member.name} needs bytes up to "
                                             f"{member.offset_data + member.size}, the file has {end}")
                parts = split_key(member.name)
                if parts is not None:
                    samples.setdefault(parts[0], {})[parts[1]] = (member.offset_data, member.size)
    except tarfile.ReadError as e:
        raise DatasetLayoutError(f"shard {path} is not a readable uncompressed tar file ({e}); WebDataset shards "
                                 "here are plain .tar files") from e
    return samples


class WebDatasetShards(LabelledImages):
    """One split of WebDataset shards (see the module docstring); ``class_to_idx`` (a training run's) fixes the
    classes of another split, whose indices must lie within them."""

    def __init__(self, root: Union[str, Path], split: str, transform=None,
                 class_to_idx: Optional[Mapping[str, int]] = None, image_key: Optional[str] = None,
                 label_key: Optional[str] = None):
        self.root, self.split, self.location = Path(root), split, str(root)
        self.image_keys = [k.strip().lower() for k in (image_key or WDS_IMAGE_KEY).split(";") if k.strip()]
        self.label_key = label_key or WDS_LABEL_KEY
        self.shards = find_shards(self.root, split)
        shard_of, offsets, sizes, keys, targets = [], [], [], [], []
        for s, path in enumerate(self.shards):
            for key, files in _index_shard(path).items():
                image = next((files[k] for k in self.image_keys if k in files), None)
                if image is None:
                    raise DatasetLayoutError(
                        f"sample {key!r} in shard {path} has no image ({'/'.join(self.image_keys)}; it has "
                        f"{sorted(files)}); set data.image_key to its image extension")
                targets.append(self._label(path, key, files))
                shard_of.append(s)
                offsets.append(image[0])
                sizes.append(image[1])
                keys.append(key)
        if not keys:
            raise DatasetLayoutError(f"the shards of split {split!r} in {self.root} hold no samples")
        self.keys = keys
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        names = self._class_names()
        if class_to_idx:
            self.class_to_idx = dict(class_to_idx)
        else:
            count = max(max(targets) + 1, len(names or []))
            self.class_to_idx = {c: i for i, c in enumerate(names or [str(i) for i in range(count)])}
        if max(targets) >= len(self.class_to_idx):
            raise DatasetLayoutError(f"split {split!r} in {self.root} has class index {max(targets)}, but there are "
                                     f"{len(self.class_to_idx)} classes (classes.txt or the training split's)")
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.targets = targets
        self.transform = transform
        self._files: Dict[int, object] = {}
        self._pid = os.getpid()

    def _read(self, path: Path, extent: Tuple[int, int]) -> bytes:
        with open(path, "rb") as f:
            f.seek(extent[0])
            return f.read(extent[1])

    def _label(self, path: Path, key: str, files: Mapping[str, Tuple[int, int]]) -> int:
        where = f"sample {key!r} in shard {path}"
        if self.label_key in files:
            text = self._read(path, files[self.label_key]).decode("utf-8", "replace").strip()
        elif "json" in files:
            meta = json.loads(self._read(path, files["json"]))
            if self.label_key not in meta:
                raise DatasetLayoutError(f"{where} has no .{self.label_key} file and its .json no {self.label_key!r} "
                                         f"field (fields: {sorted(meta)}); set data.label_key")
            text = str(meta[self.label_key])
        else:
            raise DatasetLayoutError(f"{where} has no label .{self.label_key} (it has {sorted(files)}); set "
                                     "data.label_key to the extension (or .json field) holding the class index")
        try:
            label = int(text)
        except ValueError:
            raise DatasetLayoutError(f"{where}: the label {text[:40]!r} is not a class index") from None
        if label < 0:
            raise DatasetLayoutError(f"{where}: negative class index {label}")
        return label

    def _class_names(self) -> Optional[List[str]]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return None
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a loader worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        return self._files[shard]

    def open(self, index: int) -> Image.Image:
        f = self._file(int(self._shard_of[index]))
        f.seek(int(self._offsets[index]))
        return Image.open(io.BytesIO(f.read(int(self._sizes[index]))))

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self._shard_of[index])]}:{self.keys[index]}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        for f in getattr(self, "_files", {}).values():
            f.close()
