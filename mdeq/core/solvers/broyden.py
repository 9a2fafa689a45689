"""Limited-memory "good" Broyden, solver ``"broyden"`` (the original MDEQ's solver)."""
from __future__ import annotations

from typing import Callable

import torch

from ..options import Option, positive_int
from ..state import State
from .bookkeeping import Progress, Record, flatten
from .registry import register_solver

__all__ = ["broyden"]

MEMORY = Option(20, positive_int, "rank-one updates kept; when full, the inverse Jacobian restarts from -I (the "
                "original keeps its threshold's worth: mdeq.models.official_solver sets that)")


@register_solver("broyden", options={"memory": MEMORY})
@torch.no_grad()
def broyden(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str, memory: int,
            trace: bool, divergence_factor: float, record: Record, return_f: bool):
    """Limited-memory "good" Broyden on g(z) = f(z) - z, per sample.

    The inverse Jacobian of g is approximated by H = -I + sum_i u_i v_i^T over at most ``memory`` rank-one
    updates, and each step is z <- z - H g(z) (the first step is the plain fixed-point step). When the memory is
    full, H restarts from -I (a restarted Broyden: overwriting the oldest update instead breaks the secant
    conditions and diverges on hard problems).
    An update whose denominator vanishes or is not finite is skipped for that sample. No line search.

    ``max_iter`` counts every evaluation of f, the one at z0 included: the original's Broyden with threshold T
    evaluates f at z0 and then takes T steps, i.e. ``max_iter = T + 1`` (and ``memory = T`` keeps every update).
    Stops per sample as described in ``mdeq.core.solvers``; returns (z, SolverStats).
    """
    f_flat, x, packer, dtype = flatten(f, z0)
    b, d = x.shape
    progress = Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
    U = x.new_empty(b, memory, d)  # update i is rows U[:, i], V[:, i]; only the first n are in use
    V = x.new_empty(b, memory, d)
    n = 0  # number of stored updates
    zero = x.new_zeros(())

    def low_rank(left, right, y):  # right^T (left y) over the stored updates: two batched products, no copies
        c = torch.bmm(y.unsqueeze(1), left[:, :n].transpose(1, 2))  # (B, 1, n): <left_i, y>
        return torch.bmm(c, right[:, :n]).squeeze(1)

    fx = f_flat(x)
    g = fx - x
    if not progress.observe(x, fx, g):
        dx = g  # -H0 g with H0 = -I
        for _ in range(1, max_iter):
            x = x + dx
            fx = f_flat(x)
            g, g_old = fx - x, g
            if progress.observe(x, fx, g):
                break
            # One product with H and one with H^T per step (the textbook method makes three): H dg is computed
            # from dg itself (as a difference H g - H g_old it would cancel in float32 on slow problems), and the
            # next step -(H + u v^T) g = dx - H dg - u <v, g> reuses it, since H g = H g_old + H dg = H dg - dx.
            dg = g - g_old
            hdg = low_rank(V, U, dg).sub_(dg) if n else -dg
            v = low_rank(U, V, dx).sub_(dx) if n else -dx
            denom = torch.linalg.vecdot(dx, hdg)
            ok = torch.isfinite(denom) & (denom.abs() > 1e-30)  # else: skip this sample's update
            scale = torch.where(ok, 1.0 / torch.where(ok, denom, 1.0), 0.0)
            restart = n == memory  # memory full: restart from H = -I (dropping old updates one by one is unstable)
            if restart:
                n = 0
            u = torch.mul(torch.sub(dx, hdg), scale[:, None], out=U[:, n])
            v = torch.where(ok[:, None], v, zero, out=V[:, n])  # a skipped v may be non-finite
            n += 1
            ug = u * torch.linalg.vecdot(v, g)[:, None]
            dx = g - ug if restart else (dx - hdg).sub_(ug)  # -(-I + u v^T) g, or -(H + u v^T) g
    return progress.finish("broyden", packer, dtype)
