"""Segmentation training loss: cross-entropy on logits upsampled to the label size, with ignore pixels,
optional class weights and optional OHEM (online hard example mining, as in HRNet-Seg's ``OhemCrossEntropy``).

The model predicts at 1/4 resolution; like the original MDEQ / HRNet code, logits are bilinearly upsampled
to the label's size before the loss (labels are never downsampled, so thin classes keep their pixels).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CITYSCAPES_CLASS_WEIGHTS", "SegmentationLoss", "resolve_class_weights"]

# Per-class weights of the HRNet-Seg / MDEQ Cityscapes loss (trainId order), used by the official recipes.
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)


def resolve_class_weights(spec: Union[None, str, Sequence[float]], num_classes: int) -> Optional[torch.Tensor]:
    """None, ``'cityscapes'`` (the 19 official weights) or one weight per class."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "cityscapes":
            raise ValueError(f"loss.class_weights must be null, 'cityscapes' or a list of {num_classes} numbers, "
                             f"got {spec!r}")
        spec = CITYSCAPES_CLASS_WEIGHTS
    weights = torch.tensor([float(w) for w in spec], dtype=torch.float32)
    if weights.numel() != num_classes or not bool((weights > 0).all()):
        raise ValueError(f"loss.class_weights needs {num_classes} positive numbers (one per class), got "
                         f"{weights.numel()}: {list(spec)}")
    return weights


class SegmentationLoss(nn.Module):
    """Pixel-wise cross-entropy; with ``ohem_thresh`` only the hard pixels count.

    OHEM: pixels whose predicted probability of the true class is below ``max(ohem_thresh, p_k)`` are kept,
    where p_k is the (``ohem_min_kept`` + 1)-th smallest such probability in the batch, so at least
    ``ohem_min_kept`` pixels always contribute (HRNet-Seg's rule; thresh 0.9 / min_kept 131072 there).
    """

    def __init__(self, ignore_index: int = 255, class_weights: Optional[torch.Tensor] = None,
                 ohem_thresh: Optional[float] = None, ohem_min_kept: int = 131072):
        super().__init__()
        if ohem_thresh is not None and not 0.0 < float(ohem_thresh) <= 1.0:
            raise ValueError(f"loss.ohem_thresh must be in (0, 1], got {ohem_thresh}")
        if int(ohem_min_kept) < 1:
            raise ValueError(f"loss.ohem_min_kept must be >= 1, got {ohem_min_kept}")
        self.ignore_index = int(ignore_index)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.ohem_thresh = None if ohem_thresh is None else float(ohem_thresh)
        self.ohem_min_kept = int(ohem_min_kept)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"expected logits (B, K, h, w) and labels (B, H, W), got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        logits = logits.float()  # upsample and reduce in float32 under autocast too
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        valid = target.flatten() != self.ignore_index
        if not bool(valid.any()):  # no labelled pixel (a crop of padding, sparse labels): a zero, not NaN
            return logits.sum() * 0.0
        if self.ohem_thresh is None:
            return F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)
        pixel_loss = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                     reduction="none").flatten()
        with torch.no_grad():
            prob = logits.softmax(dim=1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).flatten()
            prob_valid = prob[valid]
            k = min(self.ohem_min_kept, prob_valid.numel() - 1)  # 0-based: at least min_kept pixels fall below
            threshold = max(float(prob_valid.kthvalue(k + 1).values), self.ohem_thresh)
            keep = valid & (prob < threshold)
        if not bool(keep.any()):
            keep = valid
        return pixel_loss[keep].mean()
