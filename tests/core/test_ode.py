"""The continuous-DEQ solver "ode": exact fixed points, per-sample stopping, f-evaluation accounting, gradients."""
import math

import pytest
import torch
from torch import nn

from mdeq.core import DEQ, anderson, get_solver, list_solvers
from mdeq.core.solvers.ode import TABLEAUS, ode
from tests.core.problems import linear_problem, real_spectrum_matrix, tanh_problem

METHODS = ["bosh3", "dopri5"]
COST = {name: tab.stages - 1 for name, tab in TABLEAUS.items()}  # f-evaluations per step (FSAL)


def counting(f):
    """f that counts its calls in ``.calls``."""

    def g(z):
        g.calls += 1
        return f(z)

    g.calls = 0
    return g


def test_tableaus_have_their_order_and_fsal_cost():
    assert COST == {"bosh3": 3, "dopri5": 6}
    orders = {"bosh3": (3, 2), "dopri5": (5, 4)}
    for name, tab in TABLEAUS.items():
        s = tab.stages
        a = torch.zeros(s, s, dtype=torch.float64)
        for i, row in enumerate(tab.a):
            a[i + 1, : len(row)] = torch.tensor(row, dtype=torch.float64)
        b = torch.tensor(list(tab.a[-1]) + [0.0], dtype=torch.float64)  # FSAL: the last row of A is b
        bhat = b - torch.tensor(tab.err, dtype=torch.float64)
        assert tab.q == orders[name][1]
        # linear order conditions b^T A^(k-1) 1 = 1/k! (the stability polynomial matches exp to order p)
        for weights, order in zip((b, bhat), orders[name]):
            v = torch.ones(s, dtype=torch.float64)
            for k in range(1, order + 1):
                assert abs(weights @ v - 1 / math.factorial(k)) < 1e-12, (name, order, k)
                v = a @ v
            assert abs(weights @ v - 1 / math.factorial(order + 1)) > 1e-6, (name, order)  # and not higher


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_linear_maps_reach_the_exact_fixed_point(method, rho):
    f, b, exact = linear_problem(60, rho)
    z, stats = ode(f, torch.zeros_like(b), max_iter=3000, tol=1e-9, method=method)
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.rel_residual <= 1e-9).all()
    # the residual bounds the error of a contraction: ||z - z*|| <= ||f(z) - z|| / (1 - rho)
    err = torch.linalg.vector_norm(z - exact, dim=1)
    assert (err <= stats.abs_residual / (1 - rho) * 1.001 + 1e-12).all()
    assert (err / torch.linalg.vector_norm(exact, dim=1)).max() < 1e-7
    torch.testing.assert_close(stats.abs_residual, torch.linalg.vector_norm(f(z) - z, dim=1))


