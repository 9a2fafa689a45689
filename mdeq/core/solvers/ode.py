"""Continuous-DEQ forward solver: integrate dz/dt = f(z) - z to its steady state (solver name ``"ode"``).

A steady state of dz/dt = F(z) = f(z) - z is exactly a fixed point z* = f(z*), so this is one more solver for
the same equation (Pal, Edelman, Rackauckas, "Continuous Deep Equilibrium Models", arXiv 2201.12240). The
equilibrium, and therefore the implicit (IFT) gradient that ``DEQ`` attaches, are the same as with
``anderson`` or ``broyden``; nothing is back-propagated through the integration. What differs is the path:
the flow z(t) is stable wherever the eigenvalues of the Jacobian J = df/dz have real part < 1, which is weaker
than the |eigenvalue| < 1 that Picard iteration needs (e.g. f(z) = -1.2 z + c: Picard oscillates and blows up,
the flow converges).

The integrator is an embedded explicit Runge-Kutta pair given by a Butcher tableau, with the FSAL property
(the last stage is F at the new state, so every step costs ``stages - 1`` evaluations of f):

* ``bosh3``: Bogacki-Shampine 3(2), 3 evaluations per step (the default: cheap, and a loose tolerance is all
  a steady-state search needs);
* ``dopri5``: Dormand-Prince 5(4), 6 evaluations per step.

Error control is per sample, so a sample's trajectory never depends on its batch-mates. A step of size h from
z to z_new has the error estimate err = h * sum_i (b_i - bhat_i) k_i, and its error measure is the larger of

* ``RMS(err / (atol + rtol * max(|z|, |z_new|)))`` over the state (the usual ODE tolerance), and
* ``||err|| / (0.1 * h * ||F(z)||)`` (steady-state control: the error is at most 10% of the Euler step).

The step is accepted where the measure is <= 1, and h <- h * clamp(0.9 * measure^(-1/(q+1)), 0.2, 5) (q the
lower order of the pair), capped at ``max_step``. A rejected sample keeps its state and retries with the smaller h.
The second bound is what makes the residual go to zero: with the first alone the controller lets h grow past
the stability limit as soon as ||F|| is below the tolerance, and the residual stalls near ``rtol``/``atol``
(measured: no sample reached ``tol=1e-4`` on the test problems). The local error relative to the step depends
only on h * lambda, and 0.1 is reached inside the stability interval of both pairs, so near the steady state h
settles just below the stability limit whatever the scale of z.

The first h is ``h0``; h = 1 is the Picard step size: explicit Euler with h = 1 is Picard iteration,
z + F(z) = f(z). With ``bosh3`` and h = 1 the first stage k1 = F(z) is exactly that Picard step (f(z) - z); the
later stages evaluate f at z + k1 / 2 (a half-damped Picard step) and beyond, and correct it.

Stopping and bookkeeping are those of the other solvers (``bookkeeping.Progress``, see ``mdeq.core.solvers``):
after every step each sample's *current* state (the new state if accepted, the old one if rejected) is
observed with its f-value, which FSAL makes free, so residuals, per-sample stopping, divergence, the returned
best iterate and ``SolverStats`` mean the same thing. A sample whose step produced a non-finite value (f
returned inf/NaN at a stage point) is stopped as diverged, like a non-finite residual elsewhere. ``record``
indices count observed states: 0 = z0, k = the state after step k (a rejected step repeats the state).

f-evaluation accounting: ``stats.nfe`` and ``stats.nstep`` count real evaluations of f (1 for z0, then
``stages - 1`` per step, accepted or not), and ``max_iter`` is a budget of evaluations: no step is started that
would exceed it, so up to ``stages - 2`` evaluations of the budget may be left unused. ``trace`` has one column
per evaluation; the columns of intermediate stages hold the residual f(y) - y at the stage point y.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from ..options import Option, one_of, positive
from ..state import State
from .bookkeeping import Progress, Record, flatten
from .registry import register_solver

__all__ = ["ode", "TABLEAUS", "OPTIONS"]


@dataclass(frozen=True)
class _Tableau:
    """An explicit embedded RK pair with FSAL: ``a`` are the rows of stages 2..s (the last row equals ``b``),
    ``err`` = b - bhat (one weight per stage), ``q`` the lower order (sets the step-size exponent)."""

    a: Tuple[Tuple[float, ...], ...]
    err: Tuple[float, ...]
    q: int

    def __post_init__(self):
        s = len(self.a) + 1
        assert len(self.err) == s and all(len(row) == i + 1 for i, row in enumerate(self.a))

    @property
    def stages(self) -> int:
        return len(self.a) + 1


def _pair(a: Sequence[Sequence[float]], b: Sequence[float], bhat: Sequence[float], q: int) -> _Tableau:
    """Build a tableau from the usual (A, b, bhat) and check it is FSAL (last row of A = b, b_s = 0)."""
    assert list(a[-1]) == list(b[:-1]) and b[-1] == 0, "only FSAL pairs are supported"
    return _Tableau(tuple(tuple(r) for r in a), tuple(x - y for x, y in zip(b, bhat)), q)


TABLEAUS = {
    "bosh3": _pair(
        a=[[1 / 2], [0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]],
        b=[2 / 9, 1 / 3, 4 / 9, 0],
        bhat=[7 / 24, 1 / 4, 1 / 3, 1 / 8],
        q=2,
    ),
    "dopri5": _pair(
        a=[
            [1 / 5],
            [3 / 40, 9 / 40],
            [44 / 45, -56 / 15, 32 / 9],
            [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
            [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
            [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
        ],
        b=[35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
        bhat=[5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40],
        q=4,
    ),
}

_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 5.0
# Bound on ||local error|| / ||h F(z)|| (steady-state control). For dz/dt = lambda z it is reached at h*lambda ~ -2.1
# (bosh3) and ~ -2.7 (dopri5), inside their real stability intervals (-2.51, -3.31), where the ratio is 0.2, 0.28.
_STEP_RTOL = 0.1


def _max_step(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
        raise ValueError(f"{name} must be a number > 0 or None, got {v!r}")


OPTIONS = {
    "method": Option("bosh3", one_of(*TABLEAUS), "the Runge-Kutta pair: bosh3 (3 evaluations per step) or dopri5 (6)"),
    "rtol": Option(1e-2, positive, "relative tolerance of the local error"),
    "atol": Option(1e-3, positive, "absolute tolerance of the local error"),
    "h0": Option(1.0, positive, "first step size (1 = the Picard step)"),
    "max_step": Option(None, _max_step, "largest step size (None: no limit)"),
}


def _combo(weights: Sequence[float], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_j w_j k_j, skipping zero weights."""
    out = None
    for w, k in zip(weights, ks):
        if w == 0:
            continue
        out = k * w if out is None else out.add_(k, alpha=w)
    return out if out is not None else torch.zeros_like(ks[0])


