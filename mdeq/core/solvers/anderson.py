"""Anderson acceleration (type II), solver ``"anderson"``."""
from __future__ import annotations

from typing import Callable

import torch

from ..options import Option, nonnegative, positive_int, unit_interval
from ..state import State
from .bookkeeping import Progress, Record, flatten
from .registry import register_solver

__all__ = ["anderson"]

OPTIONS = {
    "m": Option(7, positive_int, "history: the last m iterates are mixed"),
    "lam": Option(1e-4, nonnegative, "regularisation of the mixing system, relative to the mean of its diagonal"),
    "damping": Option(1.0, unit_interval, "mix damping * f(x_i) + (1 - damping) * x_i"),
}


@register_solver("anderson", options=OPTIONS)
@torch.no_grad()
def anderson(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str, m: int,
             lam: float, damping: float, trace: bool, divergence_factor: float, record: Record, return_f: bool):
    """Anderson acceleration (type II) with history ``m``, per sample.

    With G_i = f(x_i) - x_i for the last n <= m iterates, the mixing weights solve
    min ||sum_i alpha_i G_i||^2 subject to sum_i alpha_i = 1, i.e. (G G^T + lam * s I) a = 1, alpha = a / sum(a).
    The regularisation is *relative*: s = trace(G G^T) / n, so ``lam`` means the same at every residual scale.
    The next iterate is sum_i alpha_i (damping * f(x_i) + (1 - damping) * x_i). When the small system is
    singular or gives non-finite weights for a sample, that sample takes a damped fixed-point step instead.

    The Gram matrix is updated incrementally (one new row per step) and the n x n systems are solved in float64.
    Stops per sample as described in ``mdeq.core.solvers``; returns (z, SolverStats).
    """
    f_flat, x, packer, dtype = flatten(f, z0)
    b, d = x.shape
    progress = Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
    F = x.new_empty(b, m, d)  # f(x_i)
    G = x.new_empty(b, m, d)  # f(x_i) - x_i
    gram = torch.zeros(b, m, m, dtype=torch.float64, device=x.device)
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    ones = torch.ones(b, m, 1, dtype=torch.float64, device=x.device)
    for k in range(max_iter):
        fx = f_flat(x)
        slot = k % m
        n = min(k + 1, m)
        F[:, slot] = fx
        g = torch.sub(fx, x, out=G[:, slot])
        row = torch.bmm(g.unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1)  # (B, n): <g, G_i>, incl. ||g||^2
        if progress.observe(x, fx, g, abs_res=row[:, slot].clamp_min(0).sqrt()):
            break
        row = row.double()
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        if n == 1:
            x = fx if damping == 1 else torch.add(x, g, alpha=damping)
            continue
        H = gram[:, :n, :n]
        scale = H.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        H = H + (lam * scale)[:, None, None] * eye[:n, :n]
        a, info = torch.linalg.solve_ex(H, ones[:, :n])
        a = a.squeeze(2)
        alpha = a / a.sum(dim=1, keepdim=True)
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
        if bool(bad.any()):
            alpha = torch.where(bad[:, None], torch.nn.functional.one_hot(torch.tensor(slot), n).to(alpha), alpha)
        alpha = alpha.to(x.dtype).unsqueeze(1)  # (B, 1, n)
        x = torch.bmm(alpha, F[:, :n]).squeeze(1)
        if damping != 1:
            x.sub_(torch.bmm(alpha, G[:, :n]).squeeze(1), alpha=1 - damping)
    return progress.finish("anderson", packer, dtype)
