"""``DEQ``: solve z* = f(z*) without autograd, then attach the chosen gradient.

    deq = DEQ(solver="anderson", max_iter=30, tol=1e-4, backward="ift")
    z_star, stats = deq(lambda z: cell(z, x), z0)

* The state ``z0`` is a tensor (B, ...) or a list of tensors (one per resolution); the solve runs on the
  packed (B, D) matrix in float32 (float64 when z0 is float64) with autocast switched off, so z* is an
  accurate fixed point (f then sees the float32 state); the differentiable application that follows runs under
  the caller's autocast. Outside autocast f sees the state in z0's dtype (float16/bfloat16 models work). The
  result comes back in z0's dtype.
* With grad disabled (inference) the result is the solver's lowest-residual iterate z*. With grad enabled the
  result is differentiable in the parameters of f and in anything f closes over (the injection):
    - ``backward="ift"``: one extra application f(z*) carrying the implicit gradient, whose backward solves
      u = J^T u + v with ``b_solver`` (``b_max_iter``, ``b_tol``, ``b_stop_mode``); its stats land in
      ``stats.backward`` once backward has run;
    - ``backward="phantom"``: ``phantom_steps`` damped unrolled steps from z* (damping ``phantom_damping``);
    - ``backward="one_step"``: f(z*) with the Jacobian-free gradient.
* A *differentiable* solver (``solver="unroll"``: f applied exactly ``max_iter`` times from z0, MDEQ's
  pre-training) runs under autograd and its result carries its own gradient; no backward is attached.
* ``jac_probes=k`` at call time adds the Hutchinson Jacobian penalty ``stats.jac_loss`` computed at the
  returned equilibrium (differentiable).
* Initial guess (``init``): ``"zeros"`` uses the caller's z0 (zeros, or a warm start such as the previous
  frame's z*); ``"skip"`` starts from ``predictor()``, an explicit prediction g(x) of z* that the caller
  passes at call time (Skip DEQ: the predictor is part of the caller's model, not of the settings);
  ``"skip_reg"`` starts from f(z0), one extra f-evaluation and no new parameters (Skip Reg. DEQ). With grad
  enabled both add ``stats.init_loss`` = ``init_weight`` x the mean squared difference between the initial
  guess and z* (z* detached unless ``init_detach=False``), which trains the predictor (and, for ``skip_reg``,
  pulls f(z0) towards z*). ``warm`` (a (B,) bool mask at call time) marks samples whose z0 is a warm start
  (a video stream's previous equilibrium): with ``init="skip"`` they start from z0 instead of the prediction (the
  predictor is not called when every sample is warm); Skip Reg. DEQ's start f(z0) is one step from whatever z0 is,
  so it applies to every sample and keeps a budget of k evaluations exact.
* ``record`` (``"all"`` or iterate indices) returns the solver's iterates in ``stats.trajectory``.
* ``correction_states=n`` (training only): n iterates evenly spaced along the trajectory are recorded and
  each gets a ``correction_steps``-step phantom gradient; the differentiable states are in
  ``stats.corrections`` (earliest first) for the fixed-point correction loss (DEQ-Flow), whose weights
  ``correction_gamma^(n-i)`` the caller applies (``regularizers.fixed_point_correction``).
* ``final_step=True`` (inference): return f(z*) rather than z*, as training's differentiable output is; a
  solver that keeps f of its best iterate (``return_f``) does this at no cost, so a budget of k evaluations
  ends in f's output.
* Objects a solver needs at call time (``SolverSpec.needs``, e.g. the C-DEQ ``student``) are passed as keyword
  arguments of the call.

Settings: ``DEQ_OPTIONS`` declares each one (default, check, doc); the solver settings ``max_iter``, ``tol``,
``stop_mode``, ``trace`` and ``record`` are the solver's own (``mdeq.core.solvers.COMMON_OPTIONS``), with the
chosen solver's defaults. Every setting is validated when it is set (an unknown one is an error);
``configure(**changes)`` changes them at run time through ``merge_deq_options``, the one merge rule.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from . import backward as _bw
from .options import (Option, flag, mapping, nonnegative, nonnegative_int, one_of, optional, positive_int,
                      unit_interval)
from .regularizers import jacobian_reg
from .solvers import (COMMON_OPTIONS, STOP_MODES, SolverSpec, SolverStats, call_time_inputs, list_solvers,
                      root_solvers, solver_spec)
from .state import State, StatePacker

__all__ = ["DEQ", "DEQ_OPTIONS", "BACKWARDS", "INITS", "merge_deq_options", "check_deq_options", "budget_options"]

BACKWARDS = ("ift", "phantom", "one_step")
INITS = ("zeros", "skip", "skip_reg")
# set by DEQ itself from its settings (max_iter ... record) or from the call (return_f): not solver_options
SET_BY_DEQ = ("max_iter", "tol", "stop_mode", "trace", "record", "return_f")
SOLVER_SETTINGS = ("max_iter", "tol", "stop_mode", "trace", "record")  # DEQ settings that are solver options


def _registered_solver(name: str, v: Any) -> None:
    if v not in list_solvers():
        raise ValueError(f"unknown {name} {v!r}; choose one of {list_solvers()}")


def _root_solver(name: str, v: Any) -> None:
    _registered_solver(name, v)
    spec = solver_spec(v)
    if not spec.finds_roots:
        raise ValueError(f"{name} {v!r} cannot solve the backward fixed point; choose one of {root_solvers()}")


DEQ_OPTIONS: Dict[str, Option] = {
    "solver": Option("anderson", _registered_solver, "forward solver (list_solvers(); 'unroll': pre-training)"),
    **{k: COMMON_OPTIONS[k] for k in SOLVER_SETTINGS},  # their defaults: the chosen solver's
    "solver_options": Option(None, mapping, "the forward solver's own options, e.g. {'m': 5} for anderson"),
    "backward": Option("ift", one_of(*BACKWARDS), "gradient: ift (implicit), phantom or one_step"),
    "b_solver": Option("anderson", _root_solver, "solver of the implicit backward fixed point"),
    "b_max_iter": Option(None, optional(positive_int), "backward budget (None: max_iter)"),
    "b_tol": Option(None, optional(nonnegative), "backward tolerance (None: tol)"),
    "b_stop_mode": Option(None, optional(one_of(*STOP_MODES)), "backward stop mode (None: stop_mode)"),
    "b_solver_options": Option(None, mapping, "the backward solver's own options"),
    "phantom_steps": Option(5, positive_int, "damped unrolled steps of the phantom gradient"),
    "phantom_damping": Option(0.5, unit_interval, "their damping"),
    "init": Option("zeros", one_of(*INITS), "initial guess: zeros (the caller's z0), skip (the caller's "
                                            "predictor), skip_reg (f(z0))"),
    "init_weight": Option(1.0, nonnegative, "weight of the initial-guess loss mean((z0 - z*)^2)"),
    "init_detach": Option(True, flag, "z* detached in the initial-guess loss"),
    "correction_states": Option(0, nonnegative_int, "trajectory states given a fixed-point correction loss"),
    "correction_gamma": Option(0.8, unit_interval, "their loss weights gamma^(n-i)"),
    "correction_steps": Option(1, positive_int, "phantom steps attached to each correction state"),
    "final_step": Option(False, flag, "inference returns f(z*) instead of z*"),
}


def merge_deq_options(current: Mapping[str, Any], changes: Mapping[str, Any]) -> Dict[str, Any]:
    """``current`` updated by ``changes``: the one merge rule of DEQ settings (a model's preset with the user's
    settings, ``DEQ.configure``). Switching ``solver`` (``b_solver``) without giving ``solver_options``
    (``b_solver_options``) drops the previous solver's options: they belong to that solver."""
    new = {**current, **changes}
    for key, opts in (("solver", "solver_options"), ("b_solver", "b_solver_options")):
        if key in changes and opts not in changes and changes[key] != current.get(key, DEQ_OPTIONS[key].default):
            new.pop(opts, None)
    return new


