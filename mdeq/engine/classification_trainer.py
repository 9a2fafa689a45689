"""Classification training (``tools/train_cls.py``, ``tools/finetune.py``): ``ClassificationTrainer``.

``ClassificationTrainer(cfg, env, output_dir).fit()`` trains a timm model on an ImageFolder dataset with the
loop of ``training_loop.Trainer`` (MDEQ schedule, AMP, DDP, EMA, checkpoints, resume; see there) and adds what
is specific to classification: timm transforms from the model's pretrained cfg, mixup/cutmix, label
smoothing, top-1/top-5 evaluation. The final metrics are also written to ``<output_dir>/metrics.json``.
"""
from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..data.auto import DataChoices, resolve_data_choices, wants_flip_check
from ..data.classification import build_transform, resolve_data_cfg
from ..data.factory import build_classification_datasets
from ..data.flip_check import flip_retention
from ..data.inspect import typical_image_size
from .equilibria import Equilibria
from .checkpoint import plain_data
from .evaluate import EvalResult, evaluate_classifier
from .model_config import architecture_kwargs
from .training_loop import Trainer
from .weight_files import read_weights_file
from .weights import freeze_groups, load_backbone_weights, state_dict_from

__all__ = ["ClassificationTrainer", "build_model"]

_log = logging.getLogger("mdeq.train")


