"""The MDEQs inside the model a tool trains or evaluates, or none: the one place where the training loop, the
schedule and the evaluation ask a model for its equilibria.

Every timm classifier trains and evaluates in the same tools; the MDEQ parts (the ``deq`` settings, the ``schedule``:
unrolled pre-training, the Jacobian penalty, solver budgets) apply exactly to the models holding an MDEQ: an MDEQ
preset, its ``features_only`` extractor, or a user's model with one or more MDEQs inside, found by
``mdeq.find_mdeqs`` and configured through ``mdeq.configure_deq``. A model without one (``resnet18``,
``hrnet_w18_small``) is an explicit network: the MDEQ defaults of a config are skipped for it with one log line, and
an MDEQ setting given on the command line is refused, naming the model and the setting (``refuse_mdeq_settings``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..core import DEQ, SolverStats
from ..models.control import configure_deq, find_mdeqs, set_jac_probes, stage_deq

__all__ = ["Equilibria", "combine_stats", "MDEQ_SETTINGS", "mdeq_settings_given", "refuse_mdeq_settings",
           "log_skipped_mdeq_defaults"]

_log = logging.getLogger("mdeq.train")

# the settings that only mean something for a model holding an MDEQ: config groups / keys (a Hydra override names
# them as ``deq=fast``, ``deq.max_iter=4``, ``schedule.jac.weight=1``, ``train.compile_cell=true``)
MDEQ_SETTINGS = ("deq", "schedule", "train.compile_cell")


class Equilibria:
    """The equilibrium stages of ``model`` (``mdeq.find_mdeqs``); false when it holds none (an explicit network).

    ``configure`` and ``set_jac_probes`` act on every stage; ``options`` are the first stage's DEQ settings (the tools
    configure all stages alike); ``stats`` is the last forward's ``SolverStats``, one per forward however many stages
    there are (``combine_stats``).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages = find_mdeqs(model)

    def __bool__(self) -> bool:
        return bool(self.stages)

    @property
    def paths(self) -> List[str]:
        return list(self.stages)

    @property
    def deq(self) -> Optional[DEQ]:
        """The first stage's ``mdeq.core.DEQ`` (None for an explicit model)."""
        for stage in self.stages.values():
            return stage_deq(stage)
        return None

    @property
    def options(self) -> Optional[Dict[str, Any]]:
        """Every DEQ setting of the first stage, defaults resolved (None for an explicit model)."""
        deq = self.deq
        return None if deq is None else dict(deq.options)

    def configure(self, **options: Any) -> None:
        """``mdeq.configure_deq(model, **options)``: every stage, validated on all before any changes."""
        configure_deq(self.model, **options)

    def set_jac_probes(self, probes: int) -> None:
        """Jacobian-penalty probes of every stage's training forwards; nothing to set on an explicit model."""
        if self.stages:
            set_jac_probes(self.model, probes)

    def stats(self) -> Optional[SolverStats]:
        """The last forward's solver statistics (None for an explicit model or before the first forward)."""
        stats = [getattr(stage, "stats", None) for stage in self.stages.values()]
        if not stats or any(s is None for s in stats):
            return None
        return stats[0] if len(stats) == 1 else combine_stats(stats)


def combine_stats(stats: Sequence[SolverStats]) -> SolverStats:
    """One ``SolverStats`` for several equilibria solved in one forward (a model holding several MDEQs): per sample,
    f-evaluations add up, residuals, convergence and divergence take the worst stage; the loss terms (Jacobian
    penalty, initial-guess loss) add up; backward statistics combine once every stage's backward has run. The
    fixed-point correction's states and head outputs (``corrections``, ``aux_outputs``) are an MDEQ model's own (its
    head makes them) and do not combine: a model with several MDEQs trains without that loss."""
    first = stats[0]
    backward = [s.backward for s in stats]

    def total(values: Iterable[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        present = [v for v in values if v is not None]
        return torch.stack([v.float() for v in present]).sum(0) if present else None

    return SolverStats(
        solver="+".join(dict.fromkeys(s.solver for s in stats)),
        nstep=torch.stack([s.nstep for s in stats]).sum(0),
        abs_residual=torch.stack([s.abs_residual.float() for s in stats]).amax(0),
        rel_residual=torch.stack([s.rel_residual.float() for s in stats]).amax(0),
        converged=torch.stack([s.converged for s in stats]).all(0),
        diverged=torch.stack([s.diverged for s in stats]).any(0),
        nfe=sum(int(s.nfe) for s in stats),
        backward=combine_stats(backward) if all(b is not None for b in backward) else None,
        jac_loss=total(s.jac_loss for s in stats),
        init_loss=total(s.init_loss for s in stats),
        trajectory_steps=first.trajectory_steps,
    )


def _override_key(override: str) -> str:
    """The setting an override names: ``deq.max_iter`` of ``+deq.max_iter=4``, ``deq`` of ``deq=fast``."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def mdeq_settings_given(overrides: Sequence[str]) -> List[str]:
    """The command-line overrides that set an MDEQ setting (``MDEQ_SETTINGS``), in the order given; turning an MDEQ
    feature off (``train.compile_cell=false``) asks nothing of the model and is not one."""
    given = []
    for override in overrides:
        key = _override_key(override)
        value = override.split("=", 1)[1].strip().lower() if "=" in override else ""
        if key == "train.compile_cell" and value in ("false", "0", "null", "none", ""):
            continue
        if any(key == s or key.startswith(s + ".") or key.startswith(s + "@") for s in MDEQ_SETTINGS):
            given.append(override)
    return given


def refuse_mdeq_settings(overrides: Sequence[str], model_name: str) -> None:
    """Raise a ValueError naming the model and the settings when the command line sets MDEQ settings for a model
    that holds no MDEQ (they would configure nothing)."""
    given = mdeq_settings_given(overrides)
    if given:
        raise ValueError(
            f"model {model_name} holds no MDEQ (it is an explicit network), so {', '.join(given)} "
            f"{'configures' if len(given) == 1 else 'configure'} nothing: the deq group, the schedule group and "
            f"train.compile_cell apply to models with an MDEQ inside. Drop {'it' if len(given) == 1 else 'them'}, "
            "or train an MDEQ (model=mdeq_tiny, model=mdeq_small, ...)")


def log_skipped_mdeq_defaults(model_name: str) -> None:
    """The one log line of a run whose model holds no MDEQ."""
    _log.info("model %s holds no MDEQ: the MDEQ settings of the config (deq, schedule: pre-training, Jacobian "
              "penalty, solver budgets; the MDEQ fields of model.kwargs) are skipped; every other setting applies as "
              "to any timm model", model_name)
