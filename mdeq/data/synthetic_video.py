"""Generated street-scene video in the official Cityscapes sequence layout (the default video data).

Real Cityscapes sequences cannot be redistributed, so tests, demos and the default streaming job use generated
clips instead, written as::

    <root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png   frames 0..frames-1
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame:06d>_gtFine_labelIds.png            a label for EVERY frame
    <root>/videos.json                                                                   each clip's shot cuts

A clip is ``shots`` shots of about equal length. Each shot is a new scene from its own seeded generator: a street
canvas about 1.5 frames wide (sky, buildings, trees, road, sidewalks, poles, people and the void classes with
their REAL label ids, as ``synthetic_seg`` draws them) with a per-shot brightness, per-class tint and a smooth
texture that moves with the canvas. The camera pans across the canvas by at least one pixel per frame with a
small vertical jitter; 1-3 cars (label id 26) drive sideways across the road at their own speeds, drawn over the
background in the labels and the image; the ego vehicle's bonnet stays fixed in the frame. Every frame gets its
own pixel noise, and every label map is exact for its image. Everything is seeded: the same arguments write
byte-identical files.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import List, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .cache import build_once, data_cache_dir
from .synthetic_seg import (CAR, EGO, OUT_OF_ROI, POLE, SKY, STATIC, check_generator_args, class_colors,
                            draw_buildings, draw_ground, draw_people, draw_trees, draw_unlabeled_patch, fill_rect)
from .video import write_video_manifest

__all__ = ["make_synthetic_video", "prepare_synthetic_video", "default_synthetic_video_root", "shot_starts",
           "SYNTHETIC_VIDEO_VERSION", "SYNTHETIC_VIDEO_SPLITS", "SYNTHETIC_VIDEO_FRAMES", "SYNTHETIC_VIDEO_SHOTS",
           "SYNTHETIC_VIDEO_SIZE"]

SYNTHETIC_VIDEO_VERSION = 1  # bump when the generator's output changes; the cache folder is versioned
SYNTHETIC_VIDEO_SPLITS: Mapping[str, int] = MappingProxyType({"train": 8, "val": 4})  # clips per split
SYNTHETIC_VIDEO_FRAMES = 30
SYNTHETIC_VIDEO_SHOTS = 3
SYNTHETIC_VIDEO_SIZE = (128, 256)
CANVAS_WIDTH = 1.5  # the scene canvas, in frame widths: room for the camera to pan
NOISE_STD = 5.0  # per-frame pixel noise (grey levels)


_COLORS = class_colors()


# ------------------------------------------------------------------------------------------------ drawing
def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth (h, w) noise: a coarse normal grid upsampled bilinearly."""
    coarse = rng.normal(0.0, 1.0, size=(max(2, h // 8), max(2, w // 8))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _paint(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    """Float RGB for a label map: class colour + per-class tint + smooth texture (no brightness, no noise)."""
    tint = rng.normal(0.0, 8.0, size=(256, 3)).astype(np.float32)
    return _COLORS[lab] + tint[lab] + 10.0 * _texture(rng, *lab.shape)[..., None]


def _draw_street(rng: np.random.Generator, h: int, w: int, frame_w: int) -> Tuple[np.ndarray, int, float]:
    """A street canvas (h, w) as official label ids, without cars; returns (labels, horizon row, vanishing x).
    Object sizes scale with the frame width, so a wider canvas holds more of them, not bigger ones."""
    lab = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.4, 0.52))  # a whole row: buildings end exactly where the road starts
    draw_buildings(rng, lab, horizon, frame_w)
    draw_trees(rng, lab, horizon, frame_w, most=4)
    vp, _ = draw_ground(rng, lab, horizon, frame_w)
    for _ in range(int(rng.integers(0, 3))):  # void clutter ('static') on the pavement
        y1 = rng.uniform(horizon + 0.2 * (h - horizon), h)
        x0 = vp + rng.choice([-1, 1]) * rng.uniform(0.65, 0.95) * frame_w
        fill_rect(lab, y1 - rng.uniform(0.03, 0.08) * h, y1, x0, x0 + rng.uniform(0.02, 0.06) * frame_w, STATIC)
    for _ in range(int(rng.integers(2, 5))):  # poles standing on the sidewalk
        px = vp + rng.choice([-1, 1]) * rng.uniform(0.25, 0.75) * frame_w
        fill_rect(lab, h * rng.uniform(0.08, 0.3), horizon + rng.uniform(0.1, 0.5) * (h - horizon), px,
                  px + max(1.0, frame_w * rng.uniform(0.005, 0.012)), POLE)
    draw_people(rng, lab, horizon, vp, frame_w)
    draw_unlabeled_patch(rng, lab, frame_w)
    return lab, horizon, vp


def _draw_ego(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Label ids fixed to the frame (0 = none): the ego vehicle's bonnet and, sometimes, an out-of-roi border."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lab = np.zeros((h, w), dtype=np.uint8)
    ego = rng.uniform(0.05, 0.1) * h
    lab[yy >= h - ego * (0.6 + 0.4 * (1 - ((xx - w / 2) / (w / 2)) ** 2))] = EGO
    if rng.random() < 0.5:
        b = int(rng.integers(1, 3))
        lab[:, :b] = OUT_OF_ROI
        lab[:, w - b:] = OUT_OF_ROI
    return lab


@dataclass
class _Car:
    """A car sprite (mask + float RGB) moving sideways: canvas position ``x + speed * t``, bottom row ``bottom``."""

    mask: np.ndarray
    rgb: np.ndarray
    x: float
    bottom: float
    speed: float


def _make_car(rng: np.random.Generator, horizon: float, vp: float, h: int, frame_w: int, speed: float) -> _Car:
    """A car on the road at a random depth: body and cabin (darker windows), larger when nearer."""
    t = rng.uniform(0.1, 0.8)
    bottom = horizon + t * (h - horizon)
    ch = (0.06 + 0.25 * t) * h
    cw = ch * rng.uniform(1.4, 2.2)
    ph, pw = max(2, int(round(ch * 1.45))), max(2, int(round(cw)))
    mask = np.zeros((ph, pw), dtype=bool)
    body_top = ph - max(1, int(round(ch)))
    mask[body_top:] = True
    cabin = np.zeros_like(mask)
    cabin[: body_top + 1, int(round(pw * 0.2)): max(int(round(pw * 0.2)) + 1, int(round(pw * 0.8)))] = True
    mask |= cabin
    rgb = _COLORS[CAR] + rng.normal(0.0, 15.0, size=3).astype(np.float32) + 10.0 * _texture(rng, ph, pw)[..., None]
    rgb[: body_top] *= 0.7  # the cabin's windows are darker than the body
    x = vp + rng.uniform(-0.7, 0.7) * (0.06 + 0.55 * t) * frame_w - pw / 2
    return _Car(mask, rgb.astype(np.float32), x, bottom, speed)


def _paste(lab: np.ndarray, img: np.ndarray, car: _Car, x: int, bottom: int) -> None:
    """Draw a car sprite with its bottom-left corner at (bottom, x) of the frame, clipped to the frame."""
    ph, pw = car.mask.shape
    h, w = lab.shape
    y0, x0 = bottom - ph, x
    fy0, fx0, fy1, fx1 = max(0, y0), max(0, x0), min(h, y0 + ph), min(w, x0 + pw)
    if fy0 >= fy1 or fx0 >= fx1:
        return
    m = car.mask[fy0 - y0: fy1 - y0, fx0 - x0: fx1 - x0]
    lab[fy0:fy1, fx0:fx1][m] = CAR
    img[fy0:fy1, fx0:fx1][m] = car.rgb[fy0 - y0: fy1 - y0, fx0 - x0: fx1 - x0][m]


# ------------------------------------------------------------------------------------------------ shots
def shot_starts(frames: int, shots: int) -> Tuple[int, ...]:
    """The cut frames of a clip of ``frames`` frames made of ``shots`` shots of about equal length."""
    return tuple(int(round(k * frames / shots)) for k in range(1, shots))


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))  # half up: offsets never stall the way banker's rounding can