def check_deq_options(settings: Mapping[str, Any]) -> None:
    """Validate DEQ settings (any subset): each value by its declared check, then what depends on the solver.

    Unknown names raise ``TypeError``; bad values ``ValueError`` naming the setting and what is expected.
    """
    unknown = sorted(set(settings) - set(DEQ_OPTIONS))
    if unknown:
        raise TypeError(f"unknown DEQ option(s) {unknown}; valid options are {sorted(DEQ_OPTIONS)}")
    for name, value in settings.items():
        DEQ_OPTIONS[name].check(name, value)
    solver = settings.get("solver", DEQ_OPTIONS["solver"].default)
    spec = solver_spec(solver)
    b_spec = solver_spec(settings.get("b_solver", DEQ_OPTIONS["b_solver"].default))
    for key, s in (("solver_options", spec), ("b_solver_options", b_spec)):
        _check_solver_options(key, s, settings.get(key))
    for key in ("trace", "record"):
        if settings.get(key) not in (None, False) and key not in spec.options:
            what = "record its iterates" if key == "record" else "trace its residuals"
            raise ValueError(f"solver {solver!r} cannot {what} (it has no {key!r} option)")
    if settings.get("correction_states") and not spec.can_record:
        raise ValueError(f"solver {solver!r} cannot record its iterates (it has no 'record' option), which "
                         f"correction_states needs")


