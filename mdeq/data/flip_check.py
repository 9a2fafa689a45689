"""Whether horizontal flips keep the classes of a data set: the check behind ``data.aug.hflip=auto``.

Flipping is the cheapest augmentation of natural images, whose classes do not depend on left and right; on
handwritten digits or text it teaches the model mirror shapes that look like other classes (mdeq_tiny on the digits,
3 epochs at 16x16: 78% with flips, 94% without). The check asks a nearest-class-mean classifier, the simplest model
of what separates the classes: built on half of a sample of the training images (grayscale, 16x16, each normalised),
it classifies the other half as they are and flipped. Flips keep the classes when the flipped images keep most of
its accuracy above chance (faces / non-faces: 89-100%; the digits: 31%, MNIST: 43-46%). When the classifier itself is
near chance (ImageNet-like data, whose class means say little) the check cannot tell, and flips are kept, as for
natural images.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from PIL import Image

__all__ = ["flip_retention", "FLIP_KEEPS_CLASSES", "INCONCLUSIVE_ACCURACY"]

FLIP_KEEPS_CLASSES = 0.7      # flipped images keeping this share of the above-chance accuracy keep their classes
INCONCLUSIVE_ACCURACY = 0.05  # a nearest-class-mean accuracy less than this above chance tells nothing


def _load(open_image: Callable[[], Image.Image], size: int) -> Optional[np.ndarray]:
    try:
        with open_image() as img:
            img.draft("L", (4 * size, 4 * size))  # a JPEG decodes at a reduced scale: fast on full-size photos
            x = np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64)
    except Exception:  # an unreadable file is the loader's (or data.verify's) to report
        return None
    return (x - x.mean()) / (x.std() + 1e-6)


def flip_retention(dataset, per_class: int = 100, max_images: int = 2000, size: int = 16,
                   seed: int = 0) -> Optional[float]:
    """The share of a nearest-class-mean classifier's accuracy above chance that horizontally flipped images keep
    (1: flips change nothing; about 0: flipped images look like other classes), from up to ``per_class`` training
    images of each class (at most ``max_images`` in all); None when the classifier is too close to chance to tell
    or the sample is too small. ``dataset`` is a classification source (``LabelledImages``: ``open``, ``targets``,
    ``classes``)."""
    targets = list(dataset.targets)
    n_classes = len(getattr(dataset, "classes", None) or set(targets))
    if n_classes < 2 or not targets:
        return None
    rng = np.random.default_rng(seed)
    per_class = max(2, min(per_class, max_images // n_classes))
    by_class: dict = {}
    for i in rng.permutation(len(targets)):
        target = int(targets[i])
        if len(by_class.setdefault(target, [])) < per_class:
            by_class[target].append(int(i))
    train_x, train_y, test_x, test_y = [], [], [], []
    for target, indices in by_class.items():
        images = [x for x in (_load(lambda i=i: dataset.open(i), size) for i in indices) if x is not None]
        half = len(images) // 2
        if half < 1:
            continue
        train_x += images[:half]
        train_y += [target] * half
        test_x += images[half:]
        test_y += [target] * (len(images) - half)
    present = sorted(set(train_y))
    if len(present) < 2 or len(test_x) < 2 * len(present):
        return None
    tx, ty = np.stack(train_x), np.array(train_y)
    means = np.stack([tx[ty == c].mean(0) for c in present])
    labels = np.array(present)
    x, y = np.stack(test_x), np.array(test_y)

    def accuracy(images: np.ndarray) -> float:
        distance = ((images[:, None] - means[None]) ** 2).sum(axis=(2, 3))
        return float((labels[distance.argmin(1)] == y).mean())

    chance = 1.0 / len(present)
    plain, flipped = accuracy(x), accuracy(x[:, :, ::-1])
    if plain - chance < INCONCLUSIVE_ACCURACY:
        return None
    return max(0.0, (flipped - chance) / (plain - chance))
