"""Damped fixed-point (Picard) iteration, solver ``"fixed_point"``."""
from __future__ import annotations

from typing import Callable

import torch

from ..options import Option, unit_interval
from ..state import State
from .bookkeeping import Progress, Record, flatten
from .registry import register_solver

__all__ = ["fixed_point"]

DAMPING = Option(1.0, unit_interval, "z <- damping * f(z) + (1 - damping) * z (1: plain Picard iteration)")


@register_solver("fixed_point", options={"damping": DAMPING})
@torch.no_grad()
def fixed_point(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str,
                damping: float, trace: bool, divergence_factor: float, record: Record, return_f: bool):
    """Damped fixed-point (Picard) iteration z <- damping * f(z) + (1 - damping) * z.

    Stops per sample as described in ``mdeq.core.solvers``. Returns (z, SolverStats) with z the per-sample
    lowest-residual iterate, in the structure of ``z0``.
    """
    f_flat, x, packer, dtype = flatten(f, z0)
    progress = Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
    for _ in range(max_iter):
        fx = f_flat(x)
        g = fx - x
        if progress.observe(x, fx, g):
            break
        x = fx if damping == 1 else torch.add(x, g, alpha=damping)
    return progress.finish("fixed_point", packer, dtype)
