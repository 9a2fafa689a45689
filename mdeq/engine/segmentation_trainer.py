"""Semantic segmentation training (``tools/train_seg.py``): ``SegmentationTrainer``.

The loop, recipe, AMP, DDP (SyncBN under torchrun), EMA, checkpoints and resume are those of
``training_loop.Trainer``; this adds the segmentation parts: Cityscapes-layout or images/ + masks/ datasets
with albumentations augmentation, an MDEQ segmentation model optionally initialised from ImageNet
classification weights, cross-entropy with class weights / OHEM on logits upsampled to the labels, and
evaluation by a dataset-level confusion matrix (mIoU, per-class IoU) with whole-image, sliding-window or
multi-scale + flip inference. TensorBoard gets per-class IoU and a few predictions next to the ground truth.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..data.factory import build_segmentation_datasets
from ..data.loaders import SeededDataset
from ..data.segmentation import build_seg_eval_transform, build_seg_train_transform, collate_same_size, colorize
from .seg_inference import SegEvalResult, build_inference, evaluate_segmentation
from .seg_loss import SegmentationLoss, resolve_class_weights
from .seg_model import build_segmentation_model
from .training_loop import Trainer

__all__ = ["SegmentationTrainer"]

_log = logging.getLogger("mdeq.train")


LOG_IMAGE_HEIGHT = 256  # TensorBoard panels are shrunk to this height (a Cityscapes panel would be 1024x6144)


def _fit_height(panel: np.ndarray, height: int) -> np.ndarray:
    """Shrink an (H, W, 3) panel to at most ``height`` rows (nearest neighbour keeps label colours exact)."""
    if panel.shape[0] <= height:
        return panel
    from PIL import Image

    width = max(1, round(panel.shape[1] * height / panel.shape[0]))
    return np.asarray(Image.fromarray(panel).resize((width, height), Image.NEAREST))


def _size(name: str, v: Any) -> Tuple[int, int]:
    """A [height, width] config value (or one number for both)."""
    if isinstance(v, (int, float)):
        return int(v), int(v)
    if v is None or len(v) != 2:
        raise ValueError(f"{name} must be [height, width], got {v}")
    return int(v[0]), int(v[1])


class SegmentationTrainer(Trainer):
    """Everything a segmentation run needs, built from a resolved config dict."""

    task = "segmentation"
    score_name = "val_miou"
    eval_collate = staticmethod(collate_same_size)

    # ------------------------------------------------------------------ data and model
    def build_datasets(self):
        return build_segmentation_datasets(self.cfg["data"], self.env)

    def build_model(self) -> nn.Module:
        model_cfg = dict(self.cfg["model"])
        if self.tcfg.get("resume"):  # the checkpoint holds the weights: no need to fetch the starting ones again
            model_cfg.update(pretrained=None, weights=None, backbone=None)
        model, info = build_segmentation_model(model_cfg, self.num_classes, kwargs=self.model_kwargs)
        self.init_info = info
        for line in info.get("log", []):
            _log.info("%s", line)
        return model

    def setup_transforms(self) -> None:
        d = self.cfg["data"]
        self.mean = tuple(d.get("mean") or IMAGENET_DEFAULT_MEAN)
        self.std = tuple(d.get("std") or IMAGENET_DEFAULT_STD)
        divisor = self.model.cfg.size_divisor
        crop = _size("data.crop_size", d["crop_size"])
        if crop[0] % divisor or crop[1] % divisor:
            raise ValueError(f"data.crop_size {list(crop)} must be divisible by {divisor} for "
                             f"{self.cfg['model']['name']} (2^(downsample_times + num_branches - 1))")
        self.train_set.transform = build_seg_train_transform(
            crop_size=crop, scale_range=tuple(d.get("scale_range") or (1.0, 1.0)), flip=bool(d.get("flip", True)),
            mean=self.mean, std=self.std, ignore_index=self.train_set.ignore_index)
        self.val_set.transform = build_seg_eval_transform(mean=self.mean, std=self.std)
        self.inference = None  # built per evaluated model

    def setup_loss(self) -> None:
        lcfg = dict(self.cfg.get("loss") or {})
        weights = resolve_class_weights(lcfg.get("class_weights"), self.num_classes)
        self.loss_fn = SegmentationLoss(ignore_index=self.train_set.ignore_index, class_weights=weights,
                                        ohem_thresh=lcfg.get("ohem_thresh"),
                                        ohem_min_kept=int(lcfg.get("ohem_min_kept", 131072)))

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets)

    def identity(self) -> Dict[str, Any]:
        return dict(super().identity(), preset=self.cfg["model"]["name"])

    def extra_state(self) -> Dict[str, Any]:
        return dict(classes=list(self.train_set.classes), palette=np.asarray(self.train_set.palette).tolist(),
                    init_summary=self.init_info.get("summary"),
                    ignore_index=int(self.train_set.ignore_index),
                    data_cfg=dict(mean=list(self.mean), std=list(self.std), dataset=self.cfg["data"]["name"]))

    def restore_extra(self, ckpt: Mapping[str, Any]) -> None:
        self.init_info["summary"] = ckpt.get("init_summary") or self.init_info.get("summary")

    def bn_dataset(self):
        return SeededDataset(self.train_set, int(self.tcfg["seed"]))  # the train crops, fixed for the run

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, desc: str) -> SegEvalResult:
        inference = build_inference(model, self.cfg.get("inference"), self.amp_dtype)
        n_images = int(self.tcfg.get("log_images", 4) or 0)
        samples: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def keep_samples(indices, images, masks, pred) -> None:
            for i in range(len(indices)):
                if len(samples) >= n_images:
                    return
                samples.append((self._denormalize(images[i]), masks[i].cpu().numpy(), pred[i].cpu().numpy()))

        res = evaluate_segmentation(model, self.val_loader, self.env, self.num_classes,
                                    ignore_index=self.val_set.ignore_index, inference=inference,
                                    progress=self.progress_bars, desc=desc,
                                    on_batch=keep_samples if (n_images and self.env.is_main) else None)
        res.samples = samples  # type: ignore[attr-defined]
        return res

    def _denormalize(self, image: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
        return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def score(self, res: SegEvalResult) -> float:
        return res.metrics.miou if math.isfinite(res.metrics.miou) else -1.0

    def eval_scalars(self, res: SegEvalResult) -> Dict[str, float]:
        m = res.metrics
        return {"miou": m.miou, "aacc": m.aacc, "macc": m.macc, "deq_nstep": res.deq_nstep_mean,
                "deq_rel_residual": res.deq_rel_residual_mean, "deq_diverged": res.deq_diverged}

    def log_eval_details(self, model: nn.Module, res: SegEvalResult, prefix: str, step: int) -> None:
        if self.logger is None or not self.env.is_main:
            return
        classes = list(self.train_set.classes)
        self.logger.scalars({f"{prefix}_iou/{name}": iou for name, iou in zip(classes, res.metrics.iou)}, step)
        self.logger.text(f"{prefix}/iou_table", res.metrics.table(classes), step)
        palette = np.asarray(self.train_set.palette)
        for i, (image, mask, pred) in enumerate(getattr(res, "samples", [])):
            panel = np.concatenate([image, colorize(mask, palette), colorize(pred, palette)], axis=1)
            self.logger.image(f"{prefix}/image_gt_pred/{i}", _fit_height(panel, LOG_IMAGE_HEIGHT), step)

    def val_row(self, res: Optional[SegEvalResult], prefix: str = "val_") -> Dict[str, Any]:
        row: Dict[str, Any] = {f"{prefix}miou": res.metrics.miou if res else "",
                               f"{prefix}aacc": res.metrics.aacc if res else ""}
        if prefix == "val_":
            row.update(val_macc=res.metrics.macc if res else "", deq_nstep_mean=res.deq_nstep_mean if res else "",
                       deq_rel_residual_mean=res.deq_rel_residual_mean if res else "")
        return row

    def final_metrics(self, res: SegEvalResult) -> Dict[str, Any]:
        m = res.metrics
        return dict(val_miou=m.miou, val_aacc=m.aacc, val_macc=m.macc, val_count=res.count,
                    val_iou={c: (v if math.isfinite(v) else None) for c, v in zip(self.train_set.classes, m.iou)},
                    deq_nstep_mean=res.deq_nstep_mean,
                    deq_rel_residual_mean=res.deq_rel_residual_mean, deq_abs_residual_mean=res.deq_abs_residual_mean,
                    deq_diverged=res.deq_diverged,
                    inference=dict(self.cfg.get("inference") or {}),
                    backbone_init=self.init_info.get("summary"))

    def hparam_metrics(self, metrics: Mapping[str, Any]) -> Dict[str, float]:
        return {k: metrics[k] for k in ("val_miou", "val_aacc")}

    def report_lines(self, m: Mapping[str, Any]) -> List[str]:
        return [f"val mIoU {m['val_miou']:.2f}%  pixel acc. {m['val_aacc']:.2f}%  mean acc. {m['val_macc']:.2f}% "
                f"({m['val_count']} images)",
                f"solver: {m['deq_nstep_mean']:.1f} steps/image, relative residual {m['deq_rel_residual_mean']:.3g}"]
