import pytest
import torch
from torch import nn

from mdeq.core import fixed_point_correction, jacobian_reg, power_method
from tests.core.problems import real_spectrum_matrix


def _cell(dim=6, in_dim=4):
    torch.manual_seed(1)
    lin = nn.Linear(dim, dim).double()
    inj = torch.randn(2, dim, dtype=torch.float64)
    return lin, (lambda z: torch.tanh(lin(z) + inj))


def _exact_frobenius_per_dim(f, z):
    """||J||_F^2 / d averaged over the batch, from dense Jacobians."""
    total = 0.0
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda zi: f(zi[None].expand(z.shape[0], -1))[i], z[i].detach())
        total += (jac**2).sum()
    return total / z.numel()


def test_hutchinson_estimate_is_unbiased():
    lin, f = _cell()
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    fz = f(z)
    exact = _exact_frobenius_per_dim(f, z)
    estimate = jacobian_reg(fz, z, n_probes=4000, create_graph=False)
    assert abs(estimate.item() - exact.item()) / exact.item() < 0.05
    # a single probe is a noisy but unbiased draw: its mean over many draws converges too
    draws = torch.stack([jacobian_reg(fz, z, n_probes=1, create_graph=False) for _ in range(2000)])
    assert abs(draws.mean().item() - exact.item()) / exact.item() < 0.05
    assert draws.std() > 0.01 * exact


def test_jacobian_penalty_gradient_reaches_parameters_and_matches_exact_direction():
    lin, f = _cell()
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    est = jacobian_reg(f(z), z, n_probes=3000)
    g_est = torch.autograd.grad(est, lin.weight)[0]
    g_exact = torch.autograd.grad(_exact_frobenius_with_graph(f, z), lin.weight)[0]
    assert g_est.abs().sum() > 0
    cos = (g_est.flatten() @ g_exact.flatten()) / (g_est.norm() * g_exact.norm())
    assert cos > 0.95


def _exact_frobenius_with_graph(f, z):
    total = 0.0
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda zi: f(zi[None].expand(z.shape[0], -1))[i], z[i].detach(),
                                                 create_graph=True)
        total = total + (jac**2).sum()
    return total / z.numel()


def test_jacobian_reg_works_on_list_states_and_validates_input():
    a = real_spectrum_matrix(6, 0.5)
    z = [torch.randn(2, 2, dtype=torch.float64, requires_grad=True), torch.randn(2, 4, dtype=torch.float64,
                                                                              requires_grad=True)]
    flat = torch.cat(z, 1)
    out = flat @ a.T
    fz = [out[:, :2], out[:, 2:]]
    est = jacobian_reg(fz, z, n_probes=3000, create_graph=False)
    exact = (a**2).sum() / 6  # linear map: J = A for every sample
    assert abs(est.item() - exact.item()) / exact.item() < 0.05
    with pytest.raises(ValueError, match="requires_grad"):
        jacobian_reg(out, flat.detach())
    with pytest.raises(ValueError, match="n_probes"):
        jacobian_reg(out, flat, n_probes=0)


def test_power_method_finds_the_spectral_radius():
    a = real_spectrum_matrix(30, 0.8)
    a = a + torch.diag(torch.zeros(30, dtype=torch.float64).index_fill_(0, torch.tensor([3]), 0.15))
    rho_exact = torch.linalg.eigvalsh(a).abs().max()
    z = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    v, rho = power_method(z @ a.T, z, n_iters=300)
    assert v.shape == (3, 30) and rho.shape == (3,)
    torch.testing.assert_close(rho, rho_exact.expand(3), atol=1e-3, rtol=0)


def test_fixed_point_correction_weights():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    out = fixed_point_correction(losses, gamma=0.5)
    assert out.item() == pytest.approx(0.25 * 1 + 0.5 * 2 + 1 * 4)
    with pytest.raises(ValueError):
        fixed_point_correction([], gamma=0.5)
