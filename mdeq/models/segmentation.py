"""MDEQ for semantic segmentation: the MDEQ backbone with the HRNetV2-style head of the original.

All branch equilibria are upsampled (bilinear, align_corners=True) to the highest resolution and
concatenated; ``last_layer`` = conv1x1 -> BN -> ReLU -> conv1x1 to the classes. Like the original and HRNet,
``forward`` returns logits at 1/4 of the input resolution (1/2^downsample_times); ``predict`` returns them
upsampled to the input size.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import SEG_PRESETS, config_field_names, resolve_config
from .identify import register_preset_builder
from .mdeq import MDEQBackbone
from .pretrained import fetch_segmentation_weights

__all__ = ["MDEQSegNet", "create_segmentation_model", "list_segmentation_models"]


class MDEQSegNet(MDEQBackbone):
    def __init__(self, cfg, num_classes: int = 19, in_chans: int = 3, final_conv_kernel: int = 1, device=None,
                 dtype=None):
        super().__init__(cfg, in_chans=in_chans, bn_momentum=0.01, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        if final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {final_conv_kernel}")
        self.num_classes = num_classes
        width = sum(cfg.num_channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(width, width, 1, bias=True, **dd),
            nn.BatchNorm2d(width, momentum=0.01, **dd),
            nn.ReLU(),
            nn.Conv2d(width, num_classes, final_conv_kernel, padding=final_conv_kernel // 2, bias=True, **dd),
        )
        self._init_weights()

    @staticmethod
    def _concat(zs: List[torch.Tensor]) -> torch.Tensor:
        size = zs[0].shape[-2:]
        ups = [F.interpolate(z, size=size, mode="bilinear", align_corners=True) for z in zs[1:]]
        return torch.cat([zs[0]] + ups, dim=1)

    def forward_features(self, x: torch.Tensor, z0: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Branch equilibria upsampled to the highest resolution and concatenated; ``z0``: a warm start."""
        return self._concat(self.forward_equilibrium(x, z0))

    def forward_states(self, zs: List[torch.Tensor]) -> torch.Tensor:
        """What ``forward`` returns, from the branch equilibria (the head after the solve; streaming export)."""
        return self.last_layer(self._concat(zs))

    def forward(self, x: torch.Tensor, z0: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits at 1/2^downsample_times of the input resolution."""
        logits = self.forward_states(self.forward_equilibrium(x, z0))
        stats = self.deq_stats
        if stats is not None and stats.corrections:  # fixed-point correction (training)
            stats.aux_outputs = [self.last_layer(self._concat(c)) for c in stats.corrections]
        return logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits upsampled (bilinear) to the input size, as the original's test-time inference."""
        return F.interpolate(self(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def list_segmentation_models() -> List[str]:
    return sorted(SEG_PRESETS)


def create_segmentation_model(name: str, num_classes: int = 19, pretrained: Union[bool, str] = False,
                              **overrides: Any) -> MDEQSegNet:
    """An MDEQ segmentation model from a preset (``mdeq_small``, ``mdeq_large``, ``mdeq_xl``).

    Any ``MDEQConfig`` field can be overridden; ``in_chans``, ``device``, ``dtype``, ``final_conv_kernel`` are
    passed to the model. ``pretrained=True`` (or a tag such as ``'cityscapes_official'``) loads published
    Cityscapes weights from the zoo catalog (verified download; the released checkpoints are converted on
    first use); with another ``num_classes`` the last classifier conv is left at its fresh init.
    """
    if name not in SEG_PRESETS:
        raise ValueError(f"unknown segmentation model {name!r}; available: {list_segmentation_models()}")
    weights = None
    if pretrained:  # True: the first published Cityscapes entry of this preset; a string: that tag
        weights, entry = fetch_segmentation_weights(name, pretrained if isinstance(pretrained, str) else None)
        for key, value in {**dict(entry.get("model_args") or {}), "deq": dict(entry["solver"])}.items():
            overrides.setdefault(key, value)  # its architecture, and the solver its metrics were measured with
    fields = config_field_names()
    cfg = resolve_config(SEG_PRESETS[name], {k: overrides.pop(k) for k in list(overrides) if k in fields})
    model = MDEQSegNet(cfg, num_classes=num_classes, **overrides)
    if weights is not None:
        own = model.state_dict()
        head = [k for k in weights if k.startswith("last_layer.3.") and weights[k].shape != own[k].shape]
        model.load_state_dict({k: v for k, v in weights.items() if k not in head}, strict=not head)
    return model


register_preset_builder("seg", create_segmentation_model)