# ---------------------------------------------------------------------------------------------- builders
def build_model(model_cfg: Mapping[str, Any], num_classes: int, deq_cfg: Optional[Mapping[str, Any]] = None,
                kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A timm model from ``model`` config: name, pretrained, weights (local file), kwargs, drop_rate, freeze.

    Any timm classifier works (``resnet18``, ``hrnet_w18_small``, ``hf-hub:...``, ``local-dir:...``). For an MDEQ
    the ``kwargs`` are ``MDEQConfig`` fields (``skip_init=true`` adds the Skip DEQ predictor, also built when
    ``deq_cfg`` starts from it: ``model_config.architecture_kwargs``, unless ``kwargs`` gives them resolved);
    another model takes its own keywords. Weights of a model without the add-ons (``addon_prefixes``) load with the
    add-ons left at their init. Weights from a training checkpoint bring the input size they were trained at into
    the model's ``pretrained_cfg`` (which describes the weights a timm model holds).
    """
    name = model_cfg["name"]
    kwargs = dict(architecture_kwargs(model_cfg, deq_cfg or {}) if kwargs is None else kwargs)
    try:
        model = timm.create_model(name, pretrained=bool(model_cfg.get("pretrained", False)), num_classes=num_classes,
                                  drop_rate=float(model_cfg.get("drop_rate", 0.0) or 0.0), **kwargs)
    except TypeError as e:
        if not kwargs:
            raise
        raise ValueError(f"timm.create_model({name!r}, ...) does not take model.kwargs {sorted(kwargs)}: {e}; "
                         f"pass only keywords of {name} (model.kwargs are the MDEQConfig fields for mdeq_* models)"
                         ) from e
    weights = model_cfg.get("weights")
    if weights:
        head = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
        content = read_weights_file(weights)
        sd = state_dict_from(content, weights, prefer_ema=bool(model_cfg.get("ema_weights")))
        heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
        fresh, _ = load_backbone_weights(model, sd, head_names=heads)
        if fresh:
            _log.info("loaded %s; new head (%d classes): %s", weights, num_classes, fresh)
        trained_at = (content.get("data_cfg") or {}).get("input_size") if isinstance(content, Mapping) else None
        if trained_at:
            model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "input_size": tuple(trained_at)}
    freeze_groups(model, model_cfg.get("freeze") or [])
    return model


class ClassificationTrainer(Trainer):
    """Everything a classification run needs, built from a resolved config dict."""

    task = "classification"
    score_name = "val_top1"

    def build_datasets(self):
        return build_classification_datasets(self.cfg["data"], self.env)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg["model"], self.num_classes, kwargs=self.model_kwargs)

    def setup_transforms(self) -> None:
        image_side = typical_image_size(self.train_set)
        flips = flip_retention(self.train_set) if wants_flip_check(self.cfg["data"]) else None
        model_cfg = self.cfg["model"]
        starts = bool(model_cfg.get("pretrained") or model_cfg.get("weights"))
        self.image_side = image_side
        self._apply_data_choices(data_choices_for(self.cfg["data"], self.model, image_side, flips, starts))

    def _apply_data_choices(self, choices: DataChoices) -> None:
        """The transforms of these choices, logged."""
        self.data_choices = choices
        self.data_cfg = resolve_data_cfg(self.model, choices.overrides)
        if self.env.is_main:
            for reason in choices.reasons:
                _log.info("data: %s", reason)
            report_input_size(self.data_cfg, self.image_side, self.cfg["model"]["name"])
        self.train_set.transform = build_transform(self.data_cfg, True, choices.aug)
        self.val_set.transform = build_transform(self.data_cfg, False)

    def setup_loss(self) -> None:
        self.mixup = self._mixup()
        smoothing = float(self.tcfg.get("smoothing", 0.0))
        if self.mixup is not None:
            self.train_loss_fn: nn.Module = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.train_loss_fn = LabelSmoothingCrossEntropy(smoothing=smoothing)
        else:
            self.train_loss_fn = nn.CrossEntropyLoss()

    def _mixup(self) -> Optional[Mixup]:
        m = dict(self.tcfg.get("mixup") or {})
        if not (m.get("mixup_alpha", 0) > 0 or m.get("cutmix_alpha", 0) > 0 or m.get("cutmix_minmax")):
            return None
        return Mixup(mixup_alpha=m.get("mixup_alpha", 0.0), cutmix_alpha=m.get("cutmix_alpha", 0.0),
                     cutmix_minmax=m.get("cutmix_minmax"), prob=m.get("prob", 1.0),
                     switch_prob=m.get("switch_prob", 0.5), mode=m.get("mode", "batch"),
                     label_smoothing=float(self.tcfg.get("smoothing", 0.0)), num_classes=self.num_classes)

    def on_train_epoch_start(self) -> None:
        if self.mixup is not None:
            off = self.tcfg["mixup"].get("off_epoch")
            self.mixup.mixup_enabled = not (off is not None and self.progress.epoch >= int(off))

    def prepare_batch(self, images, targets):
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.train_loss_fn(outputs.float(), targets)

    def extra_state(self) -> Dict[str, Any]:
        return dict(data_cfg=self.data_cfg, classes=list(self.train_set.classes),
                    data_choices=dict(overrides=self.data_choices.overrides, aug=self.data_choices.aug))

    def restore_extra(self, ckpt: Mapping[str, Any]) -> None:
        """A resumed run trains on with the data choices it started with, even where ``auto`` would now choose
        otherwise (another version of these rules)."""
        saved = ckpt.get("data_choices")
        now = dict(overrides=self.data_choices.overrides, aug=self.data_choices.aug)
        if saved and plain_data(saved) != plain_data(now):
            _log.warning("resuming with the data choices the run started with (%s), not those chosen now (%s)",
                         saved, now)
            self._apply_data_choices(DataChoices(overrides=dict(saved["overrides"]), aug=dict(saved["aug"]),
                                                 reasons=["as the run being resumed chose"]))
        elif not saved and ckpt.get("data_cfg") and list(ckpt["data_cfg"]["input_size"]) != list(
                self.data_cfg["input_size"]):
            _log.warning("the checkpoint was trained at input size %s and this run chose %s: set "
                         "data.overrides.input_size to the run's own to resume it as it was",
                         list(ckpt["data_cfg"]["input_size"]), list(self.data_cfg["input_size"]))

    def chance_score(self) -> float:
        """Top-1 (%) of always predicting the validation set's most frequent class."""
        counts = Counter(self.val_set.targets)
        return 100.0 * max(counts.values()) / max(len(self.val_set), 1)

    def bn_dataset(self):
        data = copy.copy(self.train_set)  # the train images with eval transforms
        data.transform = self.val_set.transform
        return data

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, desc: str) -> EvalResult:
        return evaluate_classifier(model, self.val_loader, self.env, self.amp_dtype, self.channels_last,
                                   self.progress_bars, desc=desc)

    def score(self, result: EvalResult) -> float:
        return result.top1

    def eval_scalars(self, res: EvalResult) -> Dict[str, float]:
        scalars = {"top1": res.top1, "top5": res.top5, "loss": res.loss}
        if res.solved:
            scalars.update(deq_nstep=res.deq_nstep_mean, deq_rel_residual=res.deq_rel_residual_mean,
                           deq_diverged=res.deq_diverged)
        return scalars

    def val_row(self, res: Optional[EvalResult], prefix: str = "val_") -> Dict[str, Any]:
        row: Dict[str, Any] = {f"{prefix}top1": res.top1 if res else "", f"{prefix}top5": res.top5 if res else ""}
        if prefix == "val_":  # the solver columns stay blank for an explicit network (nothing solved)
            row.update(val_loss=res.loss if res else "", deq_nstep_mean=_blank(res and res.deq_nstep_mean),
                       deq_rel_residual_mean=_blank(res and res.deq_rel_residual_mean))
        return row

    def final_metrics(self, val: EvalResult) -> Dict[str, Any]:
        return dict(val_top1=val.top1, val_top5=val.top5, val_loss=val.loss, val_count=val.count,
                    deq_nstep_mean=val.deq_nstep_mean, deq_rel_residual_mean=val.deq_rel_residual_mean,
                    deq_abs_residual_mean=val.deq_abs_residual_mean, deq_diverged=val.deq_diverged,
                    data_choices=dict(input_size=list(self.data_cfg["input_size"][-2:]),
                                      crop_pct=self.data_cfg.get("crop_pct"), aug=self.data_choices.aug,
                                      reasons=self.data_choices.reasons))

    def hparam_metrics(self, metrics: Mapping[str, Any]) -> Dict[str, float]:
        return {k: metrics[k] for k in ("val_top1", "val_top5")}

    def report_lines(self, m: Mapping[str, Any]) -> List[str]:
        lines = [f"val top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%  loss {m['val_loss']:.4f}"]
        if m.get("deq_nstep_mean") is None:
            return lines + [f"{m['model']}: an explicit network (no MDEQ, nothing solved)"]
        return lines + [f"solver: {m['deq_nstep_mean']:.1f} steps/image, relative residual "
                        f"{m['deq_rel_residual_mean']:.3g}"]


