"""``fixed_budget(model, k)``: an MDEQ at a budget of k f-evaluations as a plain module with a static graph.

An implicit model does not deploy: its solver decides on the host how long to iterate. At a fixed budget it is an
explicit network (stem, k cell evaluations, head), and that network is what this module builds, for the budget
that ``mdeq.core.budget_options(model.deq.options, k)`` defines: the reference is
``model.configure_deq(**budget_options(model.deq.options, k))`` and ``model.eval()(x)`` under ``no_grad``.

What the DEQ core does on the host, the exported graph does with tensor ops:

* the per-sample best iterate of ``fixed_point`` and ``anderson`` (lowest residual before the sample stopped,
  f of it with ``return_f``; a diverged sample's lowest *absolute* residual in ``rel`` mode), its stopping
  (converged, diverged) as masks and ``torch.where``; the residual comparisons run in float64 like the host's
  Python floats. A solve that ends early because every sample stopped returns what the masks freeze, so the
  graph always makes all k evaluations and returns the same result;
* Anderson's small mixing system by Gauss-Jordan elimination with partial pivoting (ONNX has no linear solver;
  ``torch.linalg.solve_ex`` does not export to it), in float64 like the solver;
* the Skip DEQ start (the model's predictor), the Skip Reg. start z0 = f(z0), the C-DEQ student's k
  applications on its time grid, and ``unroll``.

``broyden`` and ``ode`` are refused. The module is a deep copy in eval mode with the weight norm folded into
plain weights; the model's own forward runs around the static solve, so heads (classification, segmentation)
are the model's.

``fixed_budget(model, k, stream=True)`` is the streaming form (``mdeq.stream`` at the same budget): the previous
equilibrium goes in and the new one comes out, packed as one (B, D) tensor, with a (B,) bool ``fresh`` flag per
stream (True: start as the model does, zeros or the Skip DEQ prediction: the first frame, a cut, the frame after a
non-finite one):

    net = fixed_budget(model, 2, stream=True)
    state, fresh = net.start(frames)                 # zeros, all fresh
    for frames in video:
        out, state, fresh = net(frames, state, fresh)  # fresh comes back True where a frame was not finite
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mdeq.core import budget_options, remove_weight_norm, solver_spec
from mdeq.core.consistency import as_student, consistency_schedule
from mdeq.core.solvers import NORM_EPS
from mdeq.models import MDEQBackbone
from mdeq.models.layers import propagate_nonfinite

__all__ = ["fixed_budget", "budget_reference", "FixedBudgetModel", "FixedBudgetStream", "FixedBudgetStage",
           "BudgetPlan", "EXPORTABLE_SOLVERS"]

EXPORTABLE_SOLVERS = ("fixed_point", "anderson", "unroll", "consistency")
_NOT_STATIC = {
    "broyden": "fixed_budget has no static counterpart of its low-rank inverse-Jacobian updates",
    "ode": "its adaptive Runge-Kutta steps are accepted or rejected per sample, so the work depends on the data",
}


@dataclass(frozen=True)
class BudgetPlan:
    """The static settings of one fixed-budget solve (resolved from the model's DEQ settings at budget k).

    ``evals``: f-evaluations of the solve proper (k, or k - 1 after the Skip Reg. start); ``keep_f``: the
    solver returns f of its best iterate (``final_step`` with a ``return_f`` solver); ``final_f``: one more
    evaluation at the result (``final_step`` with a solver that cannot return f); ``times``: the C-DEQ student's
    time at each application.
    """

    budget: int
    solver: str
    init: str
    evals: int
    stop_mode: str = "rel"
    tol: float = 0.0
    divergence_factor: float = 1e6
    damping: float = 1.0
    m: int = 1
    lam: float = 0.0
    keep_f: bool = False
    final_f: bool = False
    times: Tuple[float, ...] = ()

    def describe(self) -> str:
        what = {"zeros": "", "skip": " from the Skip DEQ prediction", "skip_reg": " from z0 = f(0)"}[self.init]
        evals = f"{self.budget} f-evaluation{'s' if self.budget != 1 else ''}"
        return f"{evals}: {self.solver}{what}"


def fixed_budget(model: nn.Module, k: int, stream: bool = False, **changes: Any
                 ) -> Union["FixedBudgetModel", "FixedBudgetStream"]:
    """``model`` at a budget of ``k`` f-evaluations as a plain module (images -> what the model returns).

    ``changes`` are ``configure_deq`` settings applied first (e.g. ``solver='fixed_point', init='skip_reg'``);
    the budget is then ``budget_options`` of the result. ``model`` itself is not modified. Raises ValueError for
    k < 1, a model that is not an MDEQ, and a solver without a static graph (the message names those that have).
    ``stream=True``: a ``FixedBudgetStream`` ((frames, state, fresh) -> (output, state, fresh), see the module
    docstring), what ``mdeq.stream(model, **budget_options(...))`` computes frame by frame.
    """
    net = _budget_copy(model, k, changes)
    stage = net.fullstage
    plan = _plan(net.deq.options, int(k), stage)
    del stage.deq  # the solver object goes; the cell, predictor and student stay
    stage.stats = None
    remove_weight_norm(net)  # safe on the copy: the model keeps its weight norm
    net.fullstage = FixedBudgetStage(stage, plan)
    wrapper = FixedBudgetStream if stream else FixedBudgetModel
    return wrapper(net, plan).eval().requires_grad_(False)


@torch.no_grad()
def budget_reference(model: nn.Module, k: int, x: torch.Tensor, **changes: Any) -> Any:
    """What ``model`` computes at a budget of ``k`` f-evaluations (the reference ``fixed_budget`` reproduces):
    a deep copy configured with ``changes`` and then ``budget_options``, in eval mode, under ``no_grad``."""
    return _budget_copy(model, k, changes)(x)


def _budget_copy(model: nn.Module, k: int, changes: Mapping[str, Any]) -> nn.Module:
    """A deep copy of ``model`` in eval mode, configured with ``changes`` and then ``budget_options`` for k."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"the budget k must be an integer >= 1 (f-evaluations), got {k!r}")
    _check_model(model)
    net = copy.deepcopy(model).eval()
    if changes:
        net.configure_deq(**changes)
    net.configure_deq(**budget_options(net.deq.options, int(k)))
    return net


def _check_model(model: Any) -> None:
    if not isinstance(model, MDEQBackbone):
        raise ValueError(f"fixed_budget exports MDEQ models (an mdeq.models.MDEQBackbone: MDEQNet from "
                         f"timm.create_model('mdeq_*'), MDEQSegNet from mdeq.create_segmentation_model), got "
                         f"{type(model).__name__}")
    if model.fullstage is None:
        raise ValueError("this MDEQ was pruned to its stem (prune_intermediate_layers): it has no equilibrium "
                         "stage to give a budget; export it with torch.export directly")


def _plan(o: Mapping[str, Any], k: int, stage: nn.Module) -> BudgetPlan:
    """The static solve that the resolved DEQ settings ``o`` describe, or a ValueError naming what exports."""
    name = o["solver"]
    if name not in EXPORTABLE_SOLVERS:
        why = _NOT_STATIC.get(name, "fixed_budget has no static counterpart of it")
        raise ValueError(f"solver {name!r} does not export at a fixed budget ({why}); fixed_budget exports "
                         f"{', '.join(EXPORTABLE_SOLVERS)}, each with init zeros, skip or skip_reg: choose one with "
                         f"model.configure_deq(solver=...) or fixed_budget(model, k, solver=...)")
    spec = solver_spec(name)
    opts = {**spec.defaults(), **{key: o[key] for key in ("max_iter", "tol", "stop_mode") if key in spec.options},
            **o["solver_options"]}
    keep_f = bool(o["final_step"]) and spec.can_return_f
    plan = dict(budget=k, solver=name, init=o["init"], evals=opts["max_iter"], stop_mode=opts["stop_mode"],
                tol=float(opts["tol"]), keep_f=keep_f, final_f=bool(o["final_step"]) and not keep_f)
    if name in ("fixed_point", "anderson"):
        plan.update(divergence_factor=float(opts["divergence_factor"]), damping=float(opts["damping"]))
    if name == "anderson":
        plan.update(m=int(opts["m"]), lam=float(opts["lam"]))
    if name == "consistency":
        student = as_student(stage.student)
        steps = opts["num_train_steps"] if opts["num_train_steps"] is not None else student.num_train_steps
        if steps is None:
            raise ValueError("solver='consistency' needs num_train_steps: the student was not distilled "
                             "(tools/distill.py sets it) and solver_options gives none")
        times = student.times(steps).tolist()
        plan["times"] = tuple(times[n] for n in consistency_schedule(opts["max_iter"], steps))
    return BudgetPlan(**plan)


# ---------------------------------------------------------------------------------------------- the modules
class FixedBudgetModel(nn.Module):
    """An MDEQ at a fixed budget: the model's own forward (stem, head) around a ``FixedBudgetStage``.

    ``net`` is the model's deep copy (weight norm folded, no DEQ object); ``plan`` the static solve.
    """

    def __init__(self, net: nn.Module, plan: BudgetPlan):
        super().__init__()
        self.net = net
        self.plan = plan

    @property
    def budget(self) -> int:
        return self.plan.budget

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    def extra_repr(self) -> str:
        return self.plan.describe()


class FixedBudgetStream(FixedBudgetModel):
    """An MDEQ at a fixed budget for video streams: (frames, state, fresh) -> (output, state, fresh).

    ``state`` (B, D): each stream's equilibrium after its previous frame, the branch states packed (flattened and
    concatenated, highest resolution first); ``fresh`` (B,) bool: streams that start as the model does instead
    (zeros, or the Skip DEQ prediction). The returned ``fresh`` is True for streams whose frame or equilibrium was
    not finite (their output is NaN), so the next frame restarts them, as ``mdeq.stream`` does. ``start(frames)``
    gives the state and flags of a first frame. ONNX names: inputs ``images``, ``state``, ``fresh``; outputs
    ``output``, ``next_state``, ``next_fresh``.
    """

    input_names = ("images", "state", "fresh")
    output_names = ("output", "next_state", "next_fresh")

    @torch.no_grad()
    def start(self, frames: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(zero state (B, D), fresh all True) for a batch of first frames."""
        _, injection = self.net.forward_stem(frames)
        state = _pack(self.net.fullstage.stage.initial_state(injection))
        return state, torch.ones(frames.shape[0], dtype=torch.bool, device=frames.device)

    def forward(self, images: torch.Tensor, state: torch.Tensor, fresh: torch.Tensor
                ) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        _, injection = self.net.forward_stem(images)
        stage = self.net.fullstage
        zeros = stage.stage.initial_state(injection)
        shapes = [tuple(t.shape[1:]) for t in zeros]
        size = sum(int(torch.Size(s).numel()) for s in shapes)
        if state.dim() != 2 or state.shape[1] != size or fresh.dim() != 1:
            raise ValueError(f"state must be (B, {size}) and fresh (B,) bool for frames of {tuple(images.shape[1:])} "
                             f"(start(frames) gives them), got {tuple(state.shape)} and {tuple(fresh.shape)}")
        start = torch.where(fresh[:, None], torch.zeros_like(state), state)
        zs = stage(injection, _unpack(start.to(zeros[0].dtype), shapes), warm=~fresh)
        out = self.net.forward_states(zs)
        new_state = _pack(zs)
        bad = ~torch.isfinite(images).flatten(1).all(dim=1) | ~torch.isfinite(new_state).all(dim=1)
        return out, new_state, bad

    def extra_repr(self) -> str:
        return self.plan.describe() + ", streaming"


class FixedBudgetStage(nn.Module):
    """Stands in for ``MDEQStage``: injection -> branch states after the plan's k f-evaluations.

    Holds the stage (its cell ``f``, Skip DEQ ``initializer``, C-DEQ ``student``) without its DEQ.
    """

    def __init__(self, stage: nn.Module, plan: BudgetPlan):
        super().__init__()
        self.stage = stage
        self.plan = plan
        self.stats = None  # what the model's forward reads after a solve (no SolverStats here)

    def forward(self, injection: torch.Tensor, z0: Optional[List[torch.Tensor]] = None,
                warm: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Branch states; ``z0`` a warm start as for the model (zeros by default); ``warm`` (B,) bool: samples that
        start from ``z0`` instead of the Skip DEQ prediction (``mdeq.core.DEQ``'s ``warm``)."""
        p, stage = self.plan, self.stage
        if z0 is None:
            z0 = stage.initial_state(injection)
        shapes = [tuple(t.shape[1:]) for t in z0]
        x = _pack(z0)
        dtype = x.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # the solver's dtype

        def f_list(z: Sequence[torch.Tensor]) -> List[torch.Tensor]:
            return [t.to(work) for t in stage.cell([t.to(dtype) for t in z], injection)]

        def f(v: torch.Tensor) -> torch.Tensor:
            return _pack(f_list(_unpack(v, shapes)))

        x = x.to(work)
        if p.init == "skip":
            guess = _pack(stage.initializer(injection)).to(work)
            x = guess if warm is None else torch.where(warm[:, None], x, guess)
        elif p.init == "skip_reg":
            x = f(x)
        if p.solver == "unroll":
            for _ in range(p.evals):
                x = f(x)
        elif p.solver == "consistency":
            x = _consistency(f_list, x, shapes, as_student(stage.student), p.times)
        elif p.solver == "fixed_point":
            x = _fixed_point(f, x, p)
        else:
            x = _anderson(f, x, p)
        if p.final_f:
            x = f(x)
        return propagate_nonfinite(_unpack(x.to(dtype), shapes), injection)


def _pack(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """List state -> (B, D), as ``StatePacker.pack`` (no batch size baked in)."""
    return torch.cat([t.flatten(1) for t in z], dim=1)


def _unpack(x: torch.Tensor, shapes: Sequence[Tuple[int, ...]]) -> List[torch.Tensor]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [c.unflatten(1, s) for c, s in zip(x.split(sizes, dim=1), shapes)]


# ---------------------------------------------------------------------------------------------- static solves
class _BestIterate:
    """``bookkeeping.Progress`` for the result only, with masks instead of host-side lists (see module doc)."""

    def __init__(self, x0: torch.Tensor, p: BudgetPlan):
        self.p = p
        self.use_rel = p.stop_mode == "rel"
        self.best: Optional[torch.Tensor] = None if p.keep_f else x0
        self.fallback: Optional[torch.Tensor] = self.best if self.use_rel else None  # best by abs residual
        self.best_res = self.fb_abs = self.first_abs = self.stopped = self.diverged = None

    def observe(self, x: torch.Tensor, fx: torch.Tensor, abs_res: Optional[torch.Tensor] = None) -> None:
        if abs_res is None:
            abs_res = torch.linalg.vector_norm(fx - x, dim=1)
        a = abs_res.to(fx.dtype).double()  # the host compares Python floats: float64
        rel = a / (torch.linalg.vector_norm(fx, dim=1).double() + NORM_EPS)
        res = rel if self.use_rel else a
        kept = fx if self.p.keep_f else x
        if self.first_abs is None:  # the first evaluation: nothing stopped, nothing seen
            self.first_abs = a
            self.best_res = self.fb_abs = torch.full_like(a, float("inf"))
            self.stopped = self.diverged = torch.zeros_like(a, dtype=torch.bool)
            if self.p.keep_f:
                self.best = kept
                self.fallback = kept if self.use_rel else None
        active = ~self.stopped
        better = active & (res < self.best_res)  # NaN never wins
        better_abs = active & (a < self.fb_abs)
        self.best_res = torch.where(better, res, self.best_res)
        self.fb_abs = torch.where(better_abs, a, self.fb_abs)
        self.best = torch.where(better[:, None], kept, self.best)
        if self.fallback is not None:
            self.fallback = torch.where(better_abs[:, None], kept, self.fallback)
        diverged = active & (~torch.isfinite(res) | ~(a <= self.p.divergence_factor * self.first_abs))
        converged = active & ~diverged & (res <= self.p.tol)
        self.diverged = self.diverged | diverged
        self.stopped = self.stopped | diverged | converged

    def result(self) -> torch.Tensor:
        if self.fallback is None:
            return self.best
        return torch.where(self.diverged[:, None], self.fallback, self.best)


def _fixed_point(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, p: BudgetPlan) -> torch.Tensor:
    best = _BestIterate(x, p)
    for _ in range(p.evals):
        fx = f(x)
        g = fx - x
        best.observe(x, fx)
        x = fx if p.damping == 1 else torch.add(x, g, alpha=p.damping)
    return best.result()


def _anderson(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, p: BudgetPlan) -> torch.Tensor:
    """``solvers.anderson`` unrolled: the history as lists (slot = step mod m), the Gram entries by slot pair."""
    best = _BestIterate(x, p)
    m = p.m
    F: List[Optional[torch.Tensor]] = [None] * m
    G: List[Optional[torch.Tensor]] = [None] * m
    gram: Dict[Tuple[int, int], torch.Tensor] = {}  # (i, j), i <= j -> <G_i, G_j> (B,) float64
    for step in range(p.evals):
        fx = f(x)
        slot, n = step % m, min(step + 1, m)
        g = fx - x
        F[slot], G[slot] = fx, g
        Gn = torch.stack(G[:n], dim=1)  # (B, n, D)
        row = torch.bmm(g.unsqueeze(1), Gn.transpose(1, 2)).squeeze(1)  # (B, n): <g, G_i>
        best.observe(x, fx, abs_res=row[:, slot].clamp_min(0).sqrt())
        if step == p.evals - 1:
            break  # the next iterate would never be evaluated
        row = row.double()
        for j in range(n):
            gram[min(slot, j), max(slot, j)] = row[:, j]
        if n == 1:
            x = fx if p.damping == 1 else torch.add(x, g, alpha=p.damping)
            continue
        H = torch.stack([torch.stack([gram[min(i, j), max(i, j)] for j in range(n)], dim=1) for i in range(n)], dim=1)
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        scale = H.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        H = H + (p.lam * scale)[:, None, None] * eye
        a = _solve(H, torch.ones_like(H[:, :, :1])).squeeze(2)
        alpha = a / a.sum(dim=1, keepdim=True)
        bad = ~torch.isfinite(alpha).all(dim=1)  # a singular system gives non-finite weights here
        alpha = torch.where(bad[:, None], eye[slot], alpha)
        alpha = alpha.to(x.dtype).unsqueeze(1)  # (B, 1, n)
        x = torch.bmm(alpha, torch.stack(F[:n], dim=1)).squeeze(1)
        if p.damping != 1:
            x = torch.sub(x, torch.bmm(alpha, Gn).squeeze(1), alpha=1 - p.damping)
    return best.result()


def _solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^-1 b for a batch of small systems (B, n, n), (B, n, 1): Gauss-Jordan with partial pivoting in static ops
    (ONNX has no linear solver). A singular system gives non-finite entries."""
    n = A.shape[-1]
    M = torch.cat([A, b], dim=2)  # (B, n, n + 1)
    rows = torch.arange(n, device=A.device)[None, :]
    for j in range(n):
        piv = M[:, j:, j].abs().argmax(dim=1, keepdim=True) + j  # (B, 1)
        perm = torch.where(rows == j, piv, torch.where(rows == piv, j, rows))  # swap rows j and piv
        M = M.gather(1, perm.unsqueeze(2).expand_as(M))
        pivot_row = M[:, j:j + 1]  # (B, 1, n + 1)
        factors = M[:, :, j:j + 1] / pivot_row[:, :, j:j + 1] * (rows != j).to(M.dtype).unsqueeze(2)
        M = M - factors * pivot_row
    return M[:, :, n:] / M.diagonal(dim1=1, dim2=2).unsqueeze(2)


def _consistency(f_list: Callable[[Sequence[torch.Tensor]], List[torch.Tensor]], x: torch.Tensor,
                 shapes: Sequence[Tuple[int, ...]], student: nn.Module, times: Sequence[float]) -> torch.Tensor:
    """``solvers.consistency`` (no residual measured): z <- F(z, t_j) = student.combine(z, t_j, f(z))."""
    for t in times:
        z = _unpack(x, shapes)
        s = f_list(z)
        tb = torch.full_like(x[:, 0], t)  # (B,) in the working dtype, as the solver's float time
        x = _pack(student.combine(z, tb, s)).to(x.dtype)
    return x