@pytest.mark.parametrize("method", METHODS)
def test_tanh_map_reaches_the_fixed_point_in_abs_mode(method):
    f, b, exact = tanh_problem()
    z, stats = ode(f, torch.zeros_like(b), max_iter=1000, tol=1e-10, stop_mode="abs", method=method)
    assert stats.converged.all() and (stats.abs_residual <= 1e-10).all()
    torch.testing.assert_close(z, exact, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem", ["linear", "tanh"])
def test_agrees_with_anderson_at_a_training_tolerance(method, problem):
    f, b, _ = linear_problem(40, 0.9) if problem == "linear" else tanh_problem()
    z_ode, s_ode = ode(f, torch.zeros_like(b), max_iter=1000, tol=1e-6, method=method)
    z_aa, s_aa = anderson(f, torch.zeros_like(b), max_iter=1000, tol=1e-6)
    assert s_ode.converged.all() and s_aa.converged.all()
    rel = torch.linalg.vector_norm(z_ode - z_aa, dim=1) / torch.linalg.vector_norm(z_aa, dim=1)
    assert rel.max() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_converges_where_picard_iteration_diverges(method):
    # J = -1.2: |J| > 1, so Picard oscillates and blows up, but Re(J) < 1, so the flow dz/dt = f(z) - z is stable
    c = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda z: -1.2 * z + c  # noqa: E731
    _, picard = get_solver("fixed_point")(f, torch.zeros_like(c), max_iter=200, tol=1e-8)
    z, stats = ode(f, torch.zeros_like(c), max_iter=400, tol=1e-8, method=method)
    assert picard.diverged.all()
    assert stats.converged.all()
    torch.testing.assert_close(z, c / 2.2, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_result_of_a_sample_does_not_depend_on_its_batch_and_nstep_counts_evaluations(method):
    # samples with different contraction rates, so they stop at different evaluations
    a = real_spectrum_matrix(40, 0.95, seed=3)
    b = torch.randn(5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scale = torch.tensor([0.3, 1.0, 0.6, 0.9, 0.1], dtype=torch.float64)[:, None]

    def f_for(idx):
        bb, ss = b[idx], scale[idx]
        return counting(lambda z: ss * (z @ a.T) + bb)

    kw = dict(max_iter=1000, tol=1e-6, method=method)
    f_all = f_for(slice(None))
    z_all, s_all = ode(f_all, torch.zeros_like(b), **kw)
    assert s_all.converged.all()
    assert len(set(s_all.nstep.tolist())) > 2, "samples should converge at different evaluations"
    assert s_all.nfe == f_all.calls == s_all.nstep.max().item()
    # a sample's result is an evaluated state: z0 (evaluation 1) or the end of a step (1 + k * cost)
    assert all((n - 1) % COST[method] == 0 for n in s_all.nstep.tolist())
    for i in range(b.shape[0]):
        f_i = f_for(slice(i, i + 1))
        z_i, s_i = ode(f_i, torch.zeros_like(b[i : i + 1]), **kw)
        torch.testing.assert_close(z_i[0], z_all[i], atol=1e-6, rtol=0)
        assert s_i.nstep.item() == s_all.nstep[i].item() == s_i.nfe == f_i.calls
        assert s_i.converged.item()


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_is_a_budget_of_f_evaluations(method):
    f_lin, b, _ = linear_problem(30, 0.999)
    for max_iter in range(1, 16):
        f = counting(f_lin)
        z, stats = ode(f, torch.zeros_like(b), max_iter=max_iter, tol=1e-12, method=method)
        assert f.calls == stats.nfe <= max_iter
        # steps are whole: the loop stops when the next one would not fit in the budget
        assert f.calls == 1 + COST[method] * ((max_iter - 1) // COST[method])
        assert torch.isfinite(z).all() and not stats.converged.any() and not stats.diverged.any()
        torch.testing.assert_close(stats.abs_residual, torch.linalg.vector_norm(f_lin(z) - z, dim=1))


def test_trace_has_one_residual_per_evaluation_and_z0_is_untouched():
    f, b, _ = linear_problem(10, 0.9, batch=2)
    z0 = torch.zeros_like(b)
    _, stats = ode(f, z0, max_iter=300, tol=1e-6, trace=True)
    assert torch.equal(z0, torch.zeros_like(b))
    assert stats.trace.shape == (2, stats.nfe)
    best = stats.trace.gather(1, (stats.nstep - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(best, stats.rel_residual)


def test_a_rejected_step_keeps_the_state_and_retries_with_a_smaller_step():
    f, b, exact = linear_problem(20, 0.9, batch=2)
    z, stats = ode(f, torch.zeros_like(b), max_iter=600, tol=1e-8, h0=50.0, record="all")
    assert stats.converged.all()
    torch.testing.assert_close(z, exact, atol=1e-6, rtol=0)
    steps = stats.trajectory
    assert len(steps) == 1 + (stats.nfe - 1) // COST["bosh3"]  # one recorded state per step, z0 included
    assert torch.equal(steps[1], steps[0])  # h = 50 is far too large: the first step is rejected everywhere
    assert not torch.equal(steps[-1], steps[0])
    # a step-size cap costs evaluations but changes nothing else
    z_cap, s_cap = ode(f, torch.zeros_like(b), max_iter=3000, tol=1e-8, max_step=0.3)
    assert s_cap.converged.all() and s_cap.nfe > stats.nfe
    torch.testing.assert_close(z_cap, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_f_stops_the_sample_and_keeps_others(method):
    f_lin, b, exact = linear_problem(20, 0.5, batch=3)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = f_lin(z)
        if calls["n"] >= 3:  # sample 1 blows up from the third evaluation on (inside the first step)
            out = out.clone()
            out[1] = float("nan")
        return out

    z, stats = ode(f, torch.zeros_like(b), max_iter=500, tol=1e-8, method=method)
    assert torch.isfinite(z).all()
    assert stats.diverged.tolist() == [False, True, False]
    assert stats.converged.tolist() == [True, False, True]
    assert torch.isfinite(stats.abs_residual[1])
    torch.testing.assert_close(z[[0, 2]], exact[[0, 2]], atol=1e-6, rtol=0)


def test_half_precision_and_list_states():
    seen = []

    def f(z):
        seen.append(z.dtype)
        return 0.5 * z + 30.0

    z, stats = ode(f, torch.zeros(2, 100, dtype=torch.float16), max_iter=200, tol=1e-3)
    assert z.dtype == torch.float16 and set(seen) == {torch.float16}
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full_like(z, 60.0), atol=0.2, rtol=0)

    f_lin, b, _ = linear_problem(24, 0.9, batch=3)

    def f_list(zs):
        out = f_lin(torch.cat([zs[0].reshape(3, -1), zs[1].reshape(3, -1)], dim=1))
        return [out[:, :16].reshape(3, 4, 4), out[:, 16:].reshape(3, 2, 2, 2)]

    z0 = [torch.zeros(3, 4, 4, dtype=torch.float64), torch.zeros(3, 2, 2, 2, dtype=torch.float64)]
    z, stats = ode(f_list, z0, max_iter=600, tol=1e-8)
    z_flat, s_flat = ode(f_lin, torch.zeros_like(b), max_iter=600, tol=1e-8)
    torch.testing.assert_close(torch.cat([z[0].reshape(3, -1), z[1].reshape(3, -1)], 1), z_flat)
    assert stats.nstep.tolist() == s_flat.nstep.tolist()


# ---------------------------------------------------------------------------------------- DEQ and gradients
class Cell(nn.Module):
    """f(z, x) = act(W z + U x + c) with ||W|| < 1: act = tanh (nonlinear) or identity (linear)."""

    def __init__(self, act, dim=8, in_dim=5, lipschitz=0.8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(lipschitz * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(dim, in_dim, generator=g, dtype=torch.float64) / in_dim**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=torch.float64))
        self.act = act

    def forward(self, z, x):
        return self.act(z @ self.W.T + x @ self.U.T + self.c)


def _problem(kind):
    cell = Cell(torch.tanh if kind == "tanh" else (lambda t: t))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    target = torch.randn(3, 8, generator=g, dtype=torch.float64)
    return cell, x, target


def _exact_gradients(cell, x, target):
    """dL/d(W, U, c, x), L = ||z* - target||^2, by the implicit function theorem with dense Jacobians:
    dL/dtheta = dL/dz (I - J)^-1 df/dtheta at z* (z* from Anderson at 1e-14)."""
    params = [cell.W, cell.U, cell.c]
    with torch.no_grad():
        z_star, _ = anderson(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64), max_iter=500,
                             tol=1e-14)
    grads = [torch.zeros_like(p) for p in params] + [torch.zeros_like(x)]
    eye = torch.eye(8, dtype=torch.float64)
    for i in range(x.shape[0]):
        zi, xi = z_star[i], x[i].detach().clone().requires_grad_()
        jac = torch.autograd.functional.jacobian(lambda z: cell(z[None], xi[None].detach())[0], zi)
        u = torch.linalg.solve((eye - jac).T, 2 * (zi - target[i]))  # u^T = dL/dz (I - J)^-1
        *g_params, g_x = torch.autograd.grad(cell(zi[None], xi[None])[0], params + [xi], u)
        for acc, gi in zip(grads, g_params):
            acc += gi
        grads[-1][i] = g_x
    return grads


def _deq_gradients(cell, x, target, **options):
    x = x.detach().clone().requires_grad_()
    cell.zero_grad()
    z, stats = DEQ(**options)(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64))
    ((z - target) ** 2).sum().backward()
    return [cell.W.grad.clone(), cell.U.grad.clone(), cell.c.grad.clone(), x.grad.clone()], stats


def _rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.mark.parametrize("kind", ["linear", "tanh"])
def test_deq_with_ode_gives_the_exact_implicit_gradient(kind):
    cell, x, target = _problem(kind)
    exact = _exact_gradients(cell, x, target)
    if kind == "linear":  # cross-check the dense IFT reference against differentiating the closed form
        xr = x.detach().clone().requires_grad_()
        cell.zero_grad()
        eye = torch.eye(8, dtype=torch.float64)
        z = torch.linalg.solve(eye - cell.W, (xr @ cell.U.T + cell.c).T).T
        ((z - target) ** 2).sum().backward()
        for e, r in zip(exact, [cell.W.grad, cell.U.grad, cell.c.grad, xr.grad]):
            assert _rel(e, r) < 1e-10
    common = dict(max_iter=2000, tol=1e-11, backward="ift", b_max_iter=2000, b_tol=1e-11)
    got, stats = _deq_gradients(cell, x, target, solver="ode", **common)
    assert stats.solver == "ode" and stats.converged.all() and stats.backward.converged.all()
    ref, _ = _deq_gradients(cell, x, target, solver="anderson", **common)
    got_b, stats_b = _deq_gradients(cell, x, target, solver="ode", b_solver="ode", **common)
    assert stats_b.backward.solver == "ode" and stats_b.backward.converged.all()
    for g, r, gb, e in zip(got, ref, got_b, exact):
        assert _rel(g, e) < 1e-4
        assert _rel(gb, e) < 1e-4
        assert _rel(g, r) < 1e-6


def test_registered_and_options_are_validated():
    assert "ode" in list_solvers() and get_solver("ode") is ode
    f, b, _ = linear_problem(5, 0.5, batch=1)
    z0 = torch.zeros_like(b)
    with pytest.raises(ValueError, match=r"method must be one of \['bosh3', 'dopri5'\], got 'rk45'"):
        ode(f, z0, method="rk45")
    for name, bad in [("rtol", 0.0), ("rtol", -1e-3), ("atol", 0), ("atol", float("nan")), ("h0", 0.0),
                      ("h0", float("inf")), ("rtol", True)]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            ode(f, z0, **{name: bad})
    for bad in [0, -1.0, "1", True]:
        with pytest.raises(ValueError, match="max_step must be a number > 0 or None"):
            ode(f, z0, max_step=bad)
    with pytest.raises(ValueError, match="max_iter"):
        ode(f, z0, max_iter=0)
    with pytest.raises(ValueError, match="stop_mode"):
        ode(f, z0, stop_mode="max")
    with pytest.raises(TypeError):
        ode(f, z0, order=3)
    _, stats = ode(f, z0, max_step=float("inf"), h0=0.5)  # an infinite cap is no cap
    assert stats.converged.all()
    with torch.no_grad():  # usable by name through DEQ, forward and backward
        z, stats = DEQ(solver="ode", b_solver="ode", max_iter=300, tol=1e-8)(f, z0)
    assert stats.solver == "ode" and stats.converged.all()
