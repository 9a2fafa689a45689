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
* ``solver="unroll"`` applies f exactly ``max_iter`` times from z0 with ordinary autograd (MDEQ pre-training);
  its stats describe the last step, ||z_N - z_{N-1}||.
* ``jac_probes=k`` at call time adds the Hutchinson Jacobian penalty ``stats.jac_loss`` computed at the
  returned equilibrium (differentiable).
* Initial guess (``init``): ``"zeros"`` uses the caller's z0 (zeros, or a warm start such as the previous
  frame's z*); ``"skip"`` starts from ``predictor()``, an explicit prediction g(x) of z* that the caller
  passes at call time (Skip DEQ); ``"skip_reg"`` starts from f(z0), one extra f-evaluation and no new
  parameters (Skip Reg. DEQ). With grad enabled both add ``stats.init_loss`` = ``init_weight`` x the mean
  squared difference between the initial guess and z* (z* detached unless ``init_detach=False``), which
  trains the predictor (and, for ``skip_reg``, pulls f(z0) towards z*).
* ``record`` (``"all"`` or iterate indices) returns the solver's iterates in ``stats.trajectory``.
* ``correction_states=n`` (training only): n iterates evenly spaced along the trajectory are recorded and
  each gets a ``correction_steps``-step phantom gradient; the differentiable states are in
  ``stats.corrections`` (earliest first) for the fixed-point correction loss (DEQ-Flow), whose weights
  ``correction_gamma^(n-i)`` the caller applies (``regularizers.fixed_point_correction``).
* ``final_step=True`` (inference): return f(z*) rather than z*, as training's differentiable output is; the
  solvers keep f of their best iterate (``return_f``), so this costs no evaluation and a budget of k
  evaluations ends in f's output.
* ``solver="consistency"`` (C-DEQ) takes the distilled ``student`` at call time.

Every option is validated; an unknown one is an error. ``configure(**changes)`` changes options at run time.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import backward as _bw
from .regularizers import jacobian_reg
from .solvers import SolverStats, check_options, get_solver, list_solvers, solver_options
from .state import State, StatePacker

__all__ = ["DEQ", "BACKWARDS", "INITS"]

BACKWARDS = ("ift", "phantom", "one_step")
RUNTIME_OPTIONS = {"student"}  # solver arguments passed at call time (modules), never from configs
CALL_OPTIONS = {"max_iter", "tol", "stop_mode", "trace", "record", "return_f"}  # set by DEQ from its own settings
UNROLL = "unroll"

_DEFAULTS: Dict[str, Any] = dict(
    solver="anderson",
    max_iter=30,
    tol=1e-4,
    stop_mode="rel",
    solver_options=None,
    backward="ift",
    b_solver="anderson",
    b_max_iter=None,
    b_tol=None,
    b_stop_mode=None,
    b_solver_options=None,
    phantom_steps=5,
    phantom_damping=0.5,
    trace=False,
    record=None,
    init="zeros",
    init_weight=1.0,
    init_detach=True,
    correction_states=0,
    correction_gamma=0.8,
    correction_steps=1,
    final_step=False,
)
INITS = ("zeros", "skip", "skip_reg")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_solver_options(solver: str, options: Optional[dict], which: str) -> dict:
    options = dict(options or {})
    if solver == UNROLL:
        if options:
            raise ValueError(f"{which}: solver 'unroll' takes no options, got {sorted(options)}")
        return options
    allowed = set(solver_options(solver)) - CALL_OPTIONS - RUNTIME_OPTIONS
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"{which}: unknown option(s) {sorted(unknown)} for solver {solver!r}; it takes {sorted(allowed)}"
        )
    try:
        check_options(**options)
    except ValueError as err:
        raise ValueError(f"{which}: {err}") from None
    return options


