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

__all__ = ["DEQ", "BACKWARDS"]

BACKWARDS = ("ift", "phantom", "one_step")
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
)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_solver_options(solver: str, options: Optional[dict], which: str) -> dict:
    options = dict(options or {})
    if solver == UNROLL:
        if options:
            raise ValueError(f"{which}: solver 'unroll' takes no options, got {sorted(options)}")
        return options
    allowed = set(solver_options(solver)) - {"max_iter", "tol", "stop_mode", "trace"}
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
        check_options(max_iter=new["max_iter"], tol=new["tol"], stop_mode=new["stop_mode"], trace=new["trace"])
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
    ) -> Tuple[State, SolverStats]:
        """Solve z = f(z) from ``z0``. ``max_iter`` overrides the setting for this call only."""
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

        if o["solver"] == UNROLL:
            z, prev = _bw.unroll(f_flat, x0, o["max_iter"])
            stats = _unroll_stats(z.detach(), prev.detach(), o["max_iter"], o["tol"], o["stop_mode"])
            if jac_probes:
                zj = z if z.requires_grad else z.detach().requires_grad_()
                stats.jac_loss = jacobian_reg(f_flat(zj), zj, jac_probes)
            return result(z), stats

        solver = get_solver(o["solver"])
        with torch.no_grad(), _autocast_off(x0.device.type):
            z_star, stats = solver(
                f_flat, x0.detach(), max_iter=o["max_iter"], tol=o["tol"], stop_mode=o["stop_mode"],
                trace=o["trace"], **o["solver_options"],
            )
        if not grad:
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
        return result(out), stats


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
