"""A generated street-scene dataset written in the official Cityscapes layout (the default segmentation data).

Real Cityscapes cannot be redistributed, so tests, demos and the default segmentation job use procedurally
drawn scenes instead: sky, buildings, vegetation, road, sidewalk, cars, persons and poles, plus void regions
(unlabeled, ego vehicle, out of roi, static, ground) stored with their REAL label ids, so the labelIds ->
trainIds mapping and the ignore handling are exercised exactly as on the real data. Each pixel takes its
class's Cityscapes colour with per-image brightness, per-class tint, smooth texture and per-pixel noise: a
small CNN can learn it (colour mostly predicts the class) but it is not trivially constant.
Everything is seeded, so the same arguments write byte-identical files.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .cache import build_once, data_cache_dir
from .cityscapes_labels import LABELS, label_id_to_train_id

__all__ = ["class_colors", "fill_rect", "check_generator_args", "draw_buildings", "draw_trees", "draw_ground", "draw_people",
           "draw_unlabeled_patch", "make_synthetic_cityscapes", "prepare_synthetic_cityscapes",
           "default_synthetic_root",
           "SYNTHETIC_VERSION", "SYNTHETIC_SPLITS", "SYNTHETIC_SIZE"]

SYNTHETIC_VERSION = 1  # bump when the generator's output changes; the cache folder is versioned
SYNTHETIC_SPLITS: Mapping[str, int] = MappingProxyType({"train": 96, "val": 24})
SYNTHETIC_SIZE = (128, 256)

# label ids drawn (official ids, not train ids)
UNLABELED, EGO, OUT_OF_ROI, STATIC, GROUND = 0, 1, 3, 4, 6
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 7, 8, 11, 17, 21, 23, 24, 26



def class_colors() -> np.ndarray:
    """float32 (256, 3): the official Cityscapes colour per label id; the void ids (black in the official table) get
    distinct grey-ish tones so they are not all alike. The generated stills and videos share it."""
    colors = np.zeros((256, 3), dtype=np.float32)
    for c in LABELS:
        if c.id >= 0:
            colors[c.id] = c.color
    colors[[UNLABELED, EGO, OUT_OF_ROI, STATIC, GROUND]] = [(96, 96, 96), (40, 40, 46), (22, 22, 22),
                                                            (128, 118, 108), (104, 88, 100)]
    return colors


_COLORS = class_colors()


def fill_rect(lab: np.ndarray, y0: float, y1: float, x0: float, x1: float, value: int) -> None:
    """Set a rectangle of a label map (clipped to the array, rounded to pixels) to ``value``."""
    h, w = lab.shape
    y0, y1 = max(0, int(round(y0))), min(h, int(round(y1)))
    x0, x1 = max(0, int(round(x0))), min(w, int(round(x1)))
    if y0 < y1 and x0 < x1:
        lab[y0:y1, x0:x1] = value


# The pieces of a street scene, shared with the generated video (synthetic_video.py). Each draws into ``lab``
# (official label ids) with sizes in units of ``unit`` pixels (the image width; a video's wider canvas keeps the
# frame width, so it holds more objects rather than bigger ones); their random draws are part of the datasets'
# content: a change in order or number changes every generated file (bump the versions).
def _grid(lab: np.ndarray):
    h, w = lab.shape
    return np.mgrid[0:h, 0:w].astype(np.float32)


def draw_buildings(rng: np.random.Generator, lab: np.ndarray, horizon: int, unit: float) -> None:
    """A row of buildings standing on the horizon, across the whole width."""
    h, w = lab.shape
    x = 0.0
    while x < w:
        bw = rng.uniform(0.08, 0.25) * unit
        if rng.random() < 0.8:
            fill_rect(lab, h * rng.uniform(0.04, 0.3), horizon, x, x + bw, BUILDING)
        x += bw


def draw_trees(rng: np.random.Generator, lab: np.ndarray, horizon: int, unit: float, most: int) -> None:
    """1 to ``most`` elliptic trees above the horizon."""
    h, w = lab.shape
    yy, xx = _grid(lab)
    for _ in range(int(rng.integers(1, most + 1))):
        cx, cy = rng.uniform(0, w), rng.uniform(0.2 * h, horizon)
        rx, ry = rng.uniform(0.05, 0.15) * unit, rng.uniform(0.06, 0.16) * h
        lab[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = VEGETATION


def draw_ground(rng: np.random.Generator, lab: np.ndarray, horizon: int, unit: float) -> Tuple[float, np.ndarray]:
    """The ground plane: a road widening towards the viewer, sidewalks left and right, sometimes an unpaved verge
    ('ground', void) on one side. Returns the road's vanishing x and its half width per pixel."""
    h, w = lab.shape
    yy, xx = _grid(lab)
    vp = w * rng.uniform(0.4, 0.6)
    half = (0.06 + 0.55 * np.clip((yy - horizon) / max(1, h - horizon), 0, 1)) * unit
    below = yy >= horizon
    lab[below] = ROAD
    lab[below & (np.abs(xx - vp) > half)] = SIDEWALK
    if rng.random() < 0.5:
        side = xx < vp - half * 1.6 if rng.random() < 0.5 else xx > vp + half * 1.6
        lab[below & side] = GROUND
    return vp, half


