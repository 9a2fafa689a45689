"""The C-DEQ inference solver ``"consistency"``: k applications of a distilled student instead of a solve.

The student (``mdeq.core.consistency.ConsistencyFunction``) is an object handed over at call time (``needs``),
not a setting; its training lives in ``mdeq.core.distillation``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..consistency import ConsistencyFunction, as_student, consistency_schedule
from ..options import Option, flag, optional, positive_int
from ..state import State
from .bookkeeping import Record, SolverStats, flatten, residual_norms
from .registry import register_solver

__all__ = ["consistency", "OPTIONS"]

OPTIONS = {
    "num_train_steps": Option(None, optional(positive_int), "the student's trajectory length K (None: the "
                                                            "student's own num_train_steps)"),
    "measure_residual": Option(True, flag, "one more f-evaluation at the result to measure its residual"),
}


@register_solver("consistency", options=OPTIONS, defaults={"max_iter": 1}, needs=("student",),
                 fixed_budget={"measure_residual": False})
@torch.no_grad()
def consistency(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float, stop_mode: str,
                student: Optional[ConsistencyFunction], num_train_steps: Optional[int], measure_residual: bool,
                trace: bool, divergence_factor: float, record: Record):
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
    student = as_student(student)
    K = num_train_steps if num_train_steps is not None else student.num_train_steps
    if K is None:
        raise ValueError("solver='consistency' needs num_train_steps: pass it or set student.num_train_steps "
                         "(distillation does)")
    times = student.times(K).tolist()

    _, x, packer, dtype = flatten(f, z0)  # x: packed z0 in the working dtype
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

    trace_rows, first_abs = [], None
    nfe = 0
    for j, n in enumerate(consistency_schedule(max_iter, K)):
        keep(j, x)
        z = unpack(x)
        s = f(z)
        nfe += 1
        if trace or first_abs is None:
            a, r = residual_norms(x, packer.pack(s).to(work))
            first_abs = a if first_abs is None else first_abs
            if trace:
                trace_rows.append(r if stop_mode == "rel" else a)
        x = packer.pack(student.combine(z, times[n], s)).to(work)
    keep(max_iter, x)

    b = x.shape[0]
    finite = torch.isfinite(x).all(dim=1)
    if measure_residual:
        abs_res, rel_res = residual_norms(x, packer.pack(f(unpack(x))).to(work))
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


