"""Model-agnostic DEQ machinery: solvers, the DEQ layer, gradients, regularisers, weight norm, dropout."""
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
    "jacobian_reg", "power_method", "fixed_point_correction",
    "apply_weight_norm", "remove_weight_norm", "cached_weights",
    "VariationalDropout", "reset_dropout", "forward_scope",
]
