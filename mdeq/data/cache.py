"""The data cache: datasets written once (bundled, generated or converted from a package) under ``$MDEQ_DATA`` or
``~/.cache/mdeq-zoo/data``, built in a temporary sibling folder and renamed into place, so an interrupted run never
leaves a half-written dataset behind (a complete tree has a ``.complete`` marker) and concurrent callers (DDP ranks)
agree on one copy."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["data_cache_dir", "build_once", "write_imagefolder"]


def data_cache_dir() -> Path:
    """``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``."""
    return Path(os.environ.get("MDEQ_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "mdeq-zoo", "data"))


def build_once(root: Path, write: Callable[[Path], str], what: str) -> Path:
    """``root``, built by ``write(folder)`` (which fills ``folder`` and returns the ``.complete`` note) unless a
    complete copy is there already. A non-empty ``root`` without the marker is an error naming it."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not a complete {what} cache (no .complete marker); delete it or "
                              f"pass another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        note = write(tmp)
        (tmp / ".complete").write_text(note.rstrip("\n") + "\n")
        try:
            if root.exists():
                root.rmdir()  # empty (checked above), unless another process just put its copy here
            os.replace(tmp, root)
        except OSError:
            if not (root / ".complete").is_file():  # not simply another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_imagefolder(folder: Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      val_fraction: float = 0.2, seed: int = 0) -> None:
    """Write uint8 ``images`` (N, H, W) or (N, H, W, 3) as ``folder/{train,val}/<class name>/<index>.png`` with a
    stratified split: each class's indices shuffled by one seeded generator (classes in label order), the first
    ``val_fraction`` of each to val."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(class_names):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            out = folder / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in sorted(part.tolist()):
                Image.fromarray(images[i]).save(out / f"{i:04d}.png")