def draw_people(rng: np.random.Generator, lab: np.ndarray, horizon: int, vp: float, unit: float) -> None:
    """0 to 3 people: tall ellipses on the sidewalks, larger when nearer."""
    h, _ = lab.shape
    yy, xx = _grid(lab)
    for _ in range(int(rng.integers(0, 4))):
        t = rng.uniform(0.15, 0.8)
        base = horizon + t * (h - horizon)
        ph = (0.1 + 0.3 * t) * h
        px = vp + rng.choice([-1, 1]) * (0.06 + 0.55 * t) * unit * rng.uniform(1.1, 1.5)
        lab[((xx - px) / (ph * 0.18)) ** 2 + ((yy - (base - ph / 2)) / (ph / 2)) ** 2 <= 1] = PERSON


def draw_unlabeled_patch(rng: np.random.Generator, lab: np.ndarray, unit: float) -> None:
    """Half of the time, a small patch nobody labelled."""
    h, w = lab.shape
    if rng.random() < 0.5:
        y0, x0 = rng.uniform(0.2, 0.8) * h, rng.uniform(0, 0.9) * w
        fill_rect(lab, y0, y0 + rng.uniform(0.03, 0.08) * h, x0, x0 + rng.uniform(0.03, 0.08) * unit, UNLABELED)


def _draw_labels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One street-like scene as official label ids (uint8 H x W)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lab = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.4, 0.52))
    draw_buildings(rng, lab, horizon, w)
    draw_trees(rng, lab, horizon, w, most=3)
    vp, _ = draw_ground(rng, lab, horizon, w)
    for _ in range(int(rng.integers(0, 3))):  # void clutter ('static') on the pavement
        y1 = rng.uniform(horizon + 0.2 * (h - horizon), h)
        x0 = rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)]) * w
        fill_rect(lab, y1 - rng.uniform(0.03, 0.08) * h, y1, x0, x0 + rng.uniform(0.02, 0.06) * w, STATIC)
    for _ in range(int(rng.integers(1, 4))):  # poles standing on the sidewalk
        px = rng.choice([rng.uniform(0.02, 0.25), rng.uniform(0.75, 0.98)]) * w
        fill_rect(lab, h * rng.uniform(0.08, 0.3), horizon + rng.uniform(0.1, 0.5) * (h - horizon), px,
                  px + max(1.0, w * rng.uniform(0.005, 0.012)), POLE)
    draw_people(rng, lab, horizon, vp, w)
    for _ in range(int(rng.integers(1, 4))):  # cars on the road, larger when nearer
        t = rng.uniform(0.1, 0.8)
        bottom = horizon + t * (h - horizon)
        ch = (0.06 + 0.25 * t) * h
        cw = ch * rng.uniform(1.4, 2.2)
        cx = vp + rng.uniform(-0.7, 0.7) * (0.06 + 0.55 * t) * w
        fill_rect(lab, bottom - ch, bottom, cx - cw / 2, cx + cw / 2, CAR)
        fill_rect(lab, bottom - ch * 1.45, bottom - ch + 1, cx - cw * 0.3, cx + cw * 0.3, CAR)  # cabin
    # ego vehicle: the bonnet, a low arc along the bottom edge
    ego = rng.uniform(0.05, 0.1) * h
    lab[yy >= h - ego * (0.6 + 0.4 * (1 - ((xx - w / 2) / (w / 2)) ** 2))] = EGO
    if rng.random() < 0.5:  # out-of-roi frame at the left and right borders
        b = int(rng.integers(1, 3))
        lab[:, :b] = OUT_OF_ROI
        lab[:, w - b:] = OUT_OF_ROI
    draw_unlabeled_patch(rng, lab, w)
    return lab


