"""MDEQ architecture settings: one dataclass whose fields are the official YAML keys in lower case.

The presets are the released configurations of locuslab/mdeq and locuslab/deq (MDEQ-Vision); their parameter
counts equal the official ones (see ``shared/official_mdeq/keys_*.json``), and their solver settings make exactly
the original's number of f-evaluations.

Everything that creates parameters is a field here (``skip_init``: the Skip DEQ predictor; ``student``: the C-DEQ
student). ``deq`` holds the run-time settings a model starts with (``mdeq.core.DEQ`` options); changing them
(``model.configure_deq``) never changes a model's modules.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Tuple

from mdeq.core import check_deq_options, list_solvers, merge_deq_options, solver_spec

__all__ = ["MDEQConfig", "CLS_PRESETS", "SEG_PRESETS", "config_field_names", "resolve_config", "preset_solver",
           "official_solver", "official_solver_of"]


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture of an MDEQ backbone, and the DEQ settings it starts with.

    Field names follow the official YAML keys: ``MODEL.EXTRA.FULL_STAGE.*`` (num_branches, num_channels,
    head_channels, final_chansize) and ``MODEL.*`` (expansion_factor, num_groups, downsample_times, dropout,
    *_gn_affine, num_layers, wnorm). ``skip_init`` adds the Skip DEQ predictor of z* (``fullstage.initializer``)
    and ``student`` the C-DEQ student (``fullstage.student``, with ``student_kernel_size``). ``deq`` holds
    ``mdeq.core.DEQ`` settings (solver, max_iter, b_max_iter, stop_mode, ...): run-time only.
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
    skip_init: bool = False  # build the Skip DEQ predictor of z* (then the default initial guess: deq init='skip')
    student: bool = False   # build the C-DEQ student, which solver='consistency' runs (tools/distill.py trains it)
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
        if self.student_kernel_size not in (1, 3):
            raise ValueError(f"student_kernel_size must be 1 or 3, got {self.student_kernel_size}")
        check_deq_options(self.deq)

    def deq_settings(self) -> Dict[str, Any]:
        """The DEQ settings a model of this config starts with: ``deq``, and a model with the Skip DEQ predictor
        starts from its prediction unless ``deq`` says otherwise."""
        return {**({"init": "skip"} if self.skip_init else {}), **self.deq}

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
    """``base`` with ``overrides`` (MDEQConfig fields); ``deq`` overrides merge into the preset's settings
    (``mdeq.core.merge_deq_options``).

    Compatibility: before the predictor and the student were architecture fields, ``deq=dict(init='skip')`` and
    ``deq=dict(solver='consistency')`` built them (and published folders of that time pass them so). Given
    without ``skip_init`` / ``student``, they still do, with a FutureWarning naming the new spelling.
    """
    overrides = dict(overrides)
    if "deq" in overrides:
        deq = overrides.pop("deq") or {}
        if not isinstance(deq, dict):
            raise TypeError(f"deq must be a dict of DEQ options, got {type(deq).__name__}")
        deq = dict(deq)
        if deq.get("init") == "skip" and "skip_init" not in overrides and not base.skip_init:
            warnings.warn("deq=dict(init='skip') no longer builds the Skip DEQ predictor: it is an architecture "
                          "field now; pass skip_init=True (the predictor is then the default initial guess)",
                          FutureWarning, stacklevel=3)
            overrides["skip_init"] = True
        needs = solver_spec(deq["solver"]).needs if "solver" in deq and deq["solver"] in list_solvers() else ()
        if "student" in needs and "student" not in overrides and not base.student:
            warnings.warn(f"deq=dict(solver={deq['solver']!r}) no longer builds the C-DEQ student: it is an "
                          f"architecture field now; pass student=True", FutureWarning, stacklevel=3)
            overrides["student"] = True
        overrides["deq"] = merge_deq_options(base.deq, deq)
    return replace(base, **overrides)


def preset_solver(f_thres: int, b_thres: int, stop_mode: str) -> Dict[str, Any]:
    """The presets' DEQ settings: Anderson (forward and backward) at the original's budgets and tolerance.

    A converged solve does not depend on the solver, and on trained weights Anderson reaches the official
    tolerance in fewer f-evaluations and less time than the original's Broyden (README, "Cheap MDEQs"), which
    stays one call away: ``configure_deq(**official_solver(F_THRES, B_THRES, stop_mode))`` (``deq=broyden`` with
    the thresholds' memory in the training configs), what the official weights' catalog entries use.
    """
    return dict(solver="anderson", max_iter=f_thres + 1, tol=1e-3, stop_mode=stop_mode, b_solver="anderson",
                b_max_iter=b_thres + 1)


def official_solver(f_thres: int, b_thres: int, stop_mode: str) -> Dict[str, Any]:
    """DEQ settings equal to the original's Broyden with thresholds F_THRES / B_THRES (both ways, full memory,
    eps 1e-3): it evaluates f at z0 and then takes F_THRES steps, so ``max_iter`` (which counts every
    evaluation) is F_THRES + 1, and likewise B_THRES + 1 backward; ``memory`` keeps all F_THRES updates."""
    return dict(solver="broyden", max_iter=f_thres + 1, tol=1e-3, stop_mode=stop_mode,
                solver_options=dict(memory=f_thres), b_solver="broyden", b_max_iter=b_thres + 1,
                b_solver_options=dict(memory=b_thres))


def official_solver_of(cfg: "MDEQConfig") -> Dict[str, Any]:
    """``official_solver`` at a preset's own budgets and stop mode (its thresholds are max_iter - 1 and
    b_max_iter - 1): the setting its official numbers were measured with."""
    d = cfg.deq
    return official_solver(d["max_iter"] - 1, d["b_max_iter"] - 1, d["stop_mode"])


CLS_PRESETS: Dict[str, MDEQConfig] = {
    # CIFAR-10 (32x32, no downsampling stem); v2 yamls: POST_GN_AFFINE false
    "mdeq_tiny": MDEQConfig(
        num_branches=2, num_channels=(24, 24), downsample_times=0, dropout=0.25, post_gn_affine=False,
        head_channels=(8, 16), final_chansize=200, num_layers=10, deq=preset_solver(18, 20, "rel")),
    "mdeq_cifar_large": MDEQConfig(
        num_branches=4, num_channels=(32, 64, 128, 256), downsample_times=0, dropout=0.3, post_gn_affine=False,
        head_channels=(14, 28, 56, 112), final_chansize=1680, num_layers=10, deq=preset_solver(18, 20, "rel")),
    # ImageNet (224x224, two stride-2 stem convs)
    "mdeq_small": MDEQConfig(
        num_channels=(32, 64, 128, 256), head_channels=(24, 48, 96, 192), num_layers=5,
        deq=preset_solver(26, 27, "abs")),
    "mdeq_large": MDEQConfig(
        num_channels=(80, 160, 320, 640), head_channels=(32, 64, 128, 256), num_layers=4,
        deq=preset_solver(26, 27, "abs")),
    "mdeq_xl": MDEQConfig(
        num_channels=(88, 176, 352, 704), expansion_factor=6, head_channels=(32, 64, 128, 256), num_layers=4,
        deq=preset_solver(26, 27, "abs")),
}

SEG_PRESETS: Dict[str, MDEQConfig] = {
    # Cityscapes (19 classes, NUM_LAYERS 3); no classification head
    "mdeq_small": MDEQConfig(num_channels=(32, 64, 128, 256), dropout=0.05, head_channels=(), num_layers=3,
                             deq=preset_solver(27, 30, "abs")),
    "mdeq_large": MDEQConfig(num_channels=(80, 160, 320, 640), dropout=0.03, head_channels=(), num_layers=3,
                             deq=preset_solver(27, 30, "abs")),
    "mdeq_xl": MDEQConfig(num_channels=(88, 176, 352, 704), expansion_factor=6, dropout=0.04, head_channels=(),
                          num_layers=3, deq=preset_solver(27, 30, "abs")),
}
