"""Segmentation test-time inference (whole image, sliding window, multi-scale + flip) and mIoU evaluation.

The modes follow HRNet-Seg's and mmsegmentation's test recipes:

* ``whole``: pad the image bottom/right to ``size_divisor``, run the model, upsample its (1/4-resolution) logits
  bilinearly to the padded size and crop back, so the padding never shifts pixels.
* ``slide``: mmseg's ``slide_inference``: ``window`` crops moved by ``stride`` (the last one shifted back
  inside the image), each run as in ``whole`` mode, overlapping logits averaged with a per-pixel count map.
* ``scales`` / ``flip``: the image is resized to each scale (and mirrored), the logits are brought back to the
  input size (and un-mirrored), and the softmax probabilities of all passes are summed (the usual TTA rule).

``SegInference.logits`` returns raw logits when there is exactly one pass (one scale, no flip) and the SUM of
the passes' probabilities otherwise; ``predict`` (the argmax) is the same either way and is what evaluation uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import DistEnv, all_reduce_sum
from .evaluate import autocast_context
from .seg_metrics import ConfusionMatrix, SegMetrics
from .solver_health import warn_diverged

__all__ = ["pad_to_multiple", "slide_windows", "SegInference", "build_inference", "SegEvalResult",
           "evaluate_segmentation"]

Size = Union[int, Sequence[int]]


def pad_to_multiple(x: torch.Tensor, divisor: int, value: float = 0.0) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pad (..., H, W) bottom/right so H and W are multiples of ``divisor``; also returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = -h % divisor, -w % divisor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (h, w)


def slide_windows(height: int, width: int, window: Tuple[int, int],
                  stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) crops of mmseg's sliding-window inference, row by row.

    ``max(H - h + sh - 1, 0) // sh + 1`` windows per column (likewise for rows); the last one is moved back so
    it ends at the border, and a window larger than the image is clipped to the image.
    """
    (h, w), (sh, sw) = window, stride
    rows = max(height - h + sh - 1, 0) // sh + 1
    cols = max(width - w + sw - 1, 0) // sw + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + h, height), min(j * sw + w, width)
            out.append((max(y2 - h, 0), y2, max(x2 - w, 0), x2))
    return out