def _render_shot(rng: np.random.Generator, n: int, h: int, w: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``n`` frames (label ids, float RGB before noise) of one shot: a panning camera over a street canvas with
    sideways-moving cars and a fixed bonnet, under one brightness."""
    scale = w / 256  # speeds in pixels per frame at the default width, scaled to the frame
    jitter = 1
    ch, cw = h + 2 * jitter, max(w + 1, int(round(CANVAS_WIDTH * w)))
    canvas, horizon, vp = _draw_street(rng, ch, cw, w)
    canvas_rgb = _paint(rng, canvas)
    ego = _draw_ego(rng, h, w)
    ego_rgb = _paint(rng, ego)
    room = cw - w
    pan = min(max(1.0, rng.uniform(1.0, 3.0) * scale), room / max(1, n - 1))  # >= 1 px/frame where there is room
    direction = 1 if rng.random() < 0.5 else -1
    x_start = rng.uniform(0, room - pan * (n - 1)) if direction > 0 else rng.uniform(pan * (n - 1), room)
    dy = np.clip(np.cumsum(rng.choice([-1, 0, 1], size=n, p=[0.2, 0.6, 0.2])), -jitter, jitter)  # camera shake
    cars = [_make_car(rng, horizon, vp, ch, w, rng.choice([-1, 1]) * rng.uniform(1.0, 4.0) * scale)
            for _ in range(int(rng.integers(1, 4)))]
    cars.sort(key=lambda c: c.bottom)  # farther cars first, nearer ones drawn over them
    brightness = rng.uniform(0.75, 1.25)
    out = []
    for t in range(n):
        ox, oy = _round(x_start + direction * pan * t), jitter + int(dy[t])
        lab = canvas[oy:oy + h, ox:ox + w].copy()
        img = canvas_rgb[oy:oy + h, ox:ox + w].copy()
        for car in cars:
            _paste(lab, img, car, _round(car.x + car.speed * t) - ox, _round(car.bottom) - oy)
        fixed = ego > 0
        lab[fixed] = ego[fixed]
        img[fixed] = ego_rgb[fixed]
        out.append((lab, img * brightness))
    return out


def _clip_frames(seed: int, split_key: int, index: int, frames: int, shots: int, h: int, w: int
                 ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(label ids uint8, RGB uint8) per frame of clip ``index``: shot k from generator (seed, split, index, 0, k),
    frame t's noise from generator (seed, split, index, 1, t)."""
    starts = (0,) + shot_starts(frames, shots) + (frames,)
    out = []
    for k in range(shots):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_key, index, 0, k]))
        out += _render_shot(rng, starts[k + 1] - starts[k], h, w)
    result = []
    for t, (lab, img) in enumerate(out):
        noise = np.random.default_rng(np.random.SeedSequence([seed, split_key, index, 1, t]))
        img = img + noise.normal(0.0, NOISE_STD, size=img.shape).astype(np.float32)
        result.append((lab, np.clip(np.round(img), 0, 255).astype(np.uint8)))
    return result


