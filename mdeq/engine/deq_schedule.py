"""The MDEQ training recipe as a schedule: unrolled pre-training, then DEQ mode with Jacobian regularisation.

Follows the official classification loop (``cls_function.train``), per optimizer step ``t``:

* ``t < pretrain_steps``: unrolled mode, f applied ``unroll_steps`` times (the official NUM_LAYERS), Jacobian
  weight ``jac.pretrain_weight``;
* afterwards DEQ mode with forward/backward thresholds ``f_thres``/``b_thres``;
  Jacobian weight ``jac.weight + 0.1 * ((t - pretrain_steps) // jac.incremental)`` (no increase when
  ``incremental`` is 0), and 0 from epoch ``jac.stop_epoch`` on;
* the penalty is computed only on a fraction ``jac.freq`` of steps; on those steps ``f_thres`` is moved by a
  random delta in ``{-rand_f_thres_delta, ..., +1}`` (RAND_F_THRES_DELTA).

The random draws come from a generator seeded by (seed, step), so every DDP rank makes the same choice and a
resumed run makes the same choices as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np
from torch import nn

__all__ = ["JacobianSchedule", "DEQSchedule", "StepPlan", "PRETRAIN", "DEQ_MODE"]

PRETRAIN, DEQ_MODE = "pretrain", "deq"


@dataclass(frozen=True)
class JacobianSchedule:
    """Official LOSS.JAC_* keys: weight, freq, incremental (steps per +0.1), stop_epoch, pretrain_weight."""

    weight: float = 0.0
    freq: float = 0.0
    incremental: int = 0
    stop_epoch: Optional[int] = None
    pretrain_weight: float = 0.0
    probes: int = 2  # Hutchinson vectors (the official ``vecs``)

    def __post_init__(self):
        if not 0.0 <= self.freq <= 1.0:
            raise ValueError(f"jac.freq is a probability in [0, 1], got {self.freq}")
        if self.weight < 0 or self.pretrain_weight < 0:
            raise ValueError("jac.weight and jac.pretrain_weight must be >= 0")
        if self.incremental < 0:
            raise ValueError(f"jac.incremental is a number of steps >= 0 (0 = constant weight), got {self.incremental}")
        if self.probes < 1:
            raise ValueError(f"jac.probes must be >= 1, got {self.probes}")


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does: its phase, solver budget and Jacobian-penalty weight (0 = not computed)."""

    phase: str
    f_thres: int
    jac_weight: float

    @property
    def compute_jac(self) -> bool:
        return self.jac_weight > 0


@dataclass(frozen=True)
class DEQSchedule:
    """Pre-training length, unrolled depth, DEQ solver options and the Jacobian schedule.

    ``deq`` holds ``mdeq.core.DEQ`` options for DEQ mode (``max_iter`` is f_thres, ``b_max_iter`` is b_thres);
    ``eval_f_thres`` is the forward budget at evaluation (default: ``deq['max_iter']``).
    """

    pretrain_steps: int = 0
    unroll_steps: int = 10
    deq: Mapping[str, Any] = field(default_factory=dict)
    eval_f_thres: Optional[int] = None
    rand_f_thres_delta: int = 0
    jac: JacobianSchedule = field(default_factory=JacobianSchedule)
    seed: int = 0

    def __post_init__(self):
        if self.pretrain_steps < 0 or self.unroll_steps < 1:
            raise ValueError("pretrain_steps must be >= 0 and unroll_steps >= 1")
        if "max_iter" not in self.deq:
            raise ValueError("deq options need max_iter (the forward threshold f_thres)")
        if self.rand_f_thres_delta < 0:
            raise ValueError(f"rand_f_thres_delta must be >= 0, got {self.rand_f_thres_delta}")

    @property
    def f_thres(self) -> int:
        return int(self.deq["max_iter"])

    def phase(self, step: int) -> str:
        return PRETRAIN if step < self.pretrain_steps else DEQ_MODE

    def plan(self, step: int, epoch: int) -> StepPlan:
        """The plan of optimizer step ``step`` (0-based, counted over the whole run) in ``epoch``."""
        rng = np.random.default_rng([self.seed, step, 0xDE0])
        draw = rng.random()
        delta = int(rng.integers(-self.rand_f_thres_delta, 2)) if self.rand_f_thres_delta else 0
        phase = self.phase(step)
        if phase == PRETRAIN:
            weight = self.jac.pretrain_weight
        elif self.jac.stop_epoch is not None and epoch >= self.jac.stop_epoch:
            weight = 0.0
        else:
            deq_steps = step - self.pretrain_steps
            weight = self.jac.weight + (0.1 * (deq_steps // self.jac.incremental) if self.jac.incremental else 0.0)
        compute = weight > 0 and draw < self.jac.freq
        f_thres = self.f_thres
        if phase == DEQ_MODE and compute:
            f_thres = max(1, f_thres + delta)
        return StepPlan(phase=phase, f_thres=f_thres if phase == DEQ_MODE else self.unroll_steps,
                        jac_weight=weight if compute else 0.0)

    def apply(self, model: nn.Module, plan: StepPlan) -> None:
        """Configure ``model`` (an MDEQ backbone) for a training step with ``plan``."""
        if plan.phase == PRETRAIN:
            model.configure_deq(solver="unroll", max_iter=self.unroll_steps)
        else:
            model.configure_deq(**{**dict(self.deq), "max_iter": plan.f_thres})
        model.jac_probes = self.jac.probes if plan.compute_jac else 0

    def apply_eval(self, model: nn.Module, step: int, f_thres: Optional[int] = None) -> None:
        """Configure ``model`` for evaluation after ``step`` optimizer steps (the phase training is in)."""
        model.jac_probes = 0
        if self.phase(step) == PRETRAIN and f_thres is None:
            model.configure_deq(solver="unroll", max_iter=self.unroll_steps)
        else:
            model.configure_deq(**{**dict(self.deq), "max_iter": f_thres or self.eval_f_thres or self.f_thres})

    def describe(self, step: int) -> Dict[str, Any]:
        return dict(phase=self.phase(step), pretrain_steps=self.pretrain_steps, unroll_steps=self.unroll_steps,
                    **{f"deq_{k}": v for k, v in self.deq.items()})