def _check_solver_options(key: str, spec: SolverSpec, options: Optional[Mapping[str, Any]]) -> None:
    allowed = set(spec.options) - set(SET_BY_DEQ)
    unknown = sorted(set(options or {}) - allowed)
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {unknown} for solver {spec.name!r}; it takes {sorted(allowed)}")
    for name, value in (options or {}).items():
        try:
            spec.options[name].check(name, value)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


def budget_options(options: Mapping[str, Any], evals: int) -> Dict[str, Any]:
    """``configure`` changes under which an inference forward makes exactly ``evals`` f-evaluations and the
    head sees the last one's output (the comparison axis of the accuracy-vs-compute benchmark).

    Built from what the solver declares: its ``fixed_budget`` options (tolerance 0, or no extra evaluation to
    measure the residual) make every one of ``max_iter`` evaluations run, and a solver that keeps f of its best
    iterate (``return_f``) ends in f's output at no cost (``final_step``). Skip Reg. DEQ spends one evaluation
    on z0 = f(z0); with a budget of one, that start is the answer. A solver that takes whole steps of several
    evaluations (``exact_budget`` false) may use fewer than ``evals``.
    """
    if evals < 1:
        raise ValueError(f"the budget must be at least one f-evaluation, got {evals}")
    spec = solver_spec(options["solver"])
    left = evals - (1 if options.get("init", "zeros") == "skip_reg" else 0)  # what the solve may use
    if left == 0:  # Skip Reg. DEQ with one evaluation: its start f(z0) is the answer
        return dict(solver="unroll", max_iter=1, init="zeros", final_step=False)
    out: Dict[str, Any] = dict(solver=spec.name, max_iter=left, final_step=spec.can_return_f)
    budget = dict(spec.fixed_budget)
    for key in SET_BY_DEQ:
        if key in budget:
            out[key] = budget.pop(key)
    if budget or spec.options.keys() - set(SET_BY_DEQ):
        out["solver_options"] = {**dict(options.get("solver_options") or {}), **budget}
    return out


