"""The MDEQ training schedule (config group ``schedule``): unrolled pre-training, then DEQ mode with the
Jacobian penalty.

Follows the official classification loop (``cls_function.train``), per optimizer step ``t``:

* ``t < pretrain_steps`` (or the first ``pretrain_fraction`` of the run's steps, ``resolve_pretrain``): unrolled
  mode, f applied ``unroll_steps`` times (the official NUM_LAYERS; None: the model's ``num_layers``), Jacobian
  weight ``jac.pretrain_weight``;
* afterwards DEQ mode with the run's DEQ settings (config group ``deq``, ``mdeq.core.DEQ`` options);
  Jacobian weight ``jac.weight + 0.1 * ((t - pretrain_steps) // jac.incremental)`` (no increase when
  ``incremental`` is 0), and 0 from epoch ``jac.stop_epoch`` on;
* the penalty is computed only on a fraction ``jac.freq`` of steps; on those steps ``max_iter`` is moved by a
  random delta in ``{-max_iter_jitter, ..., +1}`` (the official RAND_F_THRES_DELTA);
* evaluation uses ``eval_max_iter`` (None: ``max_iter``).

The random draws come from a generator seeded by (seed, step), so every DDP rank makes the same choice and a
resumed run makes the same choices as an uninterrupted one. The defaults of the ``schedule`` config group are
this module's dataclass defaults (``schedule_defaults``), their only home.

The schedule configures every MDEQ in the model (``mdeq.configure_deq``: an MDEQ preset, its ``features_only``
extractor, a user's model with MDEQs inside). A model holding none trains on ``ExplicitSchedule``: one phase, no
solver, no penalty (``schedule_for`` picks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
from torch import nn

from ..models.control import configure_deq, find_mdeqs, set_jac_probes

__all__ = ["JacobianSchedule", "DEQSchedule", "ExplicitSchedule", "StepPlan", "PRETRAIN", "DEQ_MODE", "EXPLICIT",
           "SCHEDULE_FIELDS", "schedule_defaults", "deq_changes", "build_schedule", "schedule_for", "resolve_pretrain"]

PRETRAIN, DEQ_MODE, EXPLICIT = "pretrain", "deq", "explicit"  # EXPLICIT: the one phase of a model without an MDEQ


@dataclass(frozen=True)
class JacobianSchedule:
    """Official LOSS.JAC_* keys: weight, freq, incremental (steps per +0.1), stop_epoch, pretrain_weight."""

    weight: float = 0.0           # penalty weight in DEQ mode (official JAC_LOSS_WEIGHT)
    freq: float = 0.0             # fraction of the steps that compute it (JAC_LOSS_FREQ)
    incremental: int = 0          # DEQ steps per +0.1 of the weight; 0: constant (JAC_INCREMENTAL)
    stop_epoch: Optional[int] = None  # no penalty from this epoch on (JAC_STOP_EPOCH)
    pretrain_weight: float = 0.0  # weight while unrolled (PRETRAIN_JAC_LOSS_WEIGHT)
    probes: int = 2               # Hutchinson vectors (the official ``vecs``)

    def __post_init__(self):
        if not 0.0 <= self.freq <= 1.0:
            raise ValueError(f"schedule.jac.freq is a probability in [0, 1], got {self.freq}")
        if self.weight < 0 or self.pretrain_weight < 0:
            raise ValueError("schedule.jac.weight and schedule.jac.pretrain_weight must be >= 0")
        if self.incremental < 0:
            raise ValueError(f"schedule.jac.incremental is a number of steps >= 0 (0 = constant weight), got "
                             f"{self.incremental}")
        if self.probes < 1:
            raise ValueError(f"schedule.jac.probes must be >= 1, got {self.probes}")


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does: its phase, solver budget and Jacobian-penalty weight (0 = not computed)."""

    phase: str
    max_iter: Optional[int]  # the solver budget, or the unrolled depth (None: the model's num_layers)
    jac_weight: float

    @property
    def compute_jac(self) -> bool:
        return self.jac_weight > 0