def _pair(name: str, value: Size) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP / DataParallel wrapper (it holds ``cfg`` and ``deq_stats``)."""
    return getattr(model, "module", model)


class SegInference:
    """Full-resolution segmentation logits from a model whose ``forward`` may return reduced-size logits.

    Args:
        model: image (B, 3, H, W) -> logits (B, K, h, w), e.g. ``MDEQSegNet`` (h, w = H/4, W/4).
        mode: ``"whole"`` or ``"slide"``.
        window, stride: slide mode's crop size and step, an int or (h, w); stride defaults to the window.
        scales: image scale factors; each scaled size is ``int(H * s + 0.5)`` (round half up, as mmcv/HRNet).
        flip: also run the horizontally mirrored image.
        size_divisor: inputs are padded to multiples of it; default ``model.cfg.size_divisor`` (else 1).
        align_corners: for every bilinear resize (image scaling and logits upsampling).
        amp_dtype: run the model under ``torch.autocast`` with this dtype; the output is float32 regardless.
    """

    def __init__(self, model: nn.Module, mode: str = "whole", window: Optional[Size] = None,
                 stride: Optional[Size] = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                 size_divisor: Optional[int] = None, align_corners: bool = False,
                 amp_dtype: Optional[torch.dtype] = None):
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "whole" and (window is not None or stride is not None):
            raise ValueError("window/stride only apply to mode='slide'")
        self.window = self.stride = None
        if mode == "slide":
            if window is None:
                raise ValueError("mode='slide' needs a window size, e.g. window=(769, 769)")
            self.window = _pair("window", window)
            self.stride = _pair("stride", stride) if stride is not None else self.window
            if any(s > w for s, w in zip(self.stride, self.window)):
                raise ValueError(f"stride {self.stride} larger than window {self.window} would leave pixels unseen")
        scales = tuple(float(s) for s in ([scales] if isinstance(scales, (int, float)) else scales))
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales!r}")
        if size_divisor is None:
            cfg = getattr(_unwrap(model), "cfg", None)
            size_divisor = int(getattr(cfg, "size_divisor", 1))
        if isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
        self.model = model
        self.mode = mode
        self.scales = scales
        self.flip = bool(flip)
        self.size_divisor = size_divisor
        self.align_corners = bool(align_corners)
        self.amp_dtype = amp_dtype
        self._stats: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def num_passes(self) -> int:
        """Model runs per image (windows not counted): scales x (2 with flip)."""
        return len(self.scales) * (2 if self.flip else 1)

    @property
    def returns_probabilities(self) -> bool:
        """True when ``logits`` returns summed softmax probabilities (several passes), False for raw logits."""
        return self.num_passes > 1

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) float32 at the input resolution: logits for one pass, else summed probabilities."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        was_training = self.model.training
        self.model.eval()
        self._stats = []
        try:
            size = tuple(images.shape[-2:])
            total = None
            for s in self.scales:
                scaled = (max(1, int(size[0] * s + 0.5)), max(1, int(size[1] * s + 0.5)))
                x = images if scaled == size else self._resize(images, scaled)
                for flipped in ((False, True) if self.flip else (False,)):
                    out = self._infer(x.flip(-1) if flipped else x)
                    if flipped:
                        out = out.flip(-1)
                    out = self._resize(out, size)
                    if self.num_passes == 1:
                        return out
                    out = out.softmax(dim=1)
                    total = out if total is None else total.add_(out)
            return total
        finally:
            self.model.train(was_training)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64 class map: the argmax of ``logits``."""
        return self.logits(images).argmax(dim=1)

    def last_stats(self) -> Optional[Dict[str, torch.Tensor]]:
        """Per-sample DEQ ``nstep`` / ``rel_residual`` / ``abs_residual`` (B,), averaged over all forward passes
        (windows, scales, flips) of the last call, and ``diverged`` (1.0 where any pass diverged); None when the
        model exposes no ``deq_stats``."""
        if not self._stats:
            return None
        nstep, rel, absr, diverged = (torch.stack(v) for v in zip(*self._stats))
        return dict(nstep=nstep.mean(0), rel_residual=rel.mean(0), abs_residual=absr.mean(0),
                    diverged=diverged.amax(0))

    # ------------------------------------------------------------------ pieces
    def _resize(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        return self._whole(x) if self.mode == "whole" else self._slide(x)

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at x's size: pad to size_divisor, run, upsample to the padded size, crop."""
        padded, (h, w) = pad_to_multiple(x, self.size_divisor)
        with autocast_context(x.device, self.amp_dtype):
            out = self.model(padded)
        self._collect_stats()
        return self._resize(out.float(), tuple(padded.shape[-2:]))[..., :h, :w]

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """Windows' logits summed into place and divided by how many windows covered each pixel."""
        height, width = x.shape[-2:]
        total = None
        count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
        for y1, y2, x1, x2 in slide_windows(height, width, self.window, self.stride):
            out = self._whole(x[..., y1:y2, x1:x2])
            if total is None:
                total = out.new_zeros((x.shape[0], out.shape[1], height, width))
            total[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
        return total / count

    def _collect_stats(self) -> None:
        stats = getattr(_unwrap(self.model), "deq_stats", None)
        if stats is not None:
            self._stats.append((stats.nstep.detach().float(), stats.rel_residual.detach().float(),
                                stats.abs_residual.detach().float(), stats.diverged.detach().float()))


def build_inference(model: nn.Module, icfg: Optional[Mapping[str, Any]], amp_dtype=None) -> SegInference:
    """``SegInference`` from an ``inference`` config: mode (whole | slide), window, stride, scales, flip."""
    icfg = dict(icfg or {})
    window, stride = icfg.get("window"), icfg.get("stride")
    return SegInference(model, mode=icfg.get("mode", "whole"), window=None if window is None else tuple(window),
                        stride=None if stride is None else tuple(stride), scales=tuple(icfg.get("scales") or (1.0,)),
                        flip=bool(icfg.get("flip", False)), amp_dtype=amp_dtype)



@dataclass
class SegEvalResult:
    """Metrics (percent) over the whole evaluation set and the per-image means of the DEQ solver's stats.

    ``deq_*`` are 0.0 when the model exposes no ``deq_stats`` (as in the classification ``EvalResult``);
    ``deq_diverged`` counts the images whose solve diverged in any pass.
    """

    metrics: SegMetrics
    count: int
    deq_nstep_mean: float
    deq_rel_residual_mean: float
    deq_abs_residual_mean: float
    deq_diverged: int = 0

    @property
    def miou(self) -> float:
        return self.metrics.miou

    def as_dict(self, prefix: str = "", class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Flat scalars for logging (the metrics' ``as_dict`` plus count and the DEQ means)."""
        out = self.metrics.as_dict(prefix, class_names)
        out.update({f"{prefix}count": self.count, f"{prefix}deq_nstep_mean": self.deq_nstep_mean,
                    f"{prefix}deq_rel_residual_mean": self.deq_rel_residual_mean,
                    f"{prefix}deq_abs_residual_mean": self.deq_abs_residual_mean,
                    f"{prefix}deq_diverged": self.deq_diverged})
        return out


OnBatch = Callable[[List[int], torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable, env: DistEnv, num_classes: int,
                          ignore_index: Optional[int] = 255, inference: Optional[SegInference] = None,
                          progress: bool = True, desc: str = "eval",
                          on_batch: Optional[OnBatch] = None) -> SegEvalResult:
    """mIoU etc. of ``model`` over ``loader`` (this rank's shard), all-reduced so every rank gets the totals.

    ``loader`` yields (images (B, 3, H, W), masks (B, H, W) int with ``ignore_index``). ``on_batch(indices,
    images, masks, pred)`` is called per batch with the dataset indices of its samples, read in order from
    ``loader.sampler`` (an in-order shard sampler at evaluation; 0, 1, 2, ... when the loader has none).
    """
    inference = inference if inference is not None else SegInference(model)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=env.device)
    # nstep, rel. and abs. residual, diverged: summed on the device, read once
    stat_sums = torch.zeros(4, dtype=torch.float64, device=env.device)
    count = stat_count = 0
    sampler = getattr(loader, "sampler", None)
    index_iter = iter(sampler) if on_batch is not None and sampler is not None else None
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (progress and env.is_main))
    for images, masks in bar:
        images = images.to(env.device, non_blocking=True)
        masks = masks.to(env.device, non_blocking=True)
        pred = inference.predict(images)
        cm.update(pred, masks)
        b = images.shape[0]
        stats = inference.last_stats()
        if stats is not None:
            stat_sums += torch.stack([stats[k].sum() for k in ("nstep", "rel_residual", "abs_residual",
                                                               "diverged")]).to(stat_sums)
            stat_count += b
        if on_batch is not None:
            indices = list(islice(index_iter, b)) if index_iter is not None else list(range(count, count + b))
            if len(indices) != b:
                raise RuntimeError(f"loader.sampler ran out of indices: {len(indices)} for a batch of {b}")
            on_batch([int(i) for i in indices], images, masks, pred)
        count += b
    cm.reduce(env)
    count, stat_count, nstep, rel, absr, diverged = all_reduce_sum([count, stat_count] + stat_sums.tolist(), env)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    if env.is_main:
        warn_diverged(int(diverged), int(count), "evaluation")
    means = [v / stat_count if stat_count else 0.0 for v in (nstep, rel, absr)]  # no stats: 0.0
    return SegEvalResult(metrics=cm.compute(), count=int(count), deq_nstep_mean=means[0],
                         deq_rel_residual_mean=means[1], deq_abs_residual_mean=means[2], deq_diverged=int(diverged))
