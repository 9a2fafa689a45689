"""The solver registry: what each solver takes, needs and can do, declared once when it registers.

A solver is a function ``solver(f, z0, *, <options>) -> (z, SolverStats)``. ``register_solver`` records a
``SolverSpec`` and returns the public function, which fills in defaults and validates the options it is given
(an unknown option is an error, never ignored) before running the solver. ``DEQ`` validates its settings
once, when they are set, and then calls ``spec.run`` directly, so a forward pass does not check them again.

The options every solver understands (``COMMON_OPTIONS``) are declared here; a solver declares its own in
``options=`` (default, check, doc) and may change a common default (``defaults=``). What the rest of the
package may ask of a solver is a field of its spec, never its name:

* ``needs``: objects it is handed at call time (the C-DEQ ``student``), not settings;
* ``can_record`` / ``can_return_f``: whether it takes ``record=`` (keep iterates) and ``return_f=`` (return
  f(z*) at no cost);
* ``evals_per_step``: f-evaluations per step (a function of its options);
* ``fixed_budget``: options under which all ``max_iter`` evaluations run (no early stop), and
  ``exact_budget``: whether any budget k is met exactly (an ODE solver takes whole Runge-Kutta steps);
* ``differentiable``: it runs under autograd and its result carries its own gradient (``unroll``), so ``DEQ``
  attaches no backward.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from ..options import Option, above_one, flag, nonnegative, one_of, positive_int, record_spec
from .bookkeeping import STOP_MODES

__all__ = ["COMMON_OPTIONS", "SolverSpec", "register_solver", "get_solver", "solver_spec", "list_solvers",
           "solver_options", "call_time_inputs", "root_solvers"]

COMMON_OPTIONS: Dict[str, Option] = {
    "max_iter": Option(50, positive_int, "f-evaluations at most (the solver's budget)"),
    "tol": Option(1e-4, nonnegative, "a sample stops when its residual (in stop_mode) is <= tol"),
    "stop_mode": Option("rel", one_of(*STOP_MODES), "residual compared with tol: 'abs' ||f(z) - z|| or 'rel' "
                                                    "||f(z) - z|| / ||f(z)||"),
    "trace": Option(False, flag, "keep the residual of every evaluation in stats.trace"),
    "divergence_factor": Option(1e6, above_one, "a sample whose abs residual exceeds this factor times its first "
                                                "one stops as diverged"),
    "record": Option(None, record_spec, "'all' or iterate indices (0 = z0) to keep in stats.trajectory"),
    "return_f": Option(False, flag, "return f(z*), computed anyway for its residual, instead of z*"),
}


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its implementation, its options (with defaults and checks) and its capabilities."""

    name: str
    run: Callable = field(repr=False)  # the implementation; every option resolved and validated
    options: Mapping[str, Option] = field(repr=False)
    needs: Tuple[str, ...] = ()
    evals_per_step: Callable[[Mapping[str, Any]], int] = field(default=lambda options: 1, repr=False)
    fixed_budget: Mapping[str, Any] = field(default_factory=lambda: {"tol": 0.0})
    exact_budget: bool = True
    differentiable: bool = False

    @property
    def can_record(self) -> bool:
        return "record" in self.options

    @property
    def can_return_f(self) -> bool:
        return "return_f" in self.options

    @property
    def finds_roots(self) -> bool:
        """Solves any fixed point from f and z0 alone (not differentiable, needs nothing at call time): what the
        implicit backward and a teacher trajectory need."""
        return not (self.differentiable or self.needs)

    @property
    def stops_at_tol(self) -> bool:
        """Stops a sample once its residual meets ``tol`` (its fixed budget sets ``tol`` 0); the others always
        take ``max_iter`` steps (an unrolled stack, a distilled student)."""
        return "tol" in self.fixed_budget

    def defaults(self) -> Dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def resolve(self, given: Mapping[str, Any]) -> Dict[str, Any]:
        """The defaults overridden by ``given``, each given value validated; objects in ``needs`` pass through.
        An unknown name is a ``TypeError``, as for any function called with an unexpected keyword."""
        unknown = sorted(set(given) - set(self.options) - set(self.needs))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for solver {self.name!r}; it takes "
                             f"{sorted(self.options) + list(self.needs)}")
        out = {**self.defaults(), **{k: None for k in self.needs}}
        for key, value in given.items():
            if key in self.options:
                self.options[key].check(key, value)
            out[key] = value
        return out


