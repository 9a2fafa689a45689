"""Limited-memory "good" Broyden, solver ``"broyden"`` (the original MDEQ's solver)."""
from __future__ import annotations

from typing import Callable

import torch

from ..options import Option, positive_int
from ..state import State
from .bookkeeping import Progress, Record, flatten
from .registry import register_solver

__all__ = ["broyden"]

MEMORY = Option(20, positive_int, "rank-one updates kept; when full, the inverse Jacobian restarts from -I")


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
    U = x.new_zeros(b, memory, d)
    V = x.new_zeros(b, memory, d)
    n = 0  # number of stored updates

    def h_times(y):  # H y = -y + U^T (V y)
        if n == 0:
            return -y
        c = torch.bmm(V[:, :n], y.unsqueeze(2))  # (B, n, 1)
        return torch.bmm(c.transpose(1, 2), U[:, :n]).squeeze(1) - y

    def times_h(y):  # y^T H = -y^T + (y^T U^T) V
        if n == 0:
            return -y
        c = torch.bmm(U[:, :n], y.unsqueeze(2))
        return torch.bmm(c.transpose(1, 2), V[:, :n]).squeeze(1) - y

    fx = f_flat(x)
    g = fx - x
    if not progress.observe(x, fx, g):
        dx = g.clone()  # -H0 g with H0 = -I
        for k in range(1, max_iter):
            x = x + dx
            fx = f_flat(x)
            g_new = fx - x
            if progress.observe(x, fx, g_new):
                break
            dg = g_new - g
            g = g_new
            h_dg = h_times(dg)
            v = times_h(dx)
            denom = (dx * h_dg).sum(dim=1, keepdim=True)
            ok = torch.isfinite(denom) & (denom.abs() > 1e-30) & torch.isfinite(h_dg).all(dim=1, keepdim=True)
            u = torch.where(ok, (dx - h_dg) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(dx))
            v = torch.where(ok, v, torch.zeros_like(v))
            if n == memory:  # memory full: restart from H = -I (dropping old updates one by one is unstable)
                n = 0
            U[:, n] = u
            V[:, n] = v
            n += 1
            dx = -h_times(g)
    return progress.finish("broyden", packer, dtype)
