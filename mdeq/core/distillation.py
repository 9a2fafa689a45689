"""Training a C-DEQ student (consistency distillation, Lin et al. 2026): teacher trajectories, the global and
local consistency losses, and the EMA copy of the student.

A frozen teacher f produces trajectories z_0..z_K from z0 (``collect_trajectory``); the student F (see
``mdeq.core.consistency``) is trained so that every trajectory state jumps to the end point (global loss) and
agrees with an EMA copy of itself one step further along the trajectory (local loss). Model-agnostic: states are
a tensor (B, ...) or a list of tensors, like everywhere in ``mdeq.core``.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F_nn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .consistency import ConsistencyFunction
from .solvers import get_solver
from .state import State, StatePacker, state_like, state_tensors

__all__ = ["collect_trajectory", "consistency_losses", "distillation_loss", "make_ema"]


def _gather(trajectory: Sequence[State], idx: torch.Tensor) -> State:
    """Per sample i the state trajectory[idx[i]][i], in the trajectory's structure (no copy of the whole run)."""
    samples = [state_tensors(trajectory[n]) for n in idx.tolist()]  # sample i's time step, all of its tensors
    return state_like(trajectory[0], [torch.stack([ts[p][i] for i, ts in enumerate(samples)])
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
