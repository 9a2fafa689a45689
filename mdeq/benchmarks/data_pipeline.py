"""The data pipeline alone: training images decoded and augmented per second, as the training loader makes them.

Beside the model's step in the training benchmark, this says which of the two limits a run. The images are an
ImageFolder (``root``; by default ``count`` JPEGs of 500x375, the size of a typical ImageNet photo, written once to
a temporary folder with smooth random content so they compress like photographs), read through this package's
``ImageFolderDataset`` and the training transform of the ImageNet recipes (``classification.build_transform``:
random-resized crop to ``size``, flip, normalisation), batched by a ``DataLoader`` with ``workers`` processes (the
tools' default: the cores this process may use). One batch warms the workers up; then ``batches`` batches are
timed. Reported: ``images_per_s`` and the equivalent ``step_s`` for a batch of ``batch``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

__all__ = ["run_pipeline", "write_photos"]


def write_photos(folder: Path, count: int = 96, size=(375, 500), classes: int = 2, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` (H, W) as an ImageFolder ``folder/train/<class>/``; returns ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        coarse = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        out = folder / "train" / f"c{i % classes}"
        out.mkdir(parents=True, exist_ok=True)
        img.save(out / f"{i:05d}.jpg", quality=90)
    return folder


def run_pipeline(root: Optional[Path] = None, size: int = 224, batch: int = 32, workers: Optional[int] = None,
                 batches: int = 6, count: int = 96) -> Dict:
    """Images per second through the training loader (see the module docstring)."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from mdeq.data.classification import ImageFolderDataset, build_transform, training_aug
    from mdeq.data.loaders import resolve_workers

    workers = resolve_workers(workers)
    with tempfile.TemporaryDirectory(prefix="mdeq-pipeline-") as tmp:
        folder = Path(root) if root is not None else write_photos(Path(tmp), count)
        data_cfg = dict(input_size=(3, size, size), interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN,
                        std=IMAGENET_DEFAULT_STD, crop_pct=0.875)
        aug = training_aug(dict(policy="rrc", scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, color_jitter=0.0))
        dataset = ImageFolderDataset(folder / "train", transform=build_transform(data_cfg, True, aug))
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (batches + 1))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                             persistent_workers=False)
        it = iter(loader)
        next(it)  # the workers start and warm up
        t0 = time.perf_counter()
        seen = 0
        for images, _ in it:
            seen += images.shape[0]
        seconds = time.perf_counter() - t0
    return dict(model="data pipeline", mode="data", max_iter=0, images=len(dataset), workers=workers, batch=batch,
                size=size, images_per_s=seen / seconds, step_s=batch / (seen / seconds))
