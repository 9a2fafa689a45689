"""Fixed-point solvers for z = f(z), one file each, on shared bookkeeping and one registry.

Every solver is a function ``solver(f, z0, *, max_iter, tol, stop_mode, trace, **options) -> (z, stats)``:

* ``z0`` is a tensor of shape (B, ...) or a list of such tensors; ``f`` maps a state of that structure to
  one of the same structure. Internally the state is a (B, D) matrix.
* The residual of an iterate z_k is measured per sample when f(z_k) is evaluated:
  ``abs = ||f(z_k) - z_k||_2`` and ``rel = abs / (||f(z_k)||_2 + 1e-8)``; ``stop_mode`` picks which one is
  compared with ``tol``.
* **Stopping is per sample.** A sample stops when its residual is ``<= tol`` (converged), when its residual is
  not finite, or when its abs residual grew past ``divergence_factor`` times its first one (diverged). A stopped
  sample is frozen: its result is never updated again, so it does not depend on the other samples in the batch.
  The loop ends when every sample has stopped or after ``max_iter`` evaluations of f.
* The returned state is, per sample, the iterate with the lowest residual seen before it stopped (z0 included),
  so it is always finite when z0 is. A *diverged* sample returns its iterate with the lowest absolute residual
  instead: while an iteration blows up its relative residual can keep shrinking, which would otherwise select
  the largest iterate. ``SolverStats`` says how the result was reached.
* The solver state is float32 when z0 is float16/bfloat16 (float64 stays float64); f is called in z0's dtype
  and the result is returned in it.
* ``return_f=True`` returns f(z*) instead of z*, with no extra evaluation (f of the best iterate was computed
  to measure its residual); the stats still describe z*. A budget of k evaluations then ends in f's output.
* ``record`` (every solver that takes it): ``"all"`` or a list of iterate indices (0 = z0) keeps those iterates,
  detached, in ``stats.trajectory`` (states in z0's structure and dtype) with their indices in
  ``stats.trajectory_steps``: the data of fixed-point correction and consistency distillation. Iterates are the
  batch's: a sample that stopped keeps its result, but the batch's later iterates are still recorded for it.

Solvers run under ``torch.no_grad()`` (except ``unroll``, which is differentiable): gradients through a fixed
point are ``DEQ``'s job.

Rooms: ``bookkeeping`` (per-sample stopping, best iterate, ``SolverStats``), ``registry`` (the common options,
``register_solver``, what each solver declares), then one file per solver: ``fixed_point``, ``anderson``,
``broyden``, ``ode`` (continuous DEQ), ``consistency`` (C-DEQ inference), ``unroll`` (pre-training). A new solver
is one file here that calls ``register_solver``, plus its import below.
"""
from .bookkeeping import NORM_EPS, STOP_MODES, Progress, Record, SolverStats, flatten, residual_norms
from .registry import (COMMON_OPTIONS, SolverSpec, call_time_inputs, get_solver, list_solvers, register_solver,
                       root_solvers, solver_options, solver_spec)
from .fixed_point import fixed_point
from .anderson import anderson
from .broyden import broyden
from .ode import ode
from .consistency import consistency
from .unroll import unroll

__all__ = [
    "SolverStats", "SolverSpec", "Progress", "Record", "STOP_MODES", "NORM_EPS", "COMMON_OPTIONS", "flatten",
    "residual_norms", "register_solver", "get_solver", "solver_spec", "list_solvers", "solver_options",
    "call_time_inputs", "root_solvers",
    "fixed_point", "anderson", "broyden", "ode", "consistency", "unroll",
]