_REGISTRY: Dict[str, SolverSpec] = {}
_PUBLIC: Dict[str, Callable] = {}  # name -> the public (validating) function


def register_solver(name: str, *, options: Optional[Mapping[str, Option]] = None,
                    defaults: Optional[Mapping[str, Any]] = None, needs: Tuple[str, ...] = (),
                    evals_per_step: Union[int, Callable[[Mapping[str, Any]], int]] = 1,
                    fixed_budget: Optional[Mapping[str, Any]] = None, exact_budget: bool = True,
                    differentiable: bool = False):
    """Decorator adding a solver to the registry used by ``get_solver`` and ``DEQ(solver=name)``.

    The solver's keyword-only parameters are its options. Each one is a common option (``COMMON_OPTIONS``),
    one declared in ``options`` ({name: Option(default, check, doc)}), or an object named in ``needs``. A default
    written in the signature is used as the option's default (for solvers written outside this package); the
    built-in solvers keep theirs in the declarations only. ``defaults`` changes common defaults for this solver.
    Returns the public function: it validates the options it is given, fills in the defaults and runs.
    """
    own = dict(options or {})

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered")
        declared: Dict[str, Option] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in needs:
                continue
            opt = own.get(p.name) or COMMON_OPTIONS.get(p.name)
            if opt is None:
                raise ValueError(f"solver {name!r}: option {p.name!r} is neither common ({sorted(COMMON_OPTIONS)}) "
                                 f"nor declared in options= (a default, a check and a line of documentation)")
            if defaults and p.name in defaults:
                opt = Option(defaults[p.name], opt.check, opt.doc)
            if p.default is not inspect.Parameter.empty:
                opt = Option(p.default, opt.check, opt.doc)
            declared[p.name] = opt
        for key in set(own) - set(declared):
            raise ValueError(f"solver {name!r}: declared option {key!r} is not a keyword-only parameter")
        per_step = evals_per_step if callable(evals_per_step) else (lambda o, n=int(evals_per_step): n)
        spec = SolverSpec(name=name, run=fn, options=declared, needs=tuple(needs), evals_per_step=per_step,
                          fixed_budget=dict({"tol": 0.0} if fixed_budget is None else fixed_budget),
                          exact_budget=exact_budget, differentiable=differentiable)

        @functools.wraps(fn)
        def solve(f, z0, **given):
            return fn(f, z0, **spec.resolve(given))

        params = [inspect.Parameter("f", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter("z0", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=o.default) for k, o in declared.items()]
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in needs]
        solve.__signature__ = inspect.Signature(params)
        solve.spec = spec
        _REGISTRY[name], _PUBLIC[name] = spec, solve
        return solve

    return deco


def solver_spec(name: str) -> SolverSpec:
    """The ``SolverSpec`` registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(_REGISTRY)}") from None


def get_solver(name: str) -> Callable:
    """The public function of the solver registered under ``name`` (validates its options)."""
    solver_spec(name)  # the error for an unknown name
    return _PUBLIC[name]


def list_solvers() -> List[str]:
    return sorted(_REGISTRY)


def root_solvers() -> List[str]:
    """The registered solvers that ``finds_roots``."""
    return [name for name in sorted(_REGISTRY) if _REGISTRY[name].finds_roots]


def call_time_inputs() -> Set[str]:
    """Every object some registered solver needs at call time (``SolverSpec.needs``), e.g. {'student'}."""
    return {k for spec in _REGISTRY.values() for k in spec.needs}


def solver_options(name: str) -> Dict[str, Any]:
    """Keyword options a solver takes, with their defaults (objects it needs at call time: None)."""
    spec = solver_spec(name)
    return {**spec.defaults(), **{k: None for k in spec.needs}}
