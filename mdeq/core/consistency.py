"""Consistency distillation of a DEQ (C-DEQ, Lin et al. 2026): a learned jump from z0 towards z*.

A frozen teacher f (the DEQ cell) produces trajectories z_0, ..., z_K towards its fixed point. Iterate k gets the
Karras time t_k (``karras_times``): z_0 sits at t = eps and the end point z_K ~ z* at t = T. The student is

    F(z, t) = (t / T) * z + ((T - t) / T) * G(S(z), t),        S(z) = f(z), one frozen teacher application,

trained so that every trajectory state jumps to the end point (global loss) and so that F agrees with an EMA
copy of itself one step further along the trajectory (local loss). F(z, T) = z exactly: at the equilibrium the
map is the identity. Only G is trained; at inference ``solver="consistency"`` replaces the solve by k student
applications, each costing one teacher evaluation.

This module is model-agnostic: states are a tensor (B, ...) or a list of tensors (MDEQ's resolutions), like
everywhere in ``mdeq.core``. The generator G is model-specific; ``MLPGenerator`` covers flat (B, D) states.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F_nn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .solvers import _NORM_EPS, Record, SolverStats, _flat, check_options, get_solver, register_solver
from .state import State, StatePacker

__all__ = [
    "karras_times",
    "ConsistencyFunction",
    "MLPGenerator",
    "consistency",
    "consistency_schedule",
    "consistency_losses",
    "distillation_loss",
    "make_ema",
    "collect_trajectory",
    "OPTION_CHECKS",
]

Times = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------- time grid
def karras_times(num_steps: int, eps: float = 0.002, T: float = 5.0, rho: float = 7.0) -> torch.Tensor:
    """The Karras rho-schedule t_k = (eps^(1/rho) + k/K (T^(1/rho) - eps^(1/rho)))^rho, k = 0..K (float64).

    Dense near eps (the start of a trajectory, where states change most), sparse near T. The end points are set
    exactly (t_0 = eps, t_K = T) because F(z, T) = z relies on t == T comparing equal.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (0 < eps < T < math.inf) or not rho > 0:
        raise ValueError(f"karras_times needs 0 < eps < T < inf and rho > 0, got eps={eps}, T={T}, rho={rho}")
    lo, hi = eps ** (1.0 / rho), T ** (1.0 / rho)
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    t = (lo + k / num_steps * (hi - lo)) ** rho
    t[0], t[-1] = eps, T
    return t