def _render(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    """RGB uint8 pixels for a label map: class colour, per-class tint, brightness, smooth texture, noise."""
    h, w = lab.shape
    tint = rng.normal(0.0, 8.0, size=(256, 3)).astype(np.float32)
    img = _COLORS[lab] + tint[lab]
    coarse = rng.normal(0.0, 1.0, size=(max(2, h // 8), max(2, w // 8))).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    img += 10.0 * texture[..., None]
    img *= rng.uniform(0.75, 1.25)
    img += rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def check_generator_args(size: Tuple[int, int], cities: Sequence[str], splits: Mapping[str, int], what: str
                         ) -> Tuple[int, int, list]:
    """(H, W, city names) of a generator call, or a ValueError naming the bad argument (``what``: images, clips)."""
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16 (H, W), got {tuple(size)}")
    cities = [str(c) for c in cities]
    if not cities or any(not c or "/" in c or "_" in c for c in cities):
        raise ValueError(f"cities must be non-empty names without '/' or '_', got {cities}")
    for split, n in splits.items():
        if int(n) < 0 or not split or "/" in split:
            raise ValueError(f"bad split {split!r}: {n} {what}")
    return h, w, cities


def make_synthetic_cityscapes(root: Union[str, Path], splits: Mapping[str, int] = MappingProxyType({"train": 48,
                                                                                                   "val": 12}),
                              size: Tuple[int, int] = (128, 256), seed: int = 0,
                              cities: Sequence[str] = ("aachen", "bremen"), write_train_ids: bool = False) -> Path:
    """Write ``root/leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png`` and the matching
    ``root/gtFine/.../*_gtFine_labelIds.png`` (plus ``*_gtFine_labelTrainIds.png`` if ``write_train_ids``).

    Images are ``size`` = (H, W); sample ``i`` of a split goes to city ``cities[i % len(cities)]`` and is
    drawn from a generator seeded by (seed, split name, i), so a split's content does not depend on the others.
    """
    h, w, cities = check_generator_args(size, cities, splits, "images")
    root = Path(root)
    train_lut = label_id_to_train_id()
    for split, n in splits.items():
        split_key = zlib.crc32(split.encode("utf-8"))  # stable across runs (unlike hash())
        for i in range(int(n)):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_key, i]))
            lab = _draw_labels(rng, h, w)
            img = _render(rng, lab)
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{19:06d}"
            image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(image_dir / f"{stem}_leftImg8bit.png", compress_level=1)  # noisy: fast
            Image.fromarray(lab).save(label_dir / f"{stem}_gtFine_labelIds.png")
            if write_train_ids:
                Image.fromarray(train_lut[lab]).save(label_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


def default_synthetic_root() -> Path:
    """``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``, plus ``synthetic-cityscapes-v<version>``."""
    return data_cache_dir() / f"synthetic-cityscapes-v{SYNTHETIC_VERSION}"


def prepare_synthetic_cityscapes(root: Union[str, Path, None] = None) -> Path:
    """The default synthetic set (train 96 / val 24 at 128x256, seed 0, labelIds only) under ``root``, written
    once (``cache.build_once``: never half-written, one copy for concurrent DDP ranks); returns ``root``."""

    def write(folder: Path) -> str:
        make_synthetic_cityscapes(folder, splits=SYNTHETIC_SPLITS, size=SYNTHETIC_SIZE, seed=0)
        return (f"synthetic Cityscapes v{SYNTHETIC_VERSION}: {dict(SYNTHETIC_SPLITS)} images of "
                f"{SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}, seed 0, labelIds")

    return build_once(Path(root) if root is not None else default_synthetic_root(), write, "synthetic Cityscapes")
