"""Semantic-segmentation metrics from a dataset-level confusion matrix: per-class IoU/accuracy, mIoU, aAcc.

The matrix is accumulated over the whole evaluation set (not averaged per image), as HRNet-Seg, mmsegmentation
and the Cityscapes scripts do; under DDP each rank counts its shard and ``reduce`` sums the int64 matrices.
Rows are ground truth, columns prediction. Pixels whose target is ``ignore_index`` are dropped first.

All numbers are percentages (0-100), like top-1 in the classification evaluation.

The absent-class rule
---------------------
``IoU_c = TP / (TP + FP + FN)`` = ``cm[c, c] / (row_c + col_c - cm[c, c])``. A class with no ground-truth pixels
and no predicted pixels (denominator 0) has IoU NaN and is left out of the mean (``nanmean``, as mmsegmentation
and the Cityscapes scripts do; HRNet-Seg instead counts it as 0). A class that is predicted but absent from the
ground truth has IoU 0 and is counted. Per-class accuracy (recall, ``TP / row_c``) is NaN for a class with no
ground-truth pixels and left out of mAcc the same way. The mean of all-NaN values (an empty matrix) is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .distributed import DistEnv

__all__ = ["ConfusionMatrix", "SegMetrics", "nanmean"]


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


@dataclass
class SegMetrics:
    """Percentages from a confusion matrix; NaN marks a class the absent-class rule leaves out."""

    iou: List[float]
    miou: float
    acc: List[float]
    macc: float
    aacc: float
    pixels: int
    class_pixels: List[int]

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    def as_dict(self, prefix: str = "", class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Flat scalars for logging: miou, macc, aacc, pixels and ``iou.<class>`` (index when no names)."""
        names = self._names(class_names)
        out: Dict[str, float] = {f"{prefix}miou": self.miou, f"{prefix}macc": self.macc,
                                 f"{prefix}aacc": self.aacc, f"{prefix}pixels": self.pixels}
        out.update({f"{prefix}iou.{n}": v for n, v in zip(names, self.iou)})
        return out

    def table(self, class_names: Optional[Sequence[str]] = None) -> str:
        """A Markdown table: one row per class (absent classes show "n/a") and a final mIoU / mAcc row."""
        names = self._names(class_names)
        rows = ["| class | IoU % | Acc % | GT pixels |", "|---|---:|---:|---:|"]
        rows += [f"| {n} | {_fmt(i)} | {_fmt(a)} | {p} |"
                 for n, i, a, p in zip(names, self.iou, self.acc, self.class_pixels)]
        rows.append(f"| mIoU | {_fmt(self.miou)} | {_fmt(self.macc)} | {self.pixels} |")
        return "\n".join(rows) + "\n"

    def _names(self, class_names: Optional[Sequence[str]]) -> List[str]:
        if class_names is None:
            return [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        return [str(n) for n in class_names]


class ConfusionMatrix:
    """A (C, C) int64 pixel count (rows = ground truth, columns = prediction), kept on ``device``.

    ``update`` does no host synchronisation on an accelerator, so it can run every batch. Out-of-range values
    are checked eagerly (a ValueError from ``update``) when ``eager_checks`` is true, which is the default on
    CPU where checking costs no device sync. Otherwise (the default elsewhere) they are counted on the device,
    left out of the matrix, and ``compute`` raises the ValueError.
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, device=None,
                 eager_checks: Optional[bool] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.eager_checks = device.type == "cpu" if eager_checks is None else bool(eager_checks)
        # C*C cells, then one bin for (deferred-check) pixels with an out-of-range value
        self._counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def matrix(self) -> torch.Tensor:
        """The (C, C) counts (a view; rows = ground truth, columns = prediction)."""
        c = self.num_classes
        return self._counts[:c * c].view(c, c)

    def reset(self) -> None:
        self._counts.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count the (target, pred) pairs of integer class maps of the same shape, ignored pixels dropped."""
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("pred and target must be tensors")
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer class indices, got {t.dtype} (argmax the logits first)")
        c = self.num_classes
        pred = pred.to(self.device, torch.int64, non_blocking=True).reshape(-1)
        target = target.to(self.device, torch.int64, non_blocking=True).reshape(-1)
        if self.ignore_index is None:
            kept = torch.ones_like(target, dtype=torch.bool)
        else:
            kept = target != self.ignore_index
        bad_target = (target < 0) | (target >= c)
        bad_pred = (pred < 0) | (pred >= c)
        if self.eager_checks:
            self._raise_if_bad("target", target, kept & bad_target)
            self._raise_if_bad("pred", pred, kept & bad_pred)
        ok = ~(bad_target | bad_pred)
        idx = torch.where(ok, target * c + pred, torch.full_like(target, c * c))
        self._counts.index_add_(0, idx, kept.to(torch.int64))

    def _raise_if_bad(self, name: str, values: torch.Tensor, bad: torch.Tensor) -> None:
        if bool(bad.any()):
            found = values[bad].unique()[:8].tolist()
            extra = f" other than ignore_index={self.ignore_index}" if name == "target" else ""
            raise ValueError(f"{name} has values outside [0, {self.num_classes}){extra}: {found} "
                             f"({int(bad.sum())} pixels)")

    def reduce(self, env: DistEnv) -> None:
        """Sum the counts over all ranks (in place; call once, after the last update). No-op in one process."""
        if not env.distributed:
            return
        t = self._counts.to(env.device) if env.device.type == "cuda" else self._counts  # nccl: on its device
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if t is not self._counts:
            self._counts.copy_(t)

    def compute(self) -> SegMetrics:
        """Per-class IoU / accuracy and their NaN-excluding means, in percent (see the module docstring)."""
        counts = self._counts.cpu()
        invalid = int(counts[-1])
        if invalid:
            raise ValueError(f"{invalid} counted pixels had a target or pred value outside [0, {self.num_classes}) "
                             f"(target ignore_index={self.ignore_index}); they were left out of the matrix")
        c = self.num_classes
        cm = counts[:c * c].view(c, c).double()
        tp = cm.diag()
        gt = cm.sum(1)
        union = gt + cm.sum(0) - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, 100.0 * tp / union.clamp(min=1), nan).tolist()
        acc = torch.where(gt > 0, 100.0 * tp / gt.clamp(min=1), nan).tolist()
        total = int(counts[:c * c].sum())
        aacc = 100.0 * float(tp.sum()) / total if total else math.nan
        return SegMetrics(iou=iou, miou=nanmean(iou), acc=acc, macc=nanmean(acc), aacc=aacc, pixels=total,
                          class_pixels=[int(v) for v in counts[:c * c].view(c, c).sum(1).tolist()])