def consistency_schedule(num_steps: int, train_steps: int) -> List[int]:
    """Grid indices n_j = floor(j K / k), j = 0..k-1, at which the k-step inference applies the student.

    j = 0 is t_0 = eps: z0 is the start of a trajectory. Later applications treat the current estimate as the
    trajectory state at a later time, spaced evenly in grid index so that every time was seen in training
    (exactly when k divides K; with k > K some times repeat).
    """
    return [(j * train_steps) // num_steps for j in range(num_steps)]


# --------------------------------------------------------------------------------------------- student
def _per_sample(t: Times, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Times as a (B,) tensor in ``like``'s dtype and device."""
    if isinstance(t, torch.Tensor):
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"times must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
        return t.to(dtype=like.dtype, device=like.device)
    return torch.full((batch,), float(t), dtype=like.dtype, device=like.device)


def _tensors(z: State) -> List[torch.Tensor]:
    return [z] if isinstance(z, torch.Tensor) else list(z)


def _like(z: State, tensors: List[torch.Tensor]) -> State:
    return tensors[0] if isinstance(z, torch.Tensor) else tensors


class ConsistencyFunction(nn.Module):
    """F(z, t) = (t/T) z + ((T - t)/T) G(S(z), t) with S one frozen teacher step; F(z, T) = z bitwise.

    Args:
        generator: G, a module ``(state, (B,) times) -> state`` of the same structure (the only trained part).
        T, eps, rho: the time grid (``karras_times``) the student is trained and used on.
        num_train_steps: K, the teacher trajectory length it was distilled on (set by distillation; kept in
            the state dict so a loaded student knows its grid).
    """

    def __init__(self, generator: nn.Module, T: float = 5.0, eps: float = 0.002, rho: float = 7.0,
                 num_train_steps: Optional[int] = None):
        super().__init__()
        karras_times(1, eps, T, rho)  # validates the grid
        self.generator = generator
        self.T, self.eps, self.rho = float(T), float(eps), float(rho)
        self.register_buffer("train_steps", torch.tensor(0, dtype=torch.long))  # 0: not distilled yet
        if num_train_steps is not None:
            self.num_train_steps = num_train_steps

    @property
    def num_train_steps(self) -> Optional[int]:
        k = int(self.train_steps)
        return k if k > 0 else None

    @num_train_steps.setter
    def num_train_steps(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"num_train_steps must be a positive integer, got {k!r}")
        self.train_steps.fill_(int(k))

    def times(self, num_steps: Optional[int] = None) -> torch.Tensor:
        """The student's Karras grid for K = ``num_steps`` (default: ``num_train_steps``)."""
        k = num_steps if num_steps is not None else self.num_train_steps
        if k is None:
            raise ValueError("num_steps not given and the student has no num_train_steps (not distilled yet)")
        return karras_times(k, self.eps, self.T, self.rho)

    def skip_weight(self, t: Times) -> Times:
        """Weight of z: t/T (exactly 1 at t = T)."""
        return t / self.T

    def out_weight(self, t: Times) -> Times:
        """Weight of G: (T - t)/T (exactly 0 at t = T)."""
        return (self.T - t) / self.T

    def combine(self, z: State, t: Times, s: State) -> State:
        """F(z, t) given the teacher output s = S(z) (lets a solver reuse s for its residual).

        Where t == T the result is z itself (``torch.where``), so it is bitwise z even when G returns
        non-finite values there (0 * inf would be NaN) and -0.0 stays -0.0.
        """
        zs = _tensors(z)
        tb = _per_sample(t, zs[0].shape[0], zs[0])
        gs = _tensors(self.generator(s, tb))
        if len(gs) != len(zs):
            raise ValueError(f"the generator returned {len(gs)} tensors for a state of {len(zs)}")
        at_end = tb == self.T
        skip, out = self.skip_weight(tb), self.out_weight(tb)
        res = []
        for zi, gi in zip(zs, gs):
            if gi.shape != zi.shape:
                raise ValueError(f"the generator returned shape {tuple(gi.shape)} for a state of {tuple(zi.shape)}")
            view = (-1,) + (1,) * (zi.dim() - 1)
            mix = skip.view(view) * zi + out.view(view) * gi
            res.append(torch.where(at_end.view(view), zi, mix))
        return _like(z, res)

    def forward(self, z: State, t: Times, teacher_step: Callable[[State], State]) -> State:
        """F(z, t); ``teacher_step`` (S = f) runs without grad since the teacher is frozen.

        A float t == T returns z itself without calling the teacher or G.
        """
        if not isinstance(t, torch.Tensor) and float(t) == self.T:
            return z
        with torch.no_grad():
            s = teacher_step(z)
        return self.combine(z, t, s)


class MLPGenerator(nn.Module):
    """G for flat states: s + Linear(hidden -> D)(ReLU(Linear(D + 1 -> hidden)([s, c(t)]))), c(t) = log(t/T) / 4.

    The last layer starts at zero, so an untrained G is the identity and an untrained student is
    F(z, t) = (t/T) z + ((T - t)/T) f(z): one teacher step (mixed with z). Distillation thus starts from the
    one-step solver's answer instead of a random jump.

    Time enters as log(t/T) / 4 (EDM's noise conditioning), not t/T: with rho = 7 most grid times are tiny
    (t/T < 0.01 for half of a K = 20 grid), so t/T barely tells early steps apart; on the toy problem of the
    tests the log feature cuts the one-step error by about a quarter. A (B, ...) tensor is flattened to (B, D)
    and back; ``hidden`` defaults to 3 D as in the paper's code.
    """

    def __init__(self, dim: int, hidden: Optional[int] = None, T: float = 5.0):
        super().__init__()
        hidden = hidden or 3 * dim
        self.T = float(T)
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def time_feature(self, t: torch.Tensor) -> torch.Tensor:
        """log(t/T) / 4: 0 at T, about -2 at eps = 0.002."""
        return torch.log(t / self.T) / 4

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(s, torch.Tensor):
            raise TypeError("MLPGenerator takes a single-tensor state; list states need a per-tensor generator")
        flat = s.reshape(s.shape[0], -1)
        h = torch.cat([flat, self.time_feature(t.to(flat.dtype)).unsqueeze(1)], dim=1)
        return (flat + self.out(torch.relu(self.inp(h)))).view_as(s)


# --------------------------------------------------------------------------------------------- inference
def _student_of(student) -> ConsistencyFunction:
    if isinstance(student, AveragedModel):  # an EMA student (make_ema) is used through its module
        student = student.module
    if not isinstance(student, ConsistencyFunction):
        raise ValueError(f"student must be a ConsistencyFunction (or its make_ema average), got "
                         f"{type(student).__name__}")
    return student


def _check_student(name: str, v) -> None:
    if v is not None:
        _student_of(v)


def _check_train_steps(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {v!r}")


def _check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


# Validation of the options only this solver has (``check_options`` rejects names it has no rule for), in the
# ``_OPTION_CHECKS`` style of ``solvers``: name -> check(name, value) raising ValueError. ``student`` is a
# runtime object: a config value (a path, a name) is rejected.
OPTION_CHECKS = {"student": _check_student, "num_train_steps": _check_train_steps,
                 "measure_residual": _check_flag}


@register_solver("consistency", option_checks=OPTION_CHECKS)
@torch.no_grad()
def consistency(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 1,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    student: Optional[ConsistencyFunction] = None,
    num_train_steps: Optional[int] = None,
    measure_residual: bool = True,
    trace: bool = False,
    divergence_factor: float = 1e6,
    record: Record = None,
):
    """k = ``max_iter`` applications of a distilled student instead of a solve.

    Schedule: with K = ``num_train_steps`` (default ``student.num_train_steps``) and grid t = karras_times(K),
    application j = 0..k-1 is z_{j+1} = F(z_j, t_{n_j}) with n_j = floor(j K / k): the first treats z0 as the
    start of a trajectory (t_0 = eps), the later ones treat the current estimate as the trajectory state at an
    evenly spaced later grid time. Each application costs exactly one f-evaluation (the teacher step inside F),
    whose residual ||f(z_j) - z_j|| is kept for ``trace``.

    With ``measure_residual`` one more f-evaluation at z_k fills ``abs_residual``/``rel_residual`` and
    ``converged`` (residual <= tol); it counts in ``stats.nfe`` (k + 1) but ``stats.nstep`` is k for every
    sample. Without it, nfe = k, residuals are NaN and nothing is marked converged. ``diverged``: the result is
    not finite, or its abs residual exceeds ``divergence_factor`` times that of z0. There is no early exit and
    no best-iterate selection: the result is always z_k (a fixed amount of work, no data-dependent control flow).

    ``student`` is a runtime object (a ``ConsistencyFunction`` or its ``make_ema`` average), not a config
    value. ``record`` ("all" or iterate indices, 0 = z0) keeps z_0..z_k in ``stats.trajectory``.
    """
    if student is None:
        raise ValueError("solver='consistency' needs a distilled student (see tools/distill.py)")
    check_options(max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=trace,
                  divergence_factor=divergence_factor, record=record)
    for name, value in dict(student=student, num_train_steps=num_train_steps,
                            measure_residual=measure_residual).items():
        OPTION_CHECKS[name](name, value)
    student = _student_of(student)
    K = num_train_steps if num_train_steps is not None else student.num_train_steps
    if K is None:
        raise ValueError("solver='consistency' needs num_train_steps: pass it or set student.num_train_steps "
                         "(distillation does)")
    times = student.times(K).tolist()

    _, x, packer, dtype = _flat(f, z0)  # x: packed z0 in the working dtype
    work = x.dtype

    def unpack(v: torch.Tensor) -> State:
        return packer.unpack(v.to(dtype))

    rec_all = record == "all"
    rec_at = set() if record is None or rec_all else {int(i) for i in record}
    recorded, recorded_steps = [], []

    def keep(j: int, v: torch.Tensor) -> None:
        if rec_all or j in rec_at:
            recorded.append(v)
            recorded_steps.append(j)

    def residuals(v: torch.Tensor, fv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = torch.linalg.vector_norm(fv - v, dim=1)
        return a, a / (torch.linalg.vector_norm(fv, dim=1) + _NORM_EPS)

    trace_rows, first_abs = [], None
    nfe = 0
    for j, n in enumerate(consistency_schedule(max_iter, K)):
        keep(j, x)
        z = unpack(x)
        s = f(z)
        nfe += 1
        if trace or first_abs is None:
            a, r = residuals(x, packer.pack(s).to(work))
            first_abs = a if first_abs is None else first_abs
            if trace:
                trace_rows.append(r if stop_mode == "rel" else a)
        x = packer.pack(student.combine(z, times[n], s)).to(work)
    keep(max_iter, x)

    b = x.shape[0]
    finite = torch.isfinite(x).all(dim=1)
    if measure_residual:
        abs_res, rel_res = residuals(x, packer.pack(f(unpack(x))).to(work))
        nfe += 1
        if trace:
            trace_rows.append(rel_res if stop_mode == "rel" else abs_res)
        res = rel_res if stop_mode == "rel" else abs_res
        converged = res <= tol
        diverged = ~finite | ~torch.isfinite(res) | ~(abs_res <= divergence_factor * first_abs)
        converged &= ~diverged
    else:
        abs_res = rel_res = torch.full((b,), math.nan, dtype=work, device=x.device)
        converged = torch.zeros(b, dtype=torch.bool, device=x.device)
        diverged = ~finite
    stats = SolverStats(
        solver="consistency",
        nstep=torch.full((b,), max_iter, dtype=torch.long, device=x.device),
        abs_residual=abs_res.to(work),
        rel_residual=rel_res.to(work),
        converged=converged,
        diverged=diverged,
        nfe=nfe,
        trace=torch.stack(trace_rows, dim=1) if trace else None,
    )
    if recorded_steps:
        stats.trajectory = [unpack(v) for v in recorded]
        stats.trajectory_steps = recorded_steps
    return unpack(x), stats


# --------------------------------------------------------------------------------------------- distillation
def _gather(trajectory: Sequence[State], idx: torch.Tensor) -> State:
    """Per sample i the state trajectory[idx[i]][i], in the trajectory's structure (no copy of the whole run)."""
    samples = [_tensors(trajectory[n]) for n in idx.tolist()]  # sample i's time step, all of its tensors
    return _like(trajectory[0], [torch.stack([ts[p][i] for i, ts in enumerate(samples)])
                                 for p in range(len(samples[0]))])


def _indices(indices, batch: int, K: int) -> torch.Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() == 0:
        idx = idx.expand(batch)
    if idx.shape != (batch,):
        raise ValueError(f"indices must be an int or have shape ({batch},), got {tuple(idx.shape)}")
    if bool(((idx < 0) | (idx > K - 1)).any()):
        raise ValueError(f"indices must lie in [0, {K - 1}] (pairs n, n+1 of a trajectory of K = {K} steps)")
    return idx


def consistency_losses(
    student: ConsistencyFunction,
    ema_student: nn.Module,
    trajectory: Sequence[State],
    times: torch.Tensor,
    indices,
    teacher_step: Callable[[State], State],
    target: State,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(global, local) consistency losses on one batch of teacher trajectories.

    Per sample i with grid index n = indices[i] in [0, K-1]:
        global = SmoothL1(F(z_n, t_n), target)                       every state jumps to the end point;
        local  = MSE(F(z_n, t_n), stopgrad F_ema(z_{n+1}, t_{n+1}))  self-consistency along the trajectory.
    ``trajectory`` is z_0..z_K (detached states, e.g. from ``collect_trajectory``), ``times`` = karras_times(K),
    ``target`` z_K or the solver's z*. Both losses are means over all elements of the packed (B, D) state, so a
    list state is weighted per element (as the solvers' norms do), not per tensor.
    """
    K = len(trajectory) - 1
    if times.shape != (K + 1,):
        raise ValueError(f"times must have shape ({K + 1},) for a trajectory of {K + 1} states, got "
                         f"{tuple(times.shape)}")
    packer = StatePacker(trajectory[0])
    idx = _indices(indices, packer.batch_size, K)
    z_n, z_next = _gather(trajectory, idx), _gather(trajectory, idx + 1)
    t = times.to(idx.device)
    pred = packer.pack(student(z_n, t[idx], teacher_step))
    with torch.no_grad():
        ema_pred = packer.pack(ema_student(z_next, t[idx + 1], teacher_step)).detach()
    global_loss = F_nn.smooth_l1_loss(pred, packer.pack(target).detach().to(pred.dtype))
    local_loss = F_nn.mse_loss(pred, ema_pred.to(pred.dtype))
    return global_loss, local_loss


def distillation_loss(global_loss: torch.Tensor, local_loss: torch.Tensor, global_weight: float = 0.9,
                      local_weight: float = 0.1) -> torch.Tensor:
    """The C-DEQ objective: 0.9 global + 0.1 local (the paper code's weights)."""
    return global_weight * global_loss + local_weight * local_loss


def make_ema(student: nn.Module, decay: float = 0.98) -> AveragedModel:
    """A frozen EMA copy of ``student`` (torch's ``AveragedModel``): ema = decay ema + (1 - decay) student.

    Call ``ema.update_parameters(student)`` after each optimiser step; it is called like the student
    (``ema(z, t, teacher_step)``) and can be passed to ``solver="consistency"``. Buffers (``num_train_steps``)
    are copied from the student at each update.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def collect_trajectory(f: Callable[[State], State], z0: State, solver: str = "fixed_point", num_steps: int = 20,
                       **solver_kwargs) -> Tuple[List[State], State]:
    """The teacher trajectory z_0..z_K (K = ``num_steps``) of a registered solver from z0, without grad.

    Runs the solver with tol=0 and ``record="all"`` for K + 1 evaluations (iterate K is recorded when f is
    evaluated at it), so every sample gets all K steps. If the whole batch reaches an exact fixed point early, the
    last iterate is repeated (it is the fixed point); if the batch stops because samples diverged, raises.
    Returns (list of K + 1 states in z0's structure, z_K).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    for key in ("max_iter", "tol", "record"):
        if key in solver_kwargs:
            raise ValueError(f"collect_trajectory sets {key!r} itself")
    _, stats = get_solver(solver)(f, z0, max_iter=num_steps + 1, tol=0.0, record="all", **solver_kwargs)
    traj = list(stats.trajectory)
    if len(traj) < num_steps + 1:
        if bool(stats.diverged.any()):
            raise ValueError(f"the teacher diverged after {len(traj)} iterates for samples "
                             f"{stats.diverged.nonzero().flatten().tolist()}")
        traj += [traj[-1]] * (num_steps + 1 - len(traj))
    return traj, traj[-1]
