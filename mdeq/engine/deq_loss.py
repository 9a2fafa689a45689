"""The DEQ terms of a training loss: fixed-point correction over trajectory states, the Jacobian penalty and
the Skip DEQ initial-guess loss, read from the forward's ``SolverStats``."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core import SolverStats, fixed_point_correction
from .deq_schedule import StepPlan

__all__ = ["with_corrections", "with_regularizers"]


def with_corrections(loss: torch.Tensor, stats: Optional[SolverStats], criterion: Callable, targets: torch.Tensor,
                     gamma: float) -> torch.Tensor:
    """The task loss with DEQ-Flow's fixed-point correction: when the forward attached head outputs at
    trajectory states (``stats.aux_outputs``), their losses weigh ``gamma^(n-i)`` and the final one 1.
    Called under the step's autocast, like ``criterion``."""
    if stats is None or not stats.aux_outputs:
        return loss
    return fixed_point_correction([criterion(o, targets) for o in stats.aux_outputs] + [loss], gamma)


def with_regularizers(loss: torch.Tensor, stats: Optional[SolverStats], plan: StepPlan) -> torch.Tensor:
    """Adds the Jacobian penalty (weighted by the step's plan, on the steps that compute it) and the weighted
    initial-guess loss of Skip / Skip Reg. DEQ, both in float32."""
    if stats is None:
        return loss
    if plan.compute_jac and stats.jac_loss is not None:
        loss = loss + plan.jac_weight * stats.jac_loss.float()
    if stats.init_loss is not None:
        loss = loss + stats.init_loss.float()
    return loss
