"""Model-agnostic DEQ machinery: solvers, the DEQ layer, gradients, regularisers, weight norm, dropout."""
from . import consistency, ode  # noqa: F401  (register the solvers "consistency" and "ode")
from .consistency import (ConsistencyFunction, MLPGenerator, collect_trajectory, consistency_losses, distillation_loss,
                          karras_times, make_ema)
from .deq import BACKWARDS, DEQ
from .dropout import VariationalDropout, reset_dropout
from .norm import apply_weight_norm, cached_weights, remove_weight_norm
from .regularizers import fixed_point_correction, jacobian_reg, power_method
from .scope import forward_scope
from .solvers import SolverStats, anderson, broyden, fixed_point, get_solver, list_solvers, register_solver
from .state import StatePacker

__all__ = [
    "DEQ", "BACKWARDS", "SolverStats", "StatePacker",
    "fixed_point", "anderson", "broyden", "get_solver", "list_solvers", "register_solver",
    "ConsistencyFunction", "MLPGenerator", "karras_times", "consistency_losses", "distillation_loss", "make_ema",
    "collect_trajectory",
    "jacobian_reg", "power_method", "fixed_point_correction",
    "apply_weight_norm", "remove_weight_norm", "cached_weights",
    "VariationalDropout", "reset_dropout", "forward_scope",
]
