"""What every solver shares: the flat working state, per-sample residuals and stopping, the best iterate, the
recorded trajectory, and ``SolverStats``.

* The state (a tensor (B, ...) or a list of them) is packed into a (B, D) matrix in the working dtype
  (``flatten``): float32 for float16/bfloat16 states, else the state's dtype; f still sees the state in z0's
  dtype and results go back to it.
* ``Progress`` observes each evaluation f(x) with its residual g = f(x) - x and keeps, per sample, the
  residuals (abs = ||g||, rel = abs / (||f(x)|| + 1e-8)), whether the sample converged (residual <= tol in
  ``stop_mode``) or diverged (non-finite, or abs residual past ``divergence_factor`` x its first one), the
  lowest-residual iterate seen before it stopped (a diverged sample: the lowest *absolute* residual), f of that
  iterate when asked (``return_f``), the requested iterates (``record``) and the residual trace.

The per-sample logic runs on the host over plain Python floats: one device-to-host copy of two (B,) vectors per
iteration replaces some twenty tiny tensor ops, which matters when f is cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..state import State, StatePacker

__all__ = ["SolverStats", "Progress", "BestIterate", "flatten", "residual_norms", "Record", "STOP_MODES",
           "NORM_EPS"]

STOP_MODES = ("abs", "rel")
Record = Union[None, str, Sequence[int]]
NORM_EPS = 1e-8  # in rel = ||f(z) - z|| / (||f(z)|| + NORM_EPS)


@dataclass
class SolverStats:
    """What a solve did, per sample (tensors of shape (B,)).

    Attributes:
        solver: name of the solver.
        nstep: number of f-evaluations made until the returned iterate's residual was known
            (for a converged sample: the evaluation at which it converged).
        abs_residual: ||f(z) - z|| of the returned iterate.
        rel_residual: ||f(z) - z|| / ||f(z)|| of the returned iterate.
        converged: the returned iterate meets ``tol``.
        diverged: the sample stopped because its residual became non-finite or exploded.
        nfe: f-evaluations made for the whole batch.
        trace: (B, nfe) residuals in ``stop_mode`` at every evaluation, when asked for (else None).
        trajectory: the recorded iterates (``record=``), earliest first, else None.
        trajectory_steps: their iterate indices (0 = z0).
        backward: stats of the backward (implicit-gradient) solve, filled in by ``DEQ`` when it runs.
        jac_loss: the Jacobian-regularisation estimate, set by ``DEQ`` when asked for.
        init_loss: the weighted initial-guess regulariser of Skip / Skip Reg. DEQ, set by ``DEQ`` in training.
        corrections: differentiable trajectory states for the fixed-point correction loss, set by ``DEQ``.
        aux_outputs: a model's outputs at those states (earliest first), set by the model for its loss.
    """

    solver: str
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    nfe: int
    trace: Optional[torch.Tensor] = None
    trajectory: Optional[List[Any]] = field(default=None, repr=False)
    trajectory_steps: Optional[List[int]] = None
    backward: Optional["SolverStats"] = field(default=None, repr=False)
    jac_loss: Optional[torch.Tensor] = field(default=None, repr=False)
    init_loss: Optional[torch.Tensor] = field(default=None, repr=False)
    corrections: Optional[List[Any]] = field(default=None, repr=False)
    aux_outputs: Optional[List[Any]] = field(default=None, repr=False)

    def summary(self) -> Dict[str, float]:
        """Batch means as plain floats, for logging."""
        out = {
            "nstep": self.nstep.float().mean().item(),
            "abs_residual": _finite_mean(self.abs_residual),
            "rel_residual": _finite_mean(self.rel_residual),
            "converged": self.converged.float().mean().item(),
            "diverged": self.diverged.float().mean().item(),
            "nfe": float(self.nfe),
        }
        if self.backward is not None:
            out.update({f"bwd_{k}": v for k, v in self.backward.summary().items()})
        if self.jac_loss is not None:
            out["jac_loss"] = float(self.jac_loss.detach())
        return out


def _finite_mean(t: torch.Tensor) -> float:
    t = t.float()
    finite = torch.isfinite(t)
    return t[finite].mean().item() if bool(finite.any()) else math.inf


def residual_norms(x: torch.Tensor, fx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (abs, rel) residuals of the evaluation f(x) = fx, for (B, D) matrices."""
    a = torch.linalg.vector_norm(fx - x, dim=1)
    return a, a / (torch.linalg.vector_norm(fx, dim=1) + NORM_EPS)


