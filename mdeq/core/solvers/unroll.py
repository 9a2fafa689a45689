"""``"unroll"``: f applied exactly ``max_iter`` times from z0 with ordinary autograd (MDEQ's pre-training mode).

Not a root solver: it never stops early, and it runs under autograd (``differentiable``), so its result carries
the gradient of the whole unrolled chain and ``DEQ`` attaches no backward. Its stats describe the last step,
||z_N - z_{N-1}|| (relative to ||z_N||), and every sample counts ``max_iter`` steps.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ..state import State
from .bookkeeping import Record, SolverStats, flatten, residual_norms
from .registry import register_solver

__all__ = ["unroll", "unroll_steps"]


def unroll_steps(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, steps: int, keep: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """f applied ``steps`` times from z0. Returns (z_steps, z_{steps-1}, [z_0..z_steps] if ``keep``)."""
    z = prev = z0
    states = [z0] if keep else []
    for _ in range(steps):
        prev, z = z, f(z)
        if keep:
            states.append(z)
    return z, prev, states


@register_solver("unroll", differentiable=True, fixed_budget={})
def unroll(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str, trace: bool,
           record: Record):
    """f applied ``max_iter`` times from z0 (see the module docstring). ``converged``: the last step's residual
    (in ``stop_mode``) is <= ``tol``; ``trace`` keeps every step's ||z_k - z_{k-1}||; ``record`` keeps the
    iterates (0 = z0), detached."""
    f_flat, x, packer, dtype = flatten(f, z0)
    z, prev, states = unroll_steps(f_flat, x, max_iter, keep=record is not None or trace)
    abs_res, rel_res = residual_norms(prev.detach(), z.detach())
    res = rel_res if stop_mode == "rel" else abs_res
    stats = SolverStats(solver="unroll", nstep=torch.full_like(abs_res, max_iter, dtype=torch.long),
                        abs_residual=abs_res, rel_residual=rel_res, converged=res <= tol,
                        diverged=~torch.isfinite(res), nfe=max_iter)
    if trace:
        rows = [residual_norms(a.detach(), b.detach())[1 if stop_mode == "rel" else 0]
                for a, b in zip(states[:-1], states[1:])]
        stats.trace = torch.stack(rows, dim=1)
    if record is not None:
        steps = range(len(states)) if record == "all" else [i for i in record if i < len(states)]
        stats.trajectory = [packer.unpack(states[i].detach().to(dtype)) for i in steps]
        stats.trajectory_steps = list(steps)
    return packer.unpack(z.to(dtype)), stats