def _blank(value: Any) -> Any:
    """A CSV cell: empty for None."""
    return "" if value is None else value


def data_choices_for(data_cfg: Mapping[str, Any], model: nn.Module, image_side: Optional[int],
                     flips: Optional[float] = None, from_weights: bool = False) -> DataChoices:
    """The run's data choices (``mdeq.data.auto``) for ``model``: its pretrained cfg's input size, whether that size
    is fixed (a ViT), the multiple its input side must be (an MDEQ's ``size_divisor``; for another timm model its
    largest feature reduction, 32 for a ResNet or an HRNet, whose branches must line up), and for a model holding an
    MDEQ the image pixels per pixel of its finest branch; ``flips``: the data's ``flip_retention``;
    ``from_weights``: the model holds starting weights, trained at its cfg's size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_side = int(min((cfg.get("input_size") or (3, 224, 224))[-2:]))
    stages = list(Equilibria(model).stages.values())
    if stages:
        multiples = [int(getattr(s, "input_divisor", 1) or 1) for s in stages]
        strides = [int(getattr(s, "input_stride", 0) or 0) for s in stages]
        stride = max(strides) if all(strides) else None
    else:
        multiples = [int(f.get("reduction", 1)) for f in getattr(model, "feature_info", None) or []
                     if isinstance(f, Mapping)]
        stride = None
    divisor = math.lcm(*multiples) if multiples else 1
    return resolve_data_choices(data_cfg, cfg_side, image_side, divisor, bool(cfg.get("fixed_input_size")), stride,
                                flips, from_weights)


def report_input_size(data_cfg: Mapping[str, Any], native: Optional[int], model_name: str) -> None:
    """Log the input size a run trains at; warn when it is more than 2x away from the data's typical image size
    ``native`` (e.g. a 16x16 setting on 32x32 images), which costs accuracy without a word."""
    h, w = data_cfg["input_size"][-2:]
    _log.info("input size %dx%d; the training images' median shorter side: %s", h, w,
              f"{native} px" if native else "unknown")
    if native and not 0.5 <= min(h, w) / native <= 2.0:
        _log.warning("training at %dx%d, but the images' median shorter side is %d px (more than 2x away): set "
                     "data.overrides.input_size=%d to train near the data's own size, or choose a model tag made for "
                     "it", h, w, native, native)
