"""Fixed-point solvers for z = f(z): fixed-point iteration, Anderson acceleration, limited-memory Broyden.

Every solver is a function ``solver(f, z0, *, max_iter, tol, stop_mode, trace, **options) -> (z, stats)``:

* ``z0`` is a tensor of shape (B, ...) or a list of such tensors; ``f`` maps a state of that structure to
  one of the same structure. Internally the state is a (B, D) matrix.
* The residual of an iterate z_k is measured per sample when f(z_k) is evaluated:
  ``abs = ||f(z_k) - z_k||_2`` and ``rel = abs / (||f(z_k)||_2 + 1e-8)``; ``stop_mode`` picks which one is
  compared with ``tol``.
* **Stopping is per sample.** A sample stops when its residual is ``<= tol`` (converged), when its residual is
  not finite, or when its abs residual grew past ``divergence_factor`` times its first one (diverged). A stopped
  sample is frozen: its result is never updated again, so it does not depend on the other samples in the batch.
  The loop ends when every sample has stopped or after ``max_iter`` evaluations of f.
* The returned state is, per sample, the iterate with the lowest residual seen before it stopped (z0 included),
  so it is always finite when z0 is. A *diverged* sample returns its iterate with the lowest absolute residual
  instead: while an iteration blows up its relative residual can keep shrinking, which would otherwise select
  the largest iterate. ``SolverStats`` says how the result was reached.
* The solver state is float32 when z0 is float16/bfloat16 (float64 stays float64); f is called in z0's dtype
  and the result is returned in it.

* ``return_f=True`` returns f(z*) instead of z*, with no extra evaluation (f of the best iterate was computed
  to measure its residual); the stats still describe z*. A budget of k evaluations then ends in f's output.
* ``record`` (every solver): ``"all"`` or a list of iterate indices (0 = z0) keeps those iterates, detached,
  in ``stats.trajectory`` (states in z0's structure and dtype) with their indices in ``stats.trajectory_steps``:
  the data of fixed-point correction and consistency distillation. Iterates are the batch's: a sample that
  stopped keeps its result, but the batch's later iterates are still recorded for it.

Solvers run under ``torch.no_grad()``: gradients through a fixed point are ``DEQ``'s job.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .state import State, StatePacker

__all__ = [
    "SolverStats",
    "fixed_point",
    "anderson",
    "broyden",
    "register_solver",
    "get_solver",
    "list_solvers",
    "solver_options",
    "check_options",
]

STOP_MODES = ("abs", "rel")
Record = Union[None, str, Sequence[int]]
_NORM_EPS = 1e-8


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


class _Best:
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


class _Progress:
    """Per-sample bookkeeping shared by the solvers: residuals, best iterate, stopping, trace.

    The per-sample logic runs on the host over plain Python floats: one device-to-host copy of two (B,)
    vectors per iteration replaces some twenty tiny tensor ops, which matters when f is cheap.
    """

    def __init__(self, x0: torch.Tensor, tol: float, stop_mode: str, trace: bool, divergence_factor: float,
                 record: Record = None, return_f: bool = False):
        b = x0.shape[0]
        self.return_f = return_f  # keep f(x) of the best iterates too, to return f(z*) without another evaluation
        self.best_f: Optional[_Best] = None
        self.fallback_f: Optional[_Best] = None
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
        self.best = _Best(x0)
        self.best_vals = [[math.inf, math.inf, 0] for _ in range(b)]
        # in rel mode, also the best by abs residual: what a diverged sample returns
        self.fallback = _Best(x0) if self.use_rel else None
        self.fallback_vals = [[math.inf, math.inf, 0] for _ in range(b)]

    def observe(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, abs_res: Optional[torch.Tensor] = None
                ) -> bool:
        """Record the evaluation f(x) = fx with residual g = fx - x; return True when every sample stopped.

        ``abs_res`` (the per-sample ||g||) may be passed when the solver has it already.

        Contract: the caller never modifies ``x`` in place afterwards, so the best iterate can be kept by
        reference; the loop's overhead stays at a few passes over the state.
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
            r = a / (fn + _NORM_EPS)
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
                self.best_f = _Best(fx)
                self.fallback_f = _Best(fx) if self.fallback is not None else None
            self.best_f.update(fx, improved)
            if self.fallback_f is not None:
                self.fallback_f.update(fx, improved_abs)
        return all(c or d for c, d in zip(self.converged, self.diverged))

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

    def finish(self, solver: str, packer: StatePacker, dtype: torch.dtype):
        """(result in z0's structure and dtype, SolverStats with the recorded trajectory unpacked likewise)."""
        stats = self.stats(solver)
        if self.record_all or self.record_at:
            stats.trajectory = [packer.unpack(x.to(dtype)) for x in self.recorded]
            stats.trajectory_steps = list(self.recorded_steps)
        return packer.unpack(self.result().to(dtype)), stats

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


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _nonnegative(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _unit_interval(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")


def _above_one(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 1:
        raise ValueError(f"{name} must be a number > 1, got {v!r}")


def _stop_mode(name: str, v) -> None:
    if v not in STOP_MODES:
        raise ValueError(f"{name} must be one of {STOP_MODES}, got {v!r}")


def _flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


_OPTION_CHECKS = {
    "max_iter": _positive_int,
    "tol": _nonnegative,
    "stop_mode": _stop_mode,
    "trace": _flag,
    "divergence_factor": _above_one,
    "damping": _unit_interval,
    "m": _positive_int,
    "lam": _nonnegative,
    "memory": _positive_int,
}


def _record(name: str, v) -> None:
    if v is None or v == "all":
        return
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in v):
        raise ValueError(f"{name} must be None, 'all' or a list of iterate indices >= 0 (0 = z0), got {v!r}")


_OPTION_CHECKS["record"] = _record
_OPTION_CHECKS["return_f"] = _flag


def check_options(**options) -> None:
    """Validate solver option values by name (raises ValueError saying what is expected)."""
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is None:
            raise ValueError(f"no validation rule for solver option {name!r}; add one to _OPTION_CHECKS")
        check(name, value)


def _flat(f: Callable[[State], State], z0: State):
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


_REGISTRY: Dict[str, Callable] = {}


def register_solver(name: str, option_checks: Optional[Dict[str, Callable]] = None):
    """Decorator adding a solver to the registry used by ``get_solver`` and ``DEQ(solver=name)``.

    ``option_checks`` ({option name: check(name, value) raising ValueError}) validates the options only this
    solver has, so configs that set them (``DEQ(solver_options=...)``) are checked like the common ones.
    """

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered")
        for opt, check in (option_checks or {}).items():
            if _OPTION_CHECKS.get(opt, check) is not check:
                raise ValueError(f"solver {name!r}: option {opt!r} already has another validation rule")
            _OPTION_CHECKS[opt] = check
        _REGISTRY[name] = fn
        return fn

    return deco


def get_solver(name: str) -> Callable:
    """The solver registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(_REGISTRY)}") from None


def list_solvers() -> List[str]:
    return sorted(_REGISTRY)


def solver_options(name: str) -> Dict[str, object]:
    """Keyword options a solver takes, with their defaults (used to validate configs)."""
    sig = inspect.signature(get_solver(name))
    return {
        p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


@register_solver("fixed_point")
@torch.no_grad()
def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    damping: float = 1.0,
    trace: bool = False,
    divergence_factor: float = 1e6,
    record: Record = None,
    return_f: bool = False,
):
    """Damped fixed-point (Picard) iteration z <- damping * f(z) + (1 - damping) * z.

    Stops per sample as described in the module docstring. Returns (z, SolverStats) with z the per-sample
    lowest-residual iterate, in the structure of ``z0``.
    """
    check_options(max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=trace,
                  divergence_factor=divergence_factor, damping=damping, record=record, return_f=return_f)
    f_flat, x, packer, dtype = _flat(f, z0)
    progress = _Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
    for _ in range(max_iter):
        fx = f_flat(x)
        g = fx - x
        if progress.observe(x, fx, g):
            break
        x = fx if damping == 1 else torch.add(x, g, alpha=damping)
    return progress.finish("fixed_point", packer, dtype)


@register_solver("anderson")
@torch.no_grad()
def anderson(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 7,
    lam: float = 1e-4,
    damping: float = 1.0,
    trace: bool = False,
    divergence_factor: float = 1e6,
    record: Record = None,
    return_f: bool = False,
):
    """Anderson acceleration (type II) with history ``m``, per sample.

    With G_i = f(x_i) - x_i for the last n <= m iterates, the mixing weights solve
    min ||sum_i alpha_i G_i||^2 subject to sum_i alpha_i = 1, i.e. (G G^T + lam * s I) a = 1, alpha = a / sum(a).
    The regularisation is *relative*: s = trace(G G^T) / n, so ``lam`` means the same at every residual scale.
    The next iterate is sum_i alpha_i (damping * f(x_i) + (1 - damping) * x_i). When the small system is
    singular or gives non-finite weights for a sample, that sample takes a damped fixed-point step instead.

    The Gram matrix is updated incrementally (one new row per step) and the n x n systems are solved in float64.
    Stops per sample as described in the module docstring; returns (z, SolverStats).
    """
    check_options(max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=trace,
                  divergence_factor=divergence_factor, m=m, lam=lam, damping=damping, record=record, return_f=return_f)
    f_flat, x, packer, dtype = _flat(f, z0)
    b, d = x.shape
    progress = _Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
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


@register_solver("broyden")
@torch.no_grad()
def broyden(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    memory: int = 20,
    trace: bool = False,
    divergence_factor: float = 1e6,
    record: Record = None,
    return_f: bool = False,
):
    """Limited-memory "good" Broyden on g(z) = f(z) - z, per sample.

    The inverse Jacobian of g is approximated by H = -I + sum_i u_i v_i^T over at most ``memory`` rank-one
    updates, and each step is z <- z - H g(z) (the first step is the plain fixed-point step). When the memory is
    full, H restarts from -I (a restarted Broyden: overwriting the oldest update instead breaks the secant
    conditions and diverges on hard problems).
    An update whose denominator vanishes or is not finite is skipped for that sample. No line search.
    Stops per sample as described in the module docstring; returns (z, SolverStats).
    """
    check_options(max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=trace,
                  divergence_factor=divergence_factor, memory=memory, record=record, return_f=return_f)
    f_flat, x, packer, dtype = _flat(f, z0)
    b, d = x.shape
    progress = _Progress(x, tol, stop_mode, trace, divergence_factor, record, return_f)
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
