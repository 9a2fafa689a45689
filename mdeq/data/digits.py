"""scikit-learn's handwritten digits written once as an ImageFolder tree (the default training job's data).

1797 real 8x8 grayscale scans of the digits 0-9 (UCI "optical recognition of handwritten digits"), shipped
inside the scikit-learn wheel, so the default job needs no download. Each image is upsampled to 32x32 and
saved as PNG under ``<root>/{train,val}/<digit>/``; the split is stratified and fixed (seeded), so every
run and every machine sees the same 80/20 split.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["prepare_digits", "default_digits_root", "DIGITS_VERSION"]

DIGITS_VERSION = 1  # bump when the written tree changes; the cache folder is versioned


def default_digits_root() -> Path:
    """``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``, plus ``digits32-v<version>``."""
    base = os.environ.get("MDEQ_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "mdeq-zoo", "data")
    return Path(base) / f"digits32-v{DIGITS_VERSION}"


def prepare_digits(root: Union[str, Path, None] = None, size: int = 32, val_fraction: float = 0.2,
                   seed: int = 0) -> Path:
    """Write the digits as ``root/{train,val}/<digit>/<index>.png`` unless already there; returns ``root``.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written dataset behind (a complete tree has a ``.complete`` marker).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root) if root is not None else default_digits_root()
    if (root / ".complete").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not a complete digits cache (no .complete marker); "
                              f"delete it or pass another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for label in range(10):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            n_val = int(round(len(idx) * val_fraction))
            for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
                folder = tmp / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for i in sorted(part.tolist()):
                    img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR)
                    img.save(folder / f"{i:04d}.png")
        (tmp / ".complete").write_text(f"sklearn digits, {size}x{size}, val_fraction={val_fraction}, seed={seed}\n")
        if root.exists():
            root.rmdir()  # empty (checked above)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / ".complete").is_file():  # not simply another process (a DDP rank) finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
