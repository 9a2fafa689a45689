"""MDEQ architecture settings: one dataclass whose fields are the official YAML keys in lower case.

The presets are the released configurations of locuslab/mdeq and locuslab/deq (MDEQ-Vision); their parameter
counts equal the official ones (see ``shared/official_mdeq/keys_*.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Tuple

__all__ = ["MDEQConfig", "CLS_PRESETS", "SEG_PRESETS", "config_field_names", "resolve_config"]


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture of an MDEQ backbone (+ its DEQ solver settings).

    Field names follow the official YAML keys: ``MODEL.EXTRA.FULL_STAGE.*`` (num_branches, num_channels,
    head_channels, final_chansize) and ``MODEL.*`` (expansion_factor, num_groups, downsample_times, dropout,
    *_gn_affine, num_layers, wnorm). ``deq`` holds ``mdeq.core.DEQ`` options (solver, max_iter = F_THRES,
    b_max_iter = B_THRES, stop_mode, ...).
    """

    num_branches: int = 4
    num_channels: Tuple[int, ...] = (32, 64, 128, 256)
    expansion_factor: float = 5
    num_groups: int = 8
    downsample_times: int = 2
    dropout: float = 0.0
    block_gn_affine: bool = True
    fuse_gn_affine: bool = True
    post_gn_affine: bool = True
    wnorm: bool = True
    head_channels: Tuple[int, ...] = (24, 48, 96, 192)
    final_chansize: int = 2048
    num_layers: int = 5
    student: bool = False   # build the C-DEQ student (also built for deq solver='consistency')
    student_kernel_size: int = 1  # the student generator's convs: 1 (per-pixel, the C-DEQ recipe) or 3
    deq: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "num_channels", tuple(int(c) for c in self.num_channels))
        object.__setattr__(self, "head_channels", tuple(int(c) for c in self.head_channels))
        object.__setattr__(self, "deq", dict(self.deq))
        if self.num_branches < 1 or len(self.num_channels) != self.num_branches:
            raise ValueError(
                f"num_channels {self.num_channels} must list one width per branch (num_branches={self.num_branches})"
            )
        if self.head_channels and len(self.head_channels) != self.num_branches:
            raise ValueError(
                f"head_channels {self.head_channels} must list one width per branch (num_branches={self.num_branches})"
            )
        if self.downsample_times < 0:
            raise ValueError(f"downsample_times must be >= 0, got {self.downsample_times}")
        for c in self.num_channels:
            inner = int(self.expansion_factor * c)
            if c % self.num_groups or inner % self.num_groups or c % max(self.num_groups // 2, 1):
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every branch width {self.num_channels} and its "
                    f"expanded width (x{self.expansion_factor}), and num_groups // 2 must divide the widths too"
                )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    @property
    def size_divisor(self) -> int:
        """H and W must be multiples of this: every branch halves the previous one exactly."""
        return 2 ** (self.downsample_times + self.num_branches - 1)

    @property
    def has_stage0(self) -> bool:
        """The official rule: no injection transform for 2-branch models without a downsampling stem."""
        return not (self.downsample_times == 0 and self.num_branches <= 2)


def config_field_names():
    return {f.name for f in fields(MDEQConfig)}


def resolve_config(base: MDEQConfig, overrides: Dict[str, Any]) -> MDEQConfig:
    """``base`` with ``overrides`` (MDEQConfig fields); ``deq`` overrides merge into the preset's settings."""
    overrides = dict(overrides)
    if "deq" in overrides:
        deq = overrides.pop("deq") or {}
        if not isinstance(deq, dict):
            raise TypeError(f"deq must be a dict of DEQ options, got {type(deq).__name__}")
        merged = {**base.deq, **deq}
        for key, opts in (("solver", "solver_options"), ("b_solver", "b_solver_options")):
            if key in deq and opts not in deq and deq[key] != base.deq.get(key):
                merged.pop(opts, None)  # the preset's options of its own solver do not fit another one
        overrides["deq"] = merged
    return replace(base, **overrides)


def _deq(f_thres: int, b_thres: int, stop_mode: str) -> Dict[str, Any]:
    # the official configs use Broyden both ways with full memory (no restart) and eps 1e-3
    return dict(solver="broyden", max_iter=f_thres, tol=1e-3, stop_mode=stop_mode,
                solver_options=dict(memory=f_thres), b_solver="broyden", b_max_iter=b_thres,
                b_solver_options=dict(memory=b_thres))


CLS_PRESETS: Dict[str, MDEQConfig] = {
    # CIFAR-10 (32x32, no downsampling stem); v2 yamls: POST_GN_AFFINE false
    "mdeq_tiny": MDEQConfig(
        num_branches=2, num_channels=(24, 24), downsample_times=0, dropout=0.25, post_gn_affine=False,
        head_channels=(8, 16), final_chansize=200, num_layers=10, deq=_deq(18, 20, "rel")),
    "mdeq_cifar_large": MDEQConfig(
        num_branches=4, num_channels=(32, 64, 128, 256), downsample_times=0, dropout=0.3, post_gn_affine=False,
        head_channels=(14, 28, 56, 112), final_chansize=1680, num_layers=10, deq=_deq(18, 20, "rel")),
    # ImageNet (224x224, two stride-2 stem convs)
    "mdeq_small": MDEQConfig(
        num_channels=(32, 64, 128, 256), head_channels=(24, 48, 96, 192), num_layers=5, deq=_deq(26, 27, "abs")),
    "mdeq_large": MDEQConfig(
        num_channels=(80, 160, 320, 640), head_channels=(32, 64, 128, 256), num_layers=4, deq=_deq(26, 27, "abs")),
    "mdeq_xl": MDEQConfig(
        num_channels=(88, 176, 352, 704), expansion_factor=6, head_channels=(32, 64, 128, 256), num_layers=4,
        deq=_deq(26, 27, "abs")),
}

SEG_PRESETS: Dict[str, MDEQConfig] = {
    # Cityscapes (19 classes, NUM_LAYERS 3); no classification head
    "mdeq_small": MDEQConfig(num_channels=(32, 64, 128, 256), dropout=0.05, head_channels=(), num_layers=3,
                             deq=_deq(27, 30, "abs")),
    "mdeq_large": MDEQConfig(num_channels=(80, 160, 320, 640), dropout=0.03, head_channels=(), num_layers=3,
                             deq=_deq(27, 30, "abs")),
    "mdeq_xl": MDEQConfig(num_channels=(88, 176, 352, 704), expansion_factor=6, dropout=0.04, head_channels=(),
                          num_layers=3, deq=_deq(27, 30, "abs")),
}