def flatten(f: Callable[[State], State], z0: State):
    """Flatten (f, z0) to a function on (B, D) matrices in the working dtype.

    Returns (f_flat, x0, packer, dtype): the working dtype is float32 for float16/bfloat16 states, f still sees
    the state in ``dtype`` (z0's), and results go back to ``dtype``.
    """
    packer = StatePacker(z0)
    x0 = packer.pack(z0)
    dtype = x0.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x0 = x0.to(work)

    def f_flat(x: torch.Tensor) -> torch.Tensor:
        return packer.pack(f(packer.unpack(x.to(dtype)))).to(work)

    return f_flat, x0, packer, dtype


class BestIterate:
    """A per-sample best iterate, kept by reference while every sample improves at once (no copy)."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0
        self.ref = x0  # aliases the caller's z0 until the first partial update
        self.owned = False

    def update(self, x: torch.Tensor, improved: List[bool]) -> None:
        if all(improved):
            self.ref, self.owned = x, False
        elif any(improved):
            if not self.owned:
                self.ref, self.owned = self.ref.clone(), True
            mask = torch.tensor(improved, device=x.device)[:, None]
            torch.where(mask, x, self.ref, out=self.ref)

    def result(self) -> torch.Tensor:
        return self.ref.clone() if self.ref is self.x0 else self.ref


class Progress:
    """Per-sample bookkeeping of one solve (see the module docstring).

    Contract: a solver never modifies an observed ``x`` (or ``fx``) in place afterwards, so the best iterate
    and the recorded ones are kept by reference; the loop's overhead stays at a few passes over the state.
    """

    def __init__(self, x0: torch.Tensor, tol: float, stop_mode: str, trace: bool, divergence_factor: float,
                 record: Record = None, return_f: bool = False):
        b = x0.shape[0]
        self.return_f = return_f  # keep f(x) of the best iterates too, to return f(z*) without another evaluation
        self.best_f: Optional[BestIterate] = None
        self.fallback_f: Optional[BestIterate] = None
        self.record_all = record == "all"
        self.record_at = set() if record is None or self.record_all else {int(i) for i in record}
        self.recorded: List[torch.Tensor] = []
        self.recorded_steps: List[int] = []
        self.iterate = 0  # index of the next observed iterate (0 = z0)
        self.x0 = x0
        self.tol = tol
        self.use_rel = stop_mode == "rel"
        self.divergence_factor = divergence_factor
        self.trace: Optional[List[List[float]]] = [] if trace else None
        self.nfe = 0
        self.converged = [False] * b
        self.diverged = [False] * b
        self.first_abs: Optional[List[float]] = None
        # best by the stop-mode residual: [abs, rel, nstep] per sample
        self.best = BestIterate(x0)
        self.best_vals = [[math.inf, math.inf, 0] for _ in range(b)]
        # in rel mode, also the best by abs residual: what a diverged sample returns
        self.fallback = BestIterate(x0) if self.use_rel else None
        self.fallback_vals = [[math.inf, math.inf, 0] for _ in range(b)]

    # ------------------------------------------------------------------ what solvers call
    def observe(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, abs_res: Optional[torch.Tensor] = None
                ) -> bool:
        """Record the evaluation f(x) = fx with residual g = fx - x; return True when every sample stopped.

        ``abs_res`` (the per-sample ||g||) may be passed when the solver has it already.
        """
        self.nfe += 1
        if self.record_all or self.iterate in self.record_at:
            self.recorded.append(x)  # never modified in place afterwards (see the contract above)
            self.recorded_steps.append(self.iterate)
        self.iterate += 1
        if abs_res is None:
            abs_res = torch.linalg.vector_norm(g, dim=1)
        norms = torch.stack((abs_res.to(fx.dtype), torch.linalg.vector_norm(fx, dim=1))).tolist()  # host sync
        if self.first_abs is None:
            self.first_abs = norms[0]
        trace_row = [] if self.trace is not None else None
        improved, improved_abs = [], []
        for i, (a, fn) in enumerate(zip(*norms)):
            r = a / (fn + NORM_EPS)
            res = r if self.use_rel else a
            if trace_row is not None:
                trace_row.append(res)
            if self.converged[i] or self.diverged[i]:
                improved.append(False)
                improved_abs.append(False)
                continue
            better = res < self.best_vals[i][1 if self.use_rel else 0]  # NaN never wins
            if better:
                self.best_vals[i] = [a, r, self.nfe]
            improved.append(better)
            better_abs = a < self.fallback_vals[i][0]
            if better_abs:
                self.fallback_vals[i] = [a, r, self.nfe]
            improved_abs.append(better_abs)
            if not math.isfinite(res) or not a <= self.divergence_factor * self.first_abs[i]:
                self.diverged[i] = True
            elif res <= self.tol:
                self.converged[i] = True
        if trace_row is not None:
            self.trace.append(trace_row)
        self.best.update(x, improved)
        if self.fallback is not None:
            self.fallback.update(x, improved_abs)
        if self.return_f:
            if self.best_f is None:  # the first evaluation: every sample improved on nothing
                self.best_f = BestIterate(fx)
                self.fallback_f = BestIterate(fx) if self.fallback is not None else None
            self.best_f.update(fx, improved)
            if self.fallback_f is not None:
                self.fallback_f.update(fx, improved_abs)
        return all(c or d for c, d in zip(self.converged, self.diverged))

    def count_evaluations(self, n: int) -> None:
        """Count ``n`` evaluations of f that are not observed as iterates (e.g. inner Runge-Kutta stages)."""
        self.nfe += n

    def trace_evaluation(self, fx: torch.Tensor, g: torch.Tensor) -> None:
        """Add the residual g = fx - x of an evaluation that is not an iterate to the trace (when tracing)."""
        if self.trace is not None:
            a = torch.linalg.vector_norm(g, dim=1)
            if self.use_rel:
                a = a / (torch.linalg.vector_norm(fx, dim=1) + NORM_EPS)
            self.trace.append(a.tolist())

    def stopped(self) -> List[bool]:
        """Per sample: converged or diverged (frozen from now on)."""
        return [c or d for c, d in zip(self.converged, self.diverged)]

    def finish(self, solver: str, packer: StatePacker, dtype: torch.dtype):
        """(result in z0's structure and dtype, SolverStats with the recorded trajectory unpacked likewise)."""
        stats = self.stats(solver)
        if self.record_all or self.record_at:
            stats.trajectory = [packer.unpack(x.to(dtype)) for x in self.recorded]
            stats.trajectory_steps = list(self.recorded_steps)
        return packer.unpack(self.result().to(dtype)), stats

    # ------------------------------------------------------------------ results
    def _use_fallback(self) -> List[bool]:
        return [d and self.fallback is not None for d in self.diverged]

    def result(self) -> torch.Tensor:
        """The per-sample result (never an alias of the caller's z0); f of it with ``return_f``."""
        best, fallback = (self.best_f, self.fallback_f) if self.return_f else (self.best, self.fallback)
        z = best.result()
        use = self._use_fallback()
        if any(use):
            mask = torch.tensor(use, device=z.device)[:, None]
            z = torch.where(mask, fallback.ref, z)
        return z

    def stats(self, solver: str) -> SolverStats:
        dev, dtype = self.x0.device, self.x0.dtype
        vals = [fb if use else b for b, fb, use in zip(self.best_vals, self.fallback_vals, self._use_fallback())]
        trace = torch.tensor(self.trace, dtype=dtype, device=dev).T.contiguous() if self.trace else None
        return SolverStats(
            solver=solver,
            nstep=torch.tensor([v[2] for v in vals], dtype=torch.long, device=dev),
            abs_residual=torch.tensor([v[0] for v in vals], dtype=dtype, device=dev),
            rel_residual=torch.tensor([v[1] for v in vals], dtype=dtype, device=dev),
            converged=torch.tensor(self.converged, dtype=torch.bool, device=dev),
            diverged=torch.tensor(self.diverged, dtype=torch.bool, device=dev),
            nfe=self.nfe,
            trace=trace,
        )