@register_solver("ode", options=OPTIONS, evals_per_step=lambda options: TABLEAUS[options["method"]].stages - 1,
                 exact_budget=False)
@torch.no_grad()
def ode(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str, method: str,
        rtol: float, atol: float, h0: float, max_step: Optional[float], trace: bool, divergence_factor: float,
        record: Record, return_f: bool):
    """Integrate dz/dt = f(z) - z from z0 with an adaptive embedded RK pair until the fixed-point residual
    meets ``tol`` (see the module docstring). ``max_iter`` is a budget of f-evaluations.

    Returns (z, SolverStats) like the other solvers: z is the per-sample lowest-residual state, in the
    structure of ``z0``.
    """
    tab = TABLEAUS[method]
    cost = tab.stages - 1  # f-evaluations per step (FSAL)
    exponent = -1.0 / (tab.q + 1)
    h_max = math.inf if max_step is None else float(max_step)

    f_flat, x, packer, dtype = flatten(f, z0)
    progress = Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
    fx = f_flat(x)
    g = fx - x  # F(x): the first stage of the next step
    res = torch.linalg.vector_norm(g, dim=1)  # ||F(x)|| per sample
    done = progress.observe(x, fx, g, abs_res=res)
    h = torch.full_like(res, min(float(h0), h_max))
    tiny = torch.finfo(x.dtype).tiny

    while not done and progress.nfe + cost <= max_iter:
        stopped = progress.stopped()
        active = ~torch.tensor(stopped, device=x.device)
        h_step = torch.where(active, h, torch.zeros_like(h))[:, None]  # stopped samples stand still...
        k1 = g if not any(stopped) else torch.where(active[:, None], g, torch.zeros_like(g))  # ...even at NaN
        ks = [k1]
        for i, row in enumerate(tab.a):
            y = torch.addcmul(x, h_step, _combo(row, ks))
            fy = f_flat(y)
            k = fy - y
            ks.append(k)
            if i < len(tab.a) - 1:
                progress.trace_evaluation(fy, k)
        x_new, fx_new, g_new = y, fy, k  # FSAL: the last stage point is the new state, k = F(x_new)

        err = _combo(tab.err, ks).mul_(h_step)
        err_abs = torch.linalg.vector_norm(err, dim=1)
        scale = torch.maximum(x.abs(), x_new.abs()).mul_(rtol).add_(atol)
        err_norm = err.div_(scale).square_().mean(dim=1).sqrt_()
        # steady-state control: the error may not exceed _STEP_RTOL times the Euler displacement h * ||F(x)||
        err_norm = torch.maximum(err_norm, err_abs / (_STEP_RTOL * h_step[:, 0] * res).clamp_min_(tiny))
        finite = torch.isfinite(err_norm) & torch.isfinite(g_new).all(dim=1)
        accept = active & finite & (err_norm <= 1)
        factor = (_SAFETY * err_norm.pow(exponent)).clamp_(_MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(finite, factor, torch.full_like(factor, _MIN_FACTOR))
        h = torch.where(active, (h * factor).clamp_(max=h_max), h)

        # new tensors, never in-place updates: _Progress keeps observed states by reference
        x = torch.where(accept[:, None], x_new, x)
        fx = torch.where(accept[:, None], fx_new, fx)
        g = torch.where(accept[:, None], g_new, g)
        res = torch.linalg.vector_norm(g, dim=1)
        # f gave inf/NaN at a stage point: report a non-finite residual, so _Progress stops it as diverged
        observed = torch.where(active & ~finite, torch.full_like(res, math.nan), res)
        progress.count_evaluations(cost - 1)  # observe() counts the step's last evaluation
        done = progress.observe(x, fx, g, abs_res=observed)
    return progress.finish("ode", packer, dtype)

