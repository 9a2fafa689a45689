"""Regularisers of DEQ training: Jacobian (Frobenius) penalty, spectral-radius estimate, fixed-point correction.

``fz`` and ``z`` are a state (tensor (B, ...) or list of tensors) and f(z) computed *with z in the graph*,
e.g. the differentiable application f(z*) that ``DEQ`` makes at the equilibrium.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .state import State, StatePacker

__all__ = ["jacobian_reg", "power_method", "fixed_point_correction"]


def _as_list(state: State):
    return [state] if isinstance(state, torch.Tensor) else list(state)


def jacobian_reg(fz: State, z: State, n_probes: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / d, averaged over the batch (d = state size per sample).

    For probes eps ~ N(0, I): E ||eps^T J||^2 = ||J||_F^2. Returns
    sum_probes ||eps^T J||^2 / (n_probes * B * d), differentiable in the parameters of f when
    ``create_graph`` (the Jacobian regularisation loss of Bai et al. 2021).
    """
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    fz_l, z_l = _as_list(fz), _as_list(z)
    if len(fz_l) != len(z_l):
        raise ValueError(f"fz has {len(fz_l)} tensors but z has {len(z_l)}; they must have the same structure")
    if not all(t.requires_grad for t in z_l):
        raise ValueError("z must be part of the autograd graph of fz (requires_grad), e.g. f(z) computed from z")
    numel = sum(t.numel() for t in z_l)
    total = fz_l[0].new_zeros(())
    for i in range(n_probes):
        probes = [torch.randn_like(t) for t in fz_l]
        vjp = torch.autograd.grad(
            fz_l, z_l, probes, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        total = total + sum((v.float() ** 2).sum() for v in vjp if v is not None)
    return total / (n_probes * numel)


def power_method(fz: State, z: State, n_iters: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Estimate the spectral radius of J_f(z) per sample by power iteration on v <- v^T J.

    Returns (v, rho): the last normalised iterate (B, D) and the per-sample estimate ||v^T J|| (B,), which
    converges to the largest |eigenvalue| when it is isolated. Uses vector-Jacobian products only.
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}")
    fz_l, z_l = _as_list(fz), _as_list(z)
    packer = StatePacker(z_l)
    v = torch.randn(packer.batch_size, packer.dim, device=z_l[0].device, dtype=z_l[0].dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    rho = v.new_zeros(packer.batch_size)
    for _ in range(n_iters):
        vjp = torch.autograd.grad(fz_l, z_l, packer.unpack(v), retain_graph=True, allow_unused=True)
        w = packer.pack([torch.zeros_like(t) if g is None else g for g, t in zip(vjp, z_l)]).detach()
        rho = torch.linalg.vector_norm(w, dim=1)
        v = w / rho.clamp_min(1e-30)[:, None]
    return v, rho


def fixed_point_correction(losses: Sequence[torch.Tensor], gamma: float = 0.8) -> torch.Tensor:
    """Weighted sum of the losses of states along a solver trajectory (Bai et al. 2022, DEQ-Flow).

    With n losses (earliest first) the weights are gamma^(n-1-i), so the last state weighs 1.
    """
    if len(losses) == 0:
        raise ValueError("fixed_point_correction needs at least one loss")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    n = len(losses)
    return sum(gamma ** (n - 1 - i) * loss for i, loss in enumerate(losses))