@dataclass(frozen=True)
class DEQSchedule:
    """Pre-training length and depth, the evaluation budget, the threshold jitter and the Jacobian schedule
    (the ``schedule`` group), with the DEQ-mode settings ``deq`` (``mdeq.core.DEQ`` options; ``max_iter`` is
    the budget that jitter moves) and the run's seed."""

    pretrain_steps: int = 0              # optimizer steps unrolled before DEQ mode (official PRETRAIN_STEPS)
    pretrain_fraction: float = 0.0       # or this fraction of the run's optimizer steps (when pretrain_steps is 0)
    unroll_steps: Optional[int] = None   # f-applications when unrolled (None: the model's num_layers)
    eval_max_iter: Optional[int] = None  # forward budget at evaluation (None: deq max_iter)
    max_iter_jitter: int = 0             # on Jacobian-penalty steps max_iter += U{-jitter..1} (RAND_F_THRES_DELTA)
    jac: JacobianSchedule = field(default_factory=JacobianSchedule)
    deq: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        if self.pretrain_steps < 0 or (self.unroll_steps is not None and self.unroll_steps < 1):
            raise ValueError("schedule.pretrain_steps must be >= 0 and schedule.unroll_steps >= 1 (or null)")
        if not 0.0 <= self.pretrain_fraction < 1.0:
            raise ValueError(f"schedule.pretrain_fraction is a fraction of the run's steps in [0, 1), got "
                             f"{self.pretrain_fraction}")
        if self.eval_max_iter is not None and self.eval_max_iter < 1:
            raise ValueError(f"schedule.eval_max_iter must be >= 1 (or null), got {self.eval_max_iter}")
        if "max_iter" not in self.deq:
            raise ValueError("the DEQ-mode settings need max_iter (the forward budget)")
        if self.max_iter_jitter < 0:
            raise ValueError(f"schedule.max_iter_jitter must be >= 0, got {self.max_iter_jitter}")

    @property
    def max_iter(self) -> int:
        return int(self.deq["max_iter"])

    def phase(self, step: int) -> str:
        return PRETRAIN if step < self.pretrain_steps else DEQ_MODE

    def depth(self, model: nn.Module) -> int:
        """The unrolled depth: ``unroll_steps``, else the (first) MDEQ's ``num_layers`` (the official NUM_LAYERS)."""
        if self.unroll_steps:
            return self.unroll_steps
        return next((int(getattr(s, "num_layers", 0) or 0) for s in find_mdeqs(model).values()), 0) or 1

    def plan(self, step: int, epoch: int) -> StepPlan:
        """The plan of optimizer step ``step`` (0-based, counted over the whole run) in ``epoch``."""
        rng = np.random.default_rng([self.seed, step, 0xDE0])
        draw = rng.random()
        delta = int(rng.integers(-self.max_iter_jitter, 2)) if self.max_iter_jitter else 0
        phase = self.phase(step)
        if phase == PRETRAIN:
            weight = self.jac.pretrain_weight
        elif self.jac.stop_epoch is not None and epoch >= self.jac.stop_epoch:
            weight = 0.0
        else:
            deq_steps = step - self.pretrain_steps
            weight = self.jac.weight + (0.1 * (deq_steps // self.jac.incremental) if self.jac.incremental else 0.0)
        compute = weight > 0 and draw < self.jac.freq
        max_iter = self.max_iter
        if phase == DEQ_MODE and compute:
            max_iter = max(1, max_iter + delta)
        return StepPlan(phase=phase, max_iter=max_iter if phase == DEQ_MODE else self.unroll_steps,
                        jac_weight=weight if compute else 0.0)

    def apply(self, model: nn.Module, plan: StepPlan) -> None:
        """Configure every MDEQ in ``model`` for a training step with ``plan``."""
        if plan.phase == PRETRAIN:
            configure_deq(model, solver="unroll", max_iter=plan.max_iter or self.depth(model))
        else:
            configure_deq(model, **{**dict(self.deq), "max_iter": plan.max_iter})
        set_jac_probes(model, self.jac.probes if plan.compute_jac else 0)

    def apply_eval(self, model: nn.Module, step: int, max_iter: Optional[int] = None) -> None:
        """Configure ``model`` for evaluation after ``step`` optimizer steps (the phase training is in);
        ``max_iter`` (DEQ mode) overrides the evaluation budget."""
        set_jac_probes(model, 0)
        if self.phase(step) == PRETRAIN and max_iter is None:
            configure_deq(model, solver="unroll", max_iter=self.depth(model))
        else:
            configure_deq(model, **{**dict(self.deq), "max_iter": max_iter or self.eval_max_iter or self.max_iter})

    def describe(self, step: int) -> Dict[str, Any]:
        return dict(phase=self.phase(step), pretrain_steps=self.pretrain_steps, unroll_steps=self.unroll_steps,
                    **{f"deq_{k}": v for k, v in self.deq.items()})


class ExplicitSchedule:
    """The schedule of a model without an MDEQ: every step the same (phase ``explicit``), nothing to configure."""

    pretrain_steps = 0

    def phase(self, step: int) -> str:
        return EXPLICIT

    def plan(self, step: int, epoch: int) -> StepPlan:
        return StepPlan(phase=EXPLICIT, max_iter=None, jac_weight=0.0)

    def apply(self, model: nn.Module, plan: StepPlan) -> None:
        """Nothing to configure."""

    def apply_eval(self, model: nn.Module, step: int, max_iter: Optional[int] = None) -> None:
        """Nothing to configure."""

    def describe(self, step: int) -> Dict[str, Any]:
        return dict(phase=EXPLICIT)


SCHEDULE_FIELDS = ("pretrain_steps", "pretrain_fraction", "unroll_steps", "eval_max_iter", "max_iter_jitter", "jac")


def schedule_defaults() -> Dict[str, Any]:
    """The ``schedule`` config group's keys and defaults (registered as ``schedule/base`` by the tools)."""
    defaults = DEQSchedule(deq={"max_iter": 1})
    return {f.name: (asdict(defaults.jac) if f.name == "jac" else getattr(defaults, f.name))
            for f in fields(DEQSchedule) if f.name in SCHEDULE_FIELDS}


def deq_changes(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The run config's DEQ settings (group ``deq``) that are set: null leaves the model's own."""
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg.get("deq") or {}).items()
            if v is not None}


def resolve_pretrain(cfg: Mapping[str, Any], total_steps: int) -> Dict[str, Any]:
    """``cfg`` with ``schedule.pretrain_fraction`` turned into ``schedule.pretrain_steps`` for a run of
    ``total_steps`` optimizer steps (an explicit ``pretrain_steps`` > 0 wins), so that the stored run config
    names the step at which DEQ mode begins and a checkpoint rebuilds without knowing the data."""
    s = dict(cfg.get("schedule") or {})
    fraction = float(s.get("pretrain_fraction") or 0.0)
    if fraction and not int(s.get("pretrain_steps") or 0):
        s["pretrain_steps"] = max(1, round(fraction * total_steps))
    return {**dict(cfg), "schedule": s}


def build_schedule(cfg: Mapping[str, Any], model: nn.Module) -> DEQSchedule:
    """The run's schedule; ``model`` gets the run's DEQ-mode settings now (validated before the first step).

    The schedule keeps the model's resulting settings whole (its preset's, changed by the run's ``deq``), so
    returning to DEQ mode after the unrolled phase restores all of them. Every MDEQ in ``model`` is configured
    alike (``mdeq.configure_deq``); a model without one raises the ValueError "no MDEQ found in ..."
    (``schedule_for`` gives such a model ``ExplicitSchedule``).
    """
    stages = configure_deq(model, **deq_changes(cfg))
    s = dict(cfg.get("schedule") or {})
    jac = JacobianSchedule(**dict(s.pop("jac", None) or {}))
    unknown = sorted(set(s) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ValueError(f"unknown schedule setting(s) {unknown}; valid: {list(SCHEDULE_FIELDS)}")
    if float(s.get("pretrain_fraction") or 0.0) and not int(s.get("pretrain_steps") or 0):
        raise ValueError("schedule.pretrain_fraction is a fraction of the run's steps: turn it into "
                         "schedule.pretrain_steps with resolve_pretrain(cfg, total_steps) first")
    first = next(iter(stages.values()))
    deq = {**first.settings, "max_iter": first.options["max_iter"]}
    schedule = DEQSchedule(jac=jac, deq=deq, seed=int(cfg["train"]["seed"]), **s)
    return replace(schedule, unroll_steps=schedule.depth(model))


def schedule_for(cfg: Mapping[str, Any], model: nn.Module) -> Union[DEQSchedule, ExplicitSchedule]:
    """``build_schedule`` for a model holding an MDEQ, ``ExplicitSchedule`` for one without."""
    return build_schedule(cfg, model) if find_mdeqs(model) else ExplicitSchedule()
