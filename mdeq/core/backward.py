"""Gradients through a fixed point z* = f(z*), for f on (B, D) matrices.

* ``implicit``: exact gradient by the implicit function theorem. The output is one differentiable application
  f(z*); its incoming gradient v is replaced by the solution u of u = J^T u + v (J = df/dz at z*), found by a
  fixed-point solver using vector-Jacobian products. A sample whose backward solve diverges gets u = v (the
  one-step gradient) instead of an unbounded one; ``stats.backward.diverged`` says so. Not twice differentiable. Autograd then carries u through f(z*) to the parameters of
  f and to its inputs (the injection). Nothing is stored on any module, so models stay deep-copyable and
  DDP-friendly, and the saved tensors are those of one application of f, whatever the solver depth.
* ``phantom``: k damped unrolled steps h <- tau f(h) + (1 - tau) h from z* with ordinary autograd
  (Geng et al. 2021); ``one_step`` is k = 1, tau = 1 (Jacobian-free backprop, Fung et al. 2022).

(The official pre-training mode, f applied k times from z0 with ordinary autograd, is the ``unroll`` solver.)
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from .solvers import SolverStats

__all__ = ["implicit", "phantom"]

FlatFn = Callable[[torch.Tensor], torch.Tensor]
BackwardSolve = Callable[[FlatFn, torch.Tensor], Tuple[torch.Tensor, SolverStats]]


class _ImplicitGrad(torch.autograd.Function):
    """Identity in the forward; in the backward, v -> (I - J^T)^-1 v with J the Jacobian of fz w.r.t. z."""

    @staticmethod
    def forward(ctx, fz, z, solve, stats):
        ctx.save_for_backward(fz, z)
        ctx.solve = solve
        ctx.stats = stats
        return fz.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        fz, z = ctx.saved_tensors

        def vjp_plus_grad(u):
            return torch.autograd.grad(fz, z, u, retain_graph=True, materialize_grads=True)[0] + grad

        u, bstats = ctx.solve(vjp_plus_grad, grad)
        if bool(bstats.diverged.any()):
            # no bounded solution (J has an eigenvalue >= 1 there): use the one-step gradient for those samples
            u = torch.where(bstats.diverged.view(-1, 1), grad, u)
        if ctx.stats is not None:
            ctx.stats.backward = bstats
        return u, None, None, None


def implicit(f: FlatFn, z_star: torch.Tensor, solve: BackwardSolve, stats: SolverStats = None):
    """One differentiable application f(z*) with the implicit gradient attached.

    Returns (out, fz, z): ``out`` carries the gradient; ``fz = f(z)`` with ``z`` a leaf copy of z* (for
    regularisers that need f(z*) with z* in the graph). ``stats.backward`` is filled when the backward runs.
    """
    z = z_star.detach().requires_grad_()
    fz = f(z)
    return _ImplicitGrad.apply(fz, z, solve, stats), fz, z


def phantom(f: FlatFn, z_star: torch.Tensor, steps: int, damping: float, z_requires_grad: bool = False):
    """k damped differentiable steps from z*. Returns (out, f(z*), z*) with f(z*) from the first step."""
    z = z_star.detach().requires_grad_(z_requires_grad)
    fz = f(z)
    h = fz if damping == 1 else torch.lerp(z, fz, damping)
    for _ in range(steps - 1):
        h = f(h) if damping == 1 else torch.lerp(h, f(h), damping)
    return h, fz, z

