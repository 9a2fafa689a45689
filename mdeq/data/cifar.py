"""CIFAR-10 and CIFAR-100 as builtin datasets: torchvision's archive, downloaded once into the data cache and checked
against its md5, then written once as an ImageFolder tree (``train/<class>/*.png`` from the training batches,
``val/<class>/*.png`` from the test batch), which the classification tools read like any other.

The archive's address, file name, checksum and the batches inside it are torchvision's (``CIFAR10`` / ``CIFAR100``
class attributes), so a copy fetched by hand in torchvision's format works: put it at
``<data cache>/downloads/<file name>`` (the data cache is ``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``). Offline,
or behind a proxy, the error says exactly that. The batches are read from the archive with ``pickle`` (the format's
own description), so nothing beyond the checked archive is trusted.
"""
from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Type, Union

import numpy as np

from .cache import build_once, data_cache_dir
from .errors import DatasetLayoutError

__all__ = ["CIFAR_VERSION", "CIFAR_DATASETS", "prepare_cifar", "prepare_cifar10", "prepare_cifar100",
           "cifar_archive", "default_cifar_root", "CifarDownloadError"]

CIFAR_VERSION = 1  # bump when the written tree changes; the cache folder is versioned


class CifarDownloadError(RuntimeError):
    """The archive could not be fetched or is not the right file; the message says where to put a copy."""


@dataclass(frozen=True)
class _Spec:
    torchvision_class: str  # torchvision.datasets.<name>: url, filename, tgz_md5, base_folder, train/test lists
    labels_key: str  # the label list in each batch
    names_key: str  # the class names in the meta file


CIFAR_DATASETS: Dict[str, _Spec] = {
    "cifar10": _Spec("CIFAR10", "labels", "label_names"),
    "cifar100": _Spec("CIFAR100", "fine_labels", "fine_label_names"),
}


def _torchvision(name: str) -> Type:
    import torchvision.datasets

    return getattr(torchvision.datasets, CIFAR_DATASETS[name].torchvision_class)


def default_cifar_root(name: str) -> Path:
    """``<data cache>/<name>-v<version>``: the ImageFolder tree."""
    return data_cache_dir() / f"{name}-v{CIFAR_VERSION}"


def cifar_archive(name: str) -> Path:
    """The archive in the data cache, downloaded (once) and checked against torchvision's md5."""
    from torchvision.datasets.utils import check_integrity, download_url

    cls = _torchvision(name)
    folder = data_cache_dir() / "downloads"
    path = folder / cls.filename
    where = (f"fetch {cls.url} by hand and put it at {path} (or set MDEQ_DATA to a folder holding "
             f"downloads/{cls.filename}); expected md5 {cls.tgz_md5}")
    if path.is_file():
        if not check_integrity(str(path), cls.tgz_md5):
            raise CifarDownloadError(f"{path} is not torchvision's {cls.filename} (md5 differs): delete it and run "
                                     f"again to download it, or {where}")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    try:
        download_url(cls.url, str(folder), cls.filename, cls.tgz_md5)
    except Exception as e:  # URLError, timeouts, proxies, a truncated or wrong file
        path.unlink(missing_ok=True)
        raise CifarDownloadError(f"could not download {name} ({type(e).__name__}: {e}): {where}") from e
    if not check_integrity(str(path), cls.tgz_md5):
        path.unlink(missing_ok=True)
        raise CifarDownloadError(f"the download of {cls.url} does not match its md5: {where}")
    return path


def _read_batches(archive: Path, name: str) -> Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]:
    """{"train": (images (N, 32, 32, 3) uint8, labels (N,)), "val": ...} and the class names, from the archive."""
    cls, spec = _torchvision(name), CIFAR_DATASETS[name]

    def load(tar: tarfile.TarFile, member: str) -> dict:
        path = f"{cls.base_folder}/{member}"
        try:
            f = tar.extractfile(path)
        except KeyError:
            f = None
        if f is None:
            raise DatasetLayoutError(f"{archive} has no {path}: not torchvision's {cls.filename} format (expected "
                                     f"{cls.base_folder}/ with {', '.join(m for m, _ in cls.train_list + cls.test_list)}"
                                     f" and {cls.meta['filename']})")
        return pickle.load(f, encoding="latin1")

    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for split, members in (("train", cls.train_list), ("val", cls.test_list)):
            batches = [load(tar, member) for member, _ in members]
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[spec.labels_key], dtype=np.int64) for b in batches])
            out[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
        names = [str(n) for n in load(tar, cls.meta["filename"])[spec.names_key]]
    return out, names


def prepare_cifar(name: str, root: Union[str, Path, None] = None) -> Path:
    """The ImageFolder tree of ``name`` ("cifar10" or "cifar100") under ``root`` (default: the data cache), written
    once from the checked archive (``cache.build_once``: never half-written); returns the root. A ``root`` that
    already holds an ImageFolder export of one's own (``train/`` and ``val/`` class folders, no cache marker) is
    used as it is."""
    if name not in CIFAR_DATASETS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; choices: {sorted(CIFAR_DATASETS)}")
    if root is not None and (Path(root) / "train").is_dir() and not (Path(root) / ".complete").exists():
        return Path(root)

    def write(folder: Path) -> str:
        from PIL import Image

        archive = cifar_archive(name)
        splits, names = _read_batches(archive, name)
        for split, (images, labels) in splits.items():
            for c, class_name in enumerate(names):
                (folder / split / class_name).mkdir(parents=True, exist_ok=True)
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(folder / split / names[label] / f"{i:05d}.png", compress_level=1)
        sizes = {split: len(labels) for split, (_, labels) in splits.items()}
        return f"{name} from {archive.name} (torchvision's archive, md5 checked): {sizes} images, {len(names)} classes"

    return build_once(Path(root) if root is not None else default_cifar_root(name), write, name)


def prepare_cifar10(root: Union[str, Path, None] = None) -> Path:
    return prepare_cifar("cifar10", root)


def prepare_cifar100(root: Union[str, Path, None] = None) -> Path:
    return prepare_cifar("cifar100", root)
