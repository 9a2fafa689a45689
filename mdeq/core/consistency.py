"""C-DEQ's student (Lin et al. 2026): a learned jump from z0 towards z*, and the time grid it is trained on.

A frozen teacher f (the DEQ cell) produces trajectories z_0, ..., z_K towards its fixed point. Iterate k gets the
Karras time t_k (``karras_times``): z_0 sits at t = eps and the end point z_K ~ z* at t = T. The student is

    F(z, t) = (t / T) * z + ((T - t) / T) * G(S(z), t),        S(z) = f(z), one frozen teacher application,

with F(z, T) = z exactly: at the equilibrium the map is the identity. Only G is trained (``mdeq.core.distillation``:
the losses, the EMA copy and the teacher trajectories); at inference the ``consistency`` solver
(``mdeq.core.solvers.consistency``) replaces the solve by k student applications, each costing one teacher
evaluation.

This module is model-agnostic: states are a tensor (B, ...) or a list of tensors (MDEQ's resolutions), like
everywhere in ``mdeq.core``. The generator G is model-specific; ``MLPGenerator`` covers flat (B, D) states.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Union

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .state import State, state_like, state_tensors

__all__ = ["karras_times", "consistency_schedule", "ConsistencyFunction", "MLPGenerator", "as_student", "Times"]

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


class ConsistencyFunction(nn.Module):
    """F(z, t) = (t/T) z + ((T - t)/T) G(S(z), t) with S one frozen teacher step; F(z, T) = z bitwise.

    Args:
        generator: G, a module ``(state, (B,) times) -> state`` of the same structure (the only trained part).
        T: the last time of the grid (``karras_times``) the student is trained and used on.
        eps: the first time of that grid.
        rho: the grid's Karras exponent.
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
        zs = state_tensors(z)
        tb = _per_sample(t, zs[0].shape[0], zs[0])
        gs = state_tensors(self.generator(s, tb))
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
        return state_like(z, res)

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



def as_student(student) -> ConsistencyFunction:
    """The ``ConsistencyFunction`` behind ``student`` (itself, or the module of its ``make_ema`` average)."""
    if isinstance(student, AveragedModel):  # an EMA student (make_ema) is used through its module
        student = student.module
    if not isinstance(student, ConsistencyFunction):
        raise ValueError(f"student must be a ConsistencyFunction (or its make_ema average), got "
                         f"{type(student).__name__}")
    return student
