"""Model-agnostic DEQ machinery; imports torch only and knows nothing about images.

Rooms: ``solvers/`` (one file per solver on shared bookkeeping and a registry), ``deq`` (the DEQ layer and its
settings), ``backward`` (implicit and phantom gradients), ``options`` (declared settings and their checks),
``regularizers`` (Jacobian penalty, power method, fixed-point correction), ``consistency`` (the C-DEQ student
and its time grid), ``distillation`` (training that student), ``norm`` / ``dropout`` / ``scope`` (weight norm and
variational dropout computed once per forward), ``state`` (packing list states into (B, D) matrices).
"""
from .consistency import ConsistencyFunction, MLPGenerator, karras_times
from .deq import BACKWARDS, DEQ, DEQ_OPTIONS, INITS, budget_options, check_deq_options, merge_deq_options
from .distillation import collect_trajectory, consistency_losses, distillation_loss, make_ema
from .dropout import VariationalDropout, reset_dropout
from .norm import apply_weight_norm, cached_weights, remove_weight_norm
from .options import Option
from .regularizers import fixed_point_correction, jacobian_reg, power_method
from .scope import forward_scope
from .solvers import (SolverSpec, SolverStats, anderson, broyden, consistency, fixed_point, get_solver, list_solvers,
                      ode, register_solver, solver_options, solver_spec, unroll)
from .state import StatePacker

__all__ = [
    "DEQ", "DEQ_OPTIONS", "BACKWARDS", "INITS", "merge_deq_options", "check_deq_options", "budget_options", "Option",
    "SolverStats", "SolverSpec", "StatePacker",
    "fixed_point", "anderson", "broyden", "ode", "consistency", "unroll", "get_solver", "solver_spec", "list_solvers",
    "register_solver", "solver_options",
    "ConsistencyFunction", "MLPGenerator", "karras_times", "consistency_losses", "distillation_loss", "make_ema",
    "collect_trajectory",
    "jacobian_reg", "power_method", "fixed_point_correction",
    "apply_weight_norm", "remove_weight_norm", "cached_weights",
    "VariationalDropout", "reset_dropout", "forward_scope",
]