class DEQ(nn.Module):
    """Deep-equilibrium layer: forward solve + chosen backward (see module docstring). Holds no parameters.

    ``provides`` (optional) names the call-time objects its caller passes (``"predictor"``, ``"student"``, ...):
    then a setting that needs another one (``init='skip'`` without a predictor, a solver needing a student) is
    refused when it is set, with ``missing_hint`` saying how to get it, rather than at the next call.
    """

    def __init__(self, *, provides: Optional[Iterable[str]] = None, missing_hint: str = "", **options: Any):
        super().__init__()
        self._settings: Dict[str, Any] = {}
        self.provides = None if provides is None else frozenset(provides)
        self.missing_hint = missing_hint
        self.configure(**options)

    # ------------------------------------------------------------------ options
    def configure(self, **changes: Any) -> "DEQ":
        """Change settings (validated as a whole; nothing changes if any value is invalid).

        Switching ``solver`` (``b_solver``) without giving ``solver_options`` (``b_solver_options``) resets them.
        """
        new = merge_deq_options(self._settings, changes)
        check_deq_options(new)
        if self.provides is not None:
            solver = new.get("solver", DEQ_OPTIONS["solver"].default)
            wanted = set(solver_spec(solver).needs) | ({"predictor"} if new.get("init") == "skip" else set())
            missing = sorted(wanted - self.provides)
            if missing:
                why = "init='skip'" if missing == ["predictor"] else f"solver {solver!r}"
                raise ValueError(f"{why} needs {' and '.join(missing)} at call time, which this model does not have"
                                 + (f"; {self.missing_hint}" if self.missing_hint else ""))
        self._settings = new
        return self

    @contextlib.contextmanager
    def temporarily(self, **changes: Any):
        """``configure(**changes)`` inside the ``with`` block only; the settings given before come back exactly
        afterwards (also after an error), e.g. a per-frame budget of a video stream."""
        before = dict(self._settings)
        self.configure(**changes)
        try:
            yield self
        finally:
            self._settings = before

    @property
    def settings(self) -> Dict[str, Any]:
        """The settings given so far (a copy); ``configure(**settings)`` on another DEQ reproduces this one's."""
        return dict(self._settings)

    @property
    def options(self) -> Dict[str, Any]:
        """Every setting, with the defaults resolved (the solver's own for ``max_iter``, ``tol``, ...; the backward
        ones from the forward's when None)."""
        spec = solver_spec(self._settings.get("solver", DEQ_OPTIONS["solver"].default))
        o = {k: (spec.options[k].default if k in spec.options else opt.default) if k in SOLVER_SETTINGS
             else opt.default for k, opt in DEQ_OPTIONS.items()}
        o.update(self._settings)
        o["solver_options"] = dict(o["solver_options"] or {})
        o["b_solver_options"] = dict(o["b_solver_options"] or {})
        o["b_max_iter"] = o["b_max_iter"] or o["max_iter"]
        o["b_tol"] = o["tol"] if o["b_tol"] is None else o["b_tol"]
        o["b_stop_mode"] = o["b_stop_mode"] or o["stop_mode"]
        return o

    def __getattr__(self, name: str):
        settings = self.__dict__.get("_settings")
        if settings is not None and name in DEQ_OPTIONS:
            return self.options[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DEQ_OPTIONS and "_settings" in self.__dict__:
            self.configure(**{name: value})  # validated, and seen by forward
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        o = self.options
        s = f"solver={o['solver']}, max_iter={o['max_iter']}, tol={o['tol']}, stop_mode={o['stop_mode']}"
        if not solver_spec(o["solver"]).differentiable:
            s += f", backward={o['backward']}"
            if o["backward"] == "ift":
                s += f", b_solver={o['b_solver']}, b_max_iter={o['b_max_iter']}, b_tol={o['b_tol']}"
            elif o["backward"] == "phantom":
                s += f", phantom_steps={o['phantom_steps']}, phantom_damping={o['phantom_damping']}"
        return s

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        jac_probes: int = 0,
        max_iter: Optional[int] = None,
        predictor: Optional[Callable[[], State]] = None,
        warm: Optional[torch.Tensor] = None,
        **inputs: Any,
    ) -> Tuple[State, SolverStats]:
        """Solve z = f(z) from ``z0`` (see the module docstring for the settings).

        ``max_iter`` overrides the setting for this call only; ``predictor`` (init ``"skip"``) returns the
        initial guess; ``warm`` (B,) bool marks the samples that start from ``z0`` instead of the prediction;
        ``inputs`` are objects the solver needs (``SolverSpec.needs``, e.g. ``student``); those it does not
        need are ignored.
        """
        o = self.options
        if max_iter is not None:
            positive_int("max_iter", max_iter)
            o["max_iter"] = max_iter
        nonnegative_int("jac_probes", jac_probes)
        grad = torch.is_grad_enabled()
        if jac_probes and not grad:
            raise ValueError("jac_probes > 0 needs gradients enabled: the Jacobian penalty is a training loss")
        spec = solver_spec(o["solver"])
        known = call_time_inputs()
        if set(inputs) - known:
            raise TypeError(f"DEQ got unexpected keyword(s) {sorted(set(inputs) - known)}; objects that solvers "
                            f"need at call time: {sorted(known)}")
        missing = [k for k in spec.needs if inputs.get(k) is None]
        if missing:
            raise ValueError(f"solver {spec.name!r} needs {missing} at call time (e.g. deq(f, z0, "
                             f"{missing[0]}=...)); a model passes what it holds")

        packer = StatePacker(z0)
        x0 = packer.pack(z0)
        dtype = x0.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # the solver's dtype
        # f sees the state in z0's dtype (a half model), except under autocast, where the solve runs with
        # autocast off and so needs the full-precision state (autocast casts it again in the differentiable part)
        f_dtype = work if _autocast_enabled(x0.device.type) else dtype
        x0 = x0.to(work)

        def f_flat(x: torch.Tensor) -> torch.Tensor:
            return packer.pack(f(packer.unpack(x.to(f_dtype)))).to(work)

        def result(z: torch.Tensor) -> State:
            return packer.unpack(z.to(dtype))

        if x0.device.type == "meta" or x0.shape[0] == 0:
            # shape inference (timm builds models on the meta device) or an empty batch: one application of f
            # gives the output's shapes (and, for an empty batch, a graph that reaches the parameters)
            return result(f_flat(x0)), _shape_only_stats(o["solver"], x0)

        if warm is not None and (not isinstance(warm, torch.Tensor) or warm.dtype != torch.bool
                                 or tuple(warm.shape) != (x0.shape[0],)):
            raise ValueError(f"warm must be a bool tensor of shape ({x0.shape[0]},) (one flag per sample), got "
                             f"{warm.dtype if isinstance(warm, torch.Tensor) else type(warm).__name__} "
                             f"{tuple(warm.shape) if isinstance(warm, torch.Tensor) else ''}".rstrip())
        guess, extra_nfe = None, 0  # the differentiable initial guess (Skip / Skip Reg. DEQ)
        if o["init"] == "skip" and warm is not None and bool(warm.all()):
            pass  # every sample starts from its warm z0: no prediction to make
        elif o["init"] == "skip":
            if predictor is None:
                raise ValueError("init='skip' needs a predictor of the initial state (a model's Skip DEQ "
                                 "initializer: build it with skip_init=True)")
            guess = packer.pack(predictor()).to(work)
        elif o["init"] == "skip_reg":
            guess, extra_nfe = f_flat(x0), 1
        if o["init"] == "skip" and guess is not None and warm is not None:
            guess = torch.where(warm.to(guess.device)[:, None], x0, guess)
        if guess is not None:
            x0 = guess if spec.differentiable else guess.detach()

        record = o["record"]
        n_corr = o["correction_states"] if grad and not spec.differentiable else 0
        if n_corr:
            spots = sorted({max(1, round((i + 1) * o["max_iter"] / (n_corr + 1))) for i in range(n_corr)})
            record = "all" if record == "all" else sorted(set(record or []) | set(spots))
        call = {k: o[k] for k in ("max_iter", "tol", "stop_mode", "trace") if k in spec.options}
        call.update(o["solver_options"])
        call.update({k: inputs[k] for k in spec.needs})
        if record is not None:
            call["record"] = record
        if o["final_step"] and not grad and spec.can_return_f:
            call["return_f"] = True  # f(z*) was computed for its residual: no extra evaluation
        call = {**spec.defaults(), **call}
        if spec.differentiable:
            z_star, stats = spec.run(f_flat, x0, **call)
        else:
            with torch.no_grad(), _autocast_off(x0.device.type):
                z_star, stats = spec.run(f_flat, x0.detach(), **call)
        stats.nfe += extra_nfe
        recorded = dict(zip(stats.trajectory_steps or [], stats.trajectory or []))  # flat (B, D) iterates
        stats.trajectory = stats.trajectory_steps = None
        if o["record"] is not None:  # what the caller asked for (the corrections may have recorded more)
            steps = [i for i in recorded if o["record"] == "all" or i in set(o["record"])]
            stats.trajectory, stats.trajectory_steps = [result(recorded[i]) for i in steps], steps

        if spec.differentiable:  # the result carries its own gradient
            if jac_probes:
                zj = z_star if z_star.requires_grad else z_star.detach().requires_grad_()
                stats.jac_loss = jacobian_reg(f_flat(zj), zj, jac_probes)
            self._init_loss(stats, guess, z_star, grad, o)
            return result(z_star), stats
        if not grad:
            if o["final_step"] and "return_f" not in call:
                stats.nfe += 1
                return result(f_flat(z_star)), stats
            return result(z_star), stats

        if o["backward"] == "ift":
            b_spec = solver_spec(o["b_solver"])
            b_call = {**b_spec.defaults(), **o["b_solver_options"], "max_iter": o["b_max_iter"], "tol": o["b_tol"],
                      "stop_mode": o["b_stop_mode"]}

            def solve_backward(vjp, v):
                return b_spec.run(vjp, v, **b_call)

            out, fz, z = _bw.implicit(f_flat, z_star, solve_backward, stats)
        elif o["backward"] == "phantom":
            out, fz, z = _bw.phantom(f_flat, z_star, o["phantom_steps"], o["phantom_damping"], jac_probes > 0)
        else:  # one_step
            out, fz, z = _bw.phantom(f_flat, z_star, 1, 1.0, jac_probes > 0)
        if jac_probes:
            stats.jac_loss = jacobian_reg(fz, z, jac_probes)
        if n_corr:
            states = [recorded[i] for i in spots if i in recorded]
            stats.corrections = [
                result(_bw.phantom(f_flat, s_.detach(), o["correction_steps"], o["phantom_damping"])[0])
                for s_ in states]
        self._init_loss(stats, guess, out, grad, o)
        return result(out), stats

    @staticmethod
    def _init_loss(stats: SolverStats, guess: Optional[torch.Tensor], out: torch.Tensor, grad: bool,
                   o: Dict[str, Any]) -> None:
        """``stats.init_loss`` = init_weight x mean squared distance from the initial guess to z*."""
        if guess is None or not grad or not guess.requires_grad:
            return
        target = out.detach() if o["init_detach"] else out
        stats.init_loss = o["init_weight"] * (guess - target.to(guess.dtype)).pow(2).mean()


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    """The forward solve runs in full precision even under autocast, so z* is an accurate fixed point."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _shape_only_stats(solver: str, x0: torch.Tensor) -> SolverStats:
    """Stats of a call that ran no solve (meta tensors, or an empty batch): per-sample fields of x0's length."""
    b, dev = x0.shape[0], x0.device
    return SolverStats(
        solver=solver,
        nstep=torch.zeros(b, dtype=torch.long, device=dev),
        abs_residual=torch.zeros(b, dtype=x0.dtype, device=dev),
        rel_residual=torch.zeros(b, dtype=x0.dtype, device=dev),
        converged=torch.ones(b, dtype=torch.bool, device=dev),
        diverged=torch.zeros(b, dtype=torch.bool, device=dev),
        nfe=1,
    )
