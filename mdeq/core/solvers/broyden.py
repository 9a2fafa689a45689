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
            g = fx - x
            if progress.observe(x, fx, g):
                break
            # One product with H and one with H^T per step. With Hg = H g_new, the secant update needs
            # H dg = Hg + dx (the last step was dx = -H g_old), so u = (dx - H dg) / <dx, H dg> = -Hg / denom,
            # v = H^T dx, and the next step -(H + u v^T) g_new = -Hg * <dx, dx> / denom (<v, g_new> = <dx, Hg>).
            hg = low_rank(V, U, g).sub_(g) if n else -g
            v = low_rank(U, V, dx).sub_(dx) if n else -dx
            a = torch.linalg.vecdot(dx, hg)  # <dx, Hg>
            dd = torch.linalg.vecdot(dx, dx)
            denom = a + dd
            ok = torch.isfinite(denom) & (denom.abs() > 1e-30)  # else: skip this sample's update
            scale = torch.where(ok, -1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
            if n == memory:  # memory full: restart from H = -I (dropping old updates one by one is unstable)
                n = 0
                restarted = True
            else:
                restarted = False
            torch.mul(hg, scale[:, None], out=U[:, n])
            torch.where(ok[:, None], v, torch.zeros_like(v[:1]), out=V[:, n])  # a skipped v may be non-finite
            n += 1
            if restarted:  # H' = -I + u v^T: -H' g = g - u <v, g>
                dx = torch.addcmul(g, U[:, n - 1], torch.where(ok, -a, torch.zeros_like(a))[:, None])
            else:  # -(H + u v^T) g = -Hg * (1 + scale <dx, Hg>), = -Hg * <dx, dx> / denom where the update was made
                dx = hg * torch.where(ok, -dd * -scale, -torch.ones_like(dd))[:, None]
    return progress.finish("broyden", packer, dtype)