# ------------------------------------------------------------------------------------------------ writing
def make_synthetic_video(root: Union[str, Path], splits: Mapping[str, int] = SYNTHETIC_VIDEO_SPLITS,
                         frames: int = SYNTHETIC_VIDEO_FRAMES, size: Tuple[int, int] = SYNTHETIC_VIDEO_SIZE,
                         shots: int = SYNTHETIC_VIDEO_SHOTS, seed: int = 0,
                         cities: Sequence[str] = ("aachen", "bremen")) -> Path:
    """Write ``splits[split]`` clips of ``frames`` frames of ``size`` = (H, W) per split in the Cityscapes
    sequence layout, a ``labelIds`` file for every frame, and ``root/videos.json`` with each clip's cuts.

    Clip ``i`` of a split is ``<city>/<city>_<i // len(cities):06d>`` with city ``cities[i % len(cities)]``;
    its content depends only on (seed, split name, i), not on the other splits.
    """
    h, w, cities = check_generator_args(size, cities, splits, "clips")
    frames, shots = int(frames), int(shots)
    if frames < 1 or not 1 <= shots <= frames:
        raise ValueError(f"need frames >= 1 and 1 <= shots <= frames, got frames={frames}, shots={shots}")
    root = Path(root)
    manifest = {}
    for split, n in splits.items():
        split_key = zlib.crc32(split.encode("utf-8"))  # stable across runs (unlike hash())
        manifest[split] = []
        for i in range(int(n)):
            city = cities[i % len(cities)]
            clip = f"{city}_{i // len(cities):06d}"
            image_dir = root / "leftImg8bit_sequence" / split / city
            label_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            for t, (lab, img) in enumerate(_clip_frames(int(seed), split_key, i, frames, shots, h, w)):
                stem = f"{clip}_{t:06d}"
                Image.fromarray(img).save(image_dir / f"{stem}_leftImg8bit.png", compress_level=1)  # noisy: fast
                Image.fromarray(lab).save(label_dir / f"{stem}_gtFine_labelIds.png")
            manifest[split].append((f"{city}/{clip}", frames, shot_starts(frames, shots)))
    write_video_manifest(root, manifest)
    return root


def default_synthetic_video_root() -> Path:
    """``$MDEQ_DATA`` or ``~/.cache/mdeq-zoo/data``, plus ``synthetic-video-v<version>``."""
    return data_cache_dir() / f"synthetic-video-v{SYNTHETIC_VIDEO_VERSION}"


def prepare_synthetic_video(root: Union[str, Path, None] = None) -> Path:
    """The default synthetic video set (train 8 / val 4 clips of 30 frames, 3 shots, 128x256, seed 0) under
    ``root``, written once (``cache.build_once``: never half-written, one copy for concurrent DDP ranks)."""

    def write(folder: Path) -> str:
        make_synthetic_video(folder, splits=SYNTHETIC_VIDEO_SPLITS, frames=SYNTHETIC_VIDEO_FRAMES,
                             size=SYNTHETIC_VIDEO_SIZE, shots=SYNTHETIC_VIDEO_SHOTS, seed=0)
        return (f"synthetic video v{SYNTHETIC_VIDEO_VERSION}: {dict(SYNTHETIC_VIDEO_SPLITS)} clips of "
                f"{SYNTHETIC_VIDEO_FRAMES} frames, {SYNTHETIC_VIDEO_SHOTS} shots, {SYNTHETIC_VIDEO_SIZE[0]}x"
                f"{SYNTHETIC_VIDEO_SIZE[1]}, seed 0, labelIds for every frame")

    return build_once(Path(root) if root is not None else default_synthetic_video_root(), write, "synthetic video")