class DEQ(nn.Module):
    """Deep-equilibrium layer: forward solve + chosen backward (see module docstring). Holds no parameters."""

    def __init__(self, **options: Any):
        super().__init__()
        self._options: Dict[str, Any] = {}
        self.configure(**{**_DEFAULTS, **options})

    # ------------------------------------------------------------------ options
    def configure(self, **changes: Any) -> "DEQ":
        """Change solver settings (validated as a whole; nothing changes if any value is invalid).

        Switching ``solver`` (``b_solver``) without giving ``solver_options`` (``b_solver_options``) resets them.
        """
        unknown = set(changes) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown DEQ option(s) {sorted(unknown)}; valid options are {sorted(_DEFAULTS)}")
        new = {**self._options, **changes}
        for key, opts in (("solver", "solver_options"), ("b_solver", "b_solver_options")):
            if key in changes and opts not in changes and changes[key] != self._options.get(key):
                new[opts] = None  # options of the previous solver do not carry over to another one
        solvers = list_solvers()
        if new["solver"] not in solvers + [UNROLL]:
            raise ValueError(f"unknown solver {new['solver']!r}; choose one of {solvers + [UNROLL]}")
        if new["b_solver"] not in solvers:
            raise ValueError(f"unknown b_solver {new['b_solver']!r}; choose one of {solvers}")
        check_options(max_iter=new["max_iter"], tol=new["tol"], stop_mode=new["stop_mode"], trace=new["trace"],
                      record=new["record"])
        if new["init"] not in INITS:
            raise ValueError(f"unknown init {new['init']!r}; choose one of {INITS}")
        for key in ("init_weight",):
            if isinstance(new[key], bool) or not isinstance(new[key], numbers.Real) or new[key] < 0:
                raise ValueError(f"{key} must be a number >= 0, got {new[key]!r}")
        for key in ("init_detach", "final_step"):
            if not isinstance(new[key], bool):
                raise ValueError(f"{key} must be true or false, got {new[key]!r}")
        if isinstance(new["correction_states"], bool) or not isinstance(new["correction_states"], numbers.Integral) \
                or new["correction_states"] < 0:
            raise ValueError(f"correction_states must be an integer >= 0, got {new['correction_states']!r}")
        _check_positive_int("correction_steps", new["correction_steps"])
        if isinstance(new["correction_gamma"], bool) or not (
                isinstance(new["correction_gamma"], numbers.Real) and 0 < new["correction_gamma"] <= 1):
            raise ValueError(f"correction_gamma must be in (0, 1], got {new['correction_gamma']!r}")
        for key, check_as in (("b_max_iter", "max_iter"), ("b_tol", "tol"), ("b_stop_mode", "stop_mode")):
            if new[key] is not None:
                try:
                    check_options(**{check_as: new[key]})
                except ValueError as err:
                    raise ValueError(str(err).replace(check_as, key, 1)) from None
        if new["backward"] not in BACKWARDS:
            raise ValueError(f"unknown backward {new['backward']!r}; choose one of {BACKWARDS}")
        _check_positive_int("phantom_steps", new["phantom_steps"])
        if isinstance(new["phantom_damping"], bool) or not (
            isinstance(new["phantom_damping"], numbers.Real) and 0 < new["phantom_damping"] <= 1
        ):
            raise ValueError(f"phantom_damping must be in (0, 1], got {new['phantom_damping']!r}")
        new["solver_options"] = _check_solver_options(new["solver"], new["solver_options"], "solver_options")
        new["b_solver_options"] = _check_solver_options(new["b_solver"], new["b_solver_options"], "b_solver_options")
        self._options = new
        return self

    @property
    def options(self) -> Dict[str, Any]:
        """The current settings, with the backward defaults resolved."""
        o = dict(self._options)
        o["b_max_iter"] = o["b_max_iter"] or o["max_iter"]
        o["b_tol"] = o["tol"] if o["b_tol"] is None else o["b_tol"]
        o["b_stop_mode"] = o["b_stop_mode"] or o["stop_mode"]
        return o

    def __getattr__(self, name: str):
        options = self.__dict__.get("_options")
        if options is not None and name in options:
            return self.options[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _DEFAULTS and "_options" in self.__dict__:
            self.configure(**{name: value})  # validated, and seen by forward
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        o = self.options
        s = f"solver={o['solver']}, max_iter={o['max_iter']}, tol={o['tol']}, stop_mode={o['stop_mode']}"
        if o["solver"] != UNROLL:
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
        student: Optional[nn.Module] = None,
    ) -> Tuple[State, SolverStats]:
        """Solve z = f(z) from ``z0`` (see the module docstring for the options).

        ``max_iter`` overrides the setting for this call only; ``predictor`` (init ``"skip"``) returns the
        initial guess; ``student`` is the distilled consistency function of ``solver="consistency"``.
        """
        o = self.options
        if max_iter is not None:
            _check_positive_int("max_iter", max_iter)
            o["max_iter"] = max_iter
        if isinstance(jac_probes, bool) or not isinstance(jac_probes, int) or jac_probes < 0:
            raise ValueError(f"jac_probes must be an integer >= 0, got {jac_probes!r}")
        grad = torch.is_grad_enabled()
        if jac_probes and not grad:
            raise ValueError("jac_probes > 0 needs gradients enabled: the Jacobian penalty is a training loss")

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

        if x0.device.type == "meta":  # shape inference only (timm builds models on the meta device)
            return result(f_flat(x0)), _meta_stats(o["solver"], x0)

        guess, extra_nfe = None, 0  # the differentiable initial guess (Skip / Skip Reg. DEQ)
        if o["init"] == "skip":
            if predictor is None:
                raise ValueError("init='skip' needs a predictor of the initial state (the model's skip initializer); "
                                 "build the model with deq=dict(init='skip')")
            guess = packer.pack(predictor()).to(work)
        elif o["init"] == "skip_reg":
            guess, extra_nfe = f_flat(x0), 1
        if guess is not None:
            x0 = guess if o["solver"] == UNROLL else guess.detach()

        if o["solver"] == UNROLL:
            record = o["record"]
            z, prev, states = _bw.unroll(f_flat, x0, o["max_iter"], keep=record is not None)
            stats = _unroll_stats(z.detach(), prev.detach(), o["max_iter"], o["tol"], o["stop_mode"])
            stats.nfe += extra_nfe
            if record is not None:
                steps = range(len(states)) if record == "all" else [i for i in record if i < len(states)]
                stats.trajectory = [result(states[i].detach()) for i in steps]
                stats.trajectory_steps = list(steps)
            if jac_probes:
                zj = z if z.requires_grad else z.detach().requires_grad_()
                stats.jac_loss = jacobian_reg(f_flat(zj), zj, jac_probes)
            self._init_loss(stats, guess, z, grad, o)
            return result(z), stats

        record = o["record"]
        n_corr = o["correction_states"] if grad else 0
        if n_corr:
            spots = sorted({max(1, round((i + 1) * o["max_iter"] / (n_corr + 1))) for i in range(n_corr)})
            record = "all" if record == "all" else sorted(set(record or []) | set(spots))
        solver = get_solver(o["solver"])
        runtime = {"student": student} if o["solver"] == "consistency" else {}
        if o["final_step"] and not grad and "return_f" in solver_options(o["solver"]):
            runtime["return_f"] = True  # f(z*) was computed for its residual: no extra evaluation
        if record is not None:
            if "record" not in solver_options(o["solver"]):
                raise ValueError(f"solver {o['solver']!r} cannot record its iterates (it has no 'record' option), "
                                 f"which record= and correction_states need")
            runtime["record"] = record
        with torch.no_grad(), _autocast_off(x0.device.type):
            z_star, stats = solver(
                f_flat, x0.detach(), max_iter=o["max_iter"], tol=o["tol"], stop_mode=o["stop_mode"],
                trace=o["trace"], **o["solver_options"], **runtime,
            )
        stats.nfe += extra_nfe
        recorded = dict(zip(stats.trajectory_steps or [], stats.trajectory or []))  # flat (B, D) iterates
        stats.trajectory = stats.trajectory_steps = None
        if o["record"] is not None:  # what the caller asked for (the corrections may have recorded more)
            steps = [i for i in recorded if o["record"] == "all" or i in set(o["record"])]
            stats.trajectory, stats.trajectory_steps = [result(recorded[i]) for i in steps], steps
        if not grad:
            if o["final_step"] and "return_f" not in runtime:
                stats.nfe += 1
                return result(f_flat(z_star)), stats
            return result(z_star), stats

        if o["backward"] == "ift":
            b_solver = get_solver(o["b_solver"])

            def solve_backward(vjp, v):
                return b_solver(vjp, v, max_iter=o["b_max_iter"], tol=o["b_tol"], stop_mode=o["b_stop_mode"],
                                **o["b_solver_options"])

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


def _unroll_stats(z: torch.Tensor, prev: torch.Tensor, steps: int, tol: float, stop_mode: str) -> SolverStats:
    abs_res = torch.linalg.vector_norm(z - prev, dim=1)
    rel_res = abs_res / (torch.linalg.vector_norm(z, dim=1) + 1e-8)
    res = rel_res if stop_mode == "rel" else abs_res
    return SolverStats(
        solver=UNROLL,
        nstep=torch.full_like(abs_res, steps, dtype=torch.long),
        abs_residual=abs_res,
        rel_residual=rel_res,
        converged=res <= tol,
        diverged=~torch.isfinite(res),
        nfe=steps,
    )


def _meta_stats(solver: str, x0: torch.Tensor) -> SolverStats:
    b = x0.shape[0]
    empty = torch.empty(b, device="meta")
    return SolverStats(
        solver=solver,
        nstep=torch.empty(b, dtype=torch.long, device="meta"),
        abs_residual=empty,
        rel_residual=empty,
        converged=torch.empty(b, dtype=torch.bool, device="meta"),
        diverged=torch.empty(b, dtype=torch.bool, device="meta"),
        nfe=1,
    )
