"""scikit-learn's handwritten digits written once as an ImageFolder tree (the default training job's data).

1797 real 8x8 grayscale scans of the digits 0-9 (UCI "optical recognition of handwritten digits"), shipped
inside the scikit-learn wheel, so the default job needs no download. Each image is upsampled to 32x32 and
saved as PNG under ``<root>/{train,val}/<digit>/``; the split is stratified and fixed (seeded), so every
run and every machine sees the same 80/20 split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .cache import build_once, data_cache_dir, write_imagefolder

__all__ = ["prepare_digits", "default_digits_root", "DIGITS_VERSION"]

DIGITS_VERSION = 1  # bump when the written tree changes; the cache folder is versioned


def default_digits_root() -> Path:
    """``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``, plus ``digits32-v<version>``."""
    return data_cache_dir() / f"digits32-v{DIGITS_VERSION}"


def prepare_digits(root: Union[str, Path, None] = None, size: int = 32, val_fraction: float = 0.2,
                   seed: int = 0) -> Path:
    """Write the digits as ``root/{train,val}/<digit>/<index>.png`` unless already there; returns ``root``
    (``cache.build_once``: never half-written)."""

    def write(folder: Path) -> str:
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        scans = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
        images = np.stack([np.asarray(Image.fromarray(a, mode="L").resize((size, size), Image.BILINEAR))
                           for a in scans])
        write_imagefolder(folder, images, digits.target, [str(c) for c in range(10)], val_fraction, seed)
        return f"sklearn digits, {size}x{size}, val_fraction={val_fraction}, seed={seed}"

    return build_once(Path(root) if root is not None else default_digits_root(), write, "digits")
