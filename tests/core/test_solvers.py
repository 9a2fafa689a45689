import math

import pytest
import torch

from mdeq.core import SolverStats, anderson, broyden, fixed_point, get_solver, list_solvers
from tests.core.problems import linear_problem, real_spectrum_matrix, tanh_problem

SOLVERS = ["fixed_point", "anderson", "broyden"]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("rho", [0.5, 0.9, 0.99])
def test_linear_maps_reach_tol_and_the_exact_solution(name, rho):
    f, b, exact = linear_problem(60, rho)
    z, stats = get_solver(name)(f, torch.zeros_like(b), max_iter=3000, tol=1e-7, stop_mode="rel")
    assert isinstance(stats, SolverStats)
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.rel_residual <= 1e-7).all()
    # the residual bounds the error of a contraction: ||z - z*|| <= ||f(z) - z|| / (1 - rho)
    err = torch.linalg.vector_norm(z - exact, dim=1)
    assert (err <= stats.abs_residual / (1 - rho) * 1.001 + 1e-12).all()
    assert (err / torch.linalg.vector_norm(exact, dim=1)).max() < 1e-5


@pytest.mark.parametrize("name", SOLVERS)
def test_tanh_map_reaches_abs_tol(name):
    f, b, exact = tanh_problem()
    z, stats = get_solver(name)(f, torch.zeros_like(b), max_iter=500, tol=1e-9, stop_mode="abs")
    assert stats.converged.all()
    assert (stats.abs_residual <= 1e-9).all()
    # the reported residual is the true residual of the returned iterate
    torch.testing.assert_close(stats.abs_residual, torch.linalg.vector_norm(f(z) - z, dim=1))
    torch.testing.assert_close(z, exact, atol=1e-8, rtol=0)


def test_anderson_needs_far_fewer_evaluations_than_fixed_point_at_099():
    f, b, _ = linear_problem(200, 0.99)
    _, fp = fixed_point(f, torch.zeros_like(b), max_iter=5000, tol=1e-4)
    _, aa = anderson(f, torch.zeros_like(b), max_iter=5000, tol=1e-4)
    assert fp.converged.all() and aa.converged.all()
    assert aa.nfe * 2 <= fp.nfe, (aa.nfe, fp.nfe)
    assert (aa.nstep * 2 <= fp.nstep).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_result_of_a_sample_does_not_depend_on_its_batch(name):
    # samples with different contraction rates, so they converge at different steps
    a = real_spectrum_matrix(40, 0.95, seed=3)
    b = torch.randn(5, 40, dtype=torch.float64)
    scale = torch.tensor([0.3, 1.0, 0.6, 0.9, 0.1], dtype=torch.float64)[:, None]

    def f_for(idx):
        bb, ss = b[idx], scale[idx]
        return lambda z: ss * (z @ a.T) + bb

    solve = get_solver(name)
    kw = dict(max_iter=400, tol=1e-6, stop_mode="rel")
    z_all, s_all = solve(f_for(slice(None)), torch.zeros_like(b), **kw)
    assert len(set(s_all.nstep.tolist())) > 2, "samples should converge at different steps"
    for i in range(b.shape[0]):
        z_i, s_i = solve(f_for(slice(i, i + 1)), torch.zeros_like(b[i : i + 1]), **kw)
        torch.testing.assert_close(z_i[0], z_all[i], atol=1e-6, rtol=0)
        assert s_i.nstep.item() == s_all.nstep[i].item()
        assert s_i.converged.item() == s_all.converged[i].item()


@pytest.mark.parametrize("name", SOLVERS)
def test_budget_too_small_returns_best_finite_iterate_and_says_not_converged(name):
    f, b, _ = linear_problem(100, 0.999)
    z, stats = get_solver(name)(f, torch.zeros_like(b), max_iter=8, tol=1e-10)
    assert torch.isfinite(z).all()
    assert not stats.converged.any() and not stats.diverged.any()
    assert stats.nfe == 8
    torch.testing.assert_close(stats.abs_residual, torch.linalg.vector_norm(f(z) - z, dim=1))


@pytest.mark.parametrize("name", SOLVERS)
def test_non_finite_f_stops_the_sample_and_keeps_others(name):
    f_lin, b, exact = linear_problem(20, 0.5, batch=3)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = f_lin(z)
        if calls["n"] >= 3:  # sample 1 blows up from the third evaluation on
            out = out.clone()
            out[1] = float("nan")
        return out

    z, stats = get_solver(name)(f, torch.zeros_like(b), max_iter=200, tol=1e-8)
    assert torch.isfinite(z).all()
    assert stats.diverged.tolist() == [False, True, False]
    assert stats.converged.tolist() == [True, False, True]
    assert torch.isfinite(stats.abs_residual[1])  # the best *finite* iterate is returned for sample 1
    torch.testing.assert_close(z[[0, 2]], exact[[0, 2]], atol=1e-6, rtol=0)


def test_exploding_iteration_is_flagged_diverged():
    f = lambda z: 3.0 * z + 1.0  # noqa: E731  (repelling fixed point: Picard iterates blow up)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    z, stats = fixed_point(f, z0, max_iter=200, tol=1e-8, stop_mode="abs")
    assert torch.isfinite(z).all()
    assert stats.diverged.all() and not stats.converged.any()
    assert stats.nfe < 200  # it stopped instead of running to max_iter


def test_anderson_singular_system_falls_back_to_fixed_point_step():
    # f(z) = z + c: every residual is c, so the Gram matrix is exactly singular without regularisation
    c = torch.ones(2, 4, dtype=torch.float64)
    z, stats = anderson(lambda z: z + c, torch.zeros(2, 4, dtype=torch.float64), max_iter=12, lam=0.0)
    assert torch.isfinite(z).all()
    assert stats.nfe == 12 and not stats.converged.any() and not stats.diverged.any()


def test_list_state_matches_flat_state():
    f_lin, b, exact = linear_problem(24, 0.9, batch=3)

    def f_list(zs):
        flat = torch.cat([zs[0].reshape(3, -1), zs[1].reshape(3, -1)], dim=1)
        out = f_lin(flat)
        return [out[:, :16].reshape(3, 4, 4), out[:, 16:].reshape(3, 2, 2, 2)]

    z0 = [torch.zeros(3, 4, 4, dtype=torch.float64), torch.zeros(3, 2, 2, 2, dtype=torch.float64)]
    for name in SOLVERS:
        z, stats = get_solver(name)(f_list, z0, max_iter=300, tol=1e-8)
        assert isinstance(z, list) and [t.shape for t in z] == [t.shape for t in z0]
        z_flat, s_flat = get_solver(name)(f_lin, torch.zeros_like(b), max_iter=300, tol=1e-8)
        torch.testing.assert_close(torch.cat([z[0].reshape(3, -1), z[1].reshape(3, -1)], 1), z_flat)
        assert stats.nstep.tolist() == s_flat.nstep.tolist()


def test_trace_has_one_residual_per_evaluation_and_z0_is_untouched():
    f, b, _ = linear_problem(10, 0.9, batch=2)
    z0 = torch.zeros_like(b)
    _, stats = fixed_point(f, z0, max_iter=50, tol=1e-6, trace=True)
    assert stats.trace.shape == (2, stats.nfe)
    assert torch.equal(z0, torch.zeros_like(b))
    # fixed-point residuals of a linear contraction decrease monotonically for this symmetric A
    best = stats.trace.gather(1, (stats.nstep - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(best, stats.rel_residual)


def test_fixed_point_damping_converges_where_plain_iteration_oscillates():
    f = lambda z: -1.2 * z + 1.0  # noqa: E731  (fixed point 1/2.2; plain iteration diverges)
    z0 = torch.zeros(1, 3, dtype=torch.float64)
    _, plain = fixed_point(f, z0, max_iter=100, tol=1e-8)
    z, damped = fixed_point(f, z0, max_iter=100, tol=1e-8, damping=0.4)
    assert not plain.converged.any() and damped.converged.all()
    torch.testing.assert_close(z, torch.full_like(z, 1 / 2.2))


def test_registry_and_option_validation():
    assert set(SOLVERS) <= set(list_solvers())
    with pytest.raises(ValueError, match="unknown solver 'newton'.*anderson"):
        get_solver("newton")
    f, b, _ = linear_problem(5, 0.5, batch=1)
    with pytest.raises(TypeError):
        anderson(f, torch.zeros_like(b), history=3)
    with pytest.raises(ValueError, match="stop_mode"):
        fixed_point(f, torch.zeros_like(b), stop_mode="max")
    with pytest.raises(ValueError, match="max_iter"):
        broyden(f, torch.zeros_like(b), max_iter=0)
    with pytest.raises(ValueError, match="damping"):
        fixed_point(f, torch.zeros_like(b), damping=1.5)
    with pytest.raises(TypeError, match="floating point"):
        fixed_point(f, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        fixed_point(lambda z: torch.zeros(1, 6, dtype=z.dtype), torch.zeros(1, 5))


def test_summary_is_plain_floats():
    f, b, _ = linear_problem(10, 0.9, batch=2)
    _, stats = anderson(f, torch.zeros_like(b), max_iter=100, tol=1e-6)
    s = stats.summary()
    assert s["converged"] == 1.0 and s["diverged"] == 0.0
    assert math.isclose(s["nstep"], stats.nstep.float().mean().item())
    assert all(isinstance(v, float) for v in s.values())


def test_diverged_sample_in_rel_mode_returns_its_lowest_abs_residual_iterate():
    # the relative residual of 3z + 1 keeps shrinking while the iterates blow up
    z, stats = fixed_point(lambda z: 3.0 * z + 1.0, torch.zeros(2, 5, dtype=torch.float64), max_iter=200,
                           tol=1e-8, stop_mode="rel")
    assert stats.diverged.all()
    assert torch.equal(z, torch.zeros_like(z))  # z0 has the lowest abs residual (1 per entry)
    assert stats.nstep.tolist() == [1, 1]
    torch.testing.assert_close(stats.abs_residual, torch.full((2,), 5**0.5, dtype=torch.float64))


@pytest.mark.parametrize("name", SOLVERS)
def test_half_precision_state_is_solved_in_float32_and_returned_in_half(name):
    seen = []

    def f(z):
        seen.append(z.dtype)
        return 0.5 * z + 30.0  # ||g|| is large: its square overflows float16

    z, stats = get_solver(name)(f, torch.zeros(2, 100, dtype=torch.float16), max_iter=100, tol=1e-3)
    assert z.dtype == torch.float16 and set(seen) == {torch.float16}
    assert stats.converged.all() and not stats.diverged.any()
    torch.testing.assert_close(z, torch.full_like(z, 60.0), atol=0.2, rtol=0)  # rel tol 1e-3


def test_anderson_damping_and_broyden_restart_still_converge():
    f, b, exact = linear_problem(80, 0.95)
    z, stats = anderson(f, torch.zeros_like(b), max_iter=500, tol=1e-9, damping=0.5, m=4)
    assert stats.converged.all()
    torch.testing.assert_close(z, exact, atol=1e-6, rtol=0)
    z, stats = broyden(f, torch.zeros_like(b), max_iter=500, tol=1e-9, memory=3)  # restarts every 3 updates
    assert stats.converged.all() and stats.nfe > 4
    torch.testing.assert_close(z, exact, atol=1e-6, rtol=0)


def test_list_state_must_share_dtype():
    with pytest.raises(ValueError, match="dtype and device"):
        fixed_point(lambda z: z, [torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.float64)])


def _dense_good_broyden(f, x, max_iter, memory):
    """The textbook "good" Broyden with an explicit inverse Jacobian per sample (restart to -I when `memory`
    updates were made): the iterates the low-rank solver must reproduce."""
    b, d = x.shape
    eye = torch.eye(d, dtype=x.dtype).expand(b, d, d)
    H, made = -eye.clone(), 0
    g = f(x) - x
    xs, dx = [x], g.clone()
    for _ in range(1, max_iter):
        x = x + dx
        g_new = f(x) - x
        xs.append(x)
        dg = g_new - g
        h_dg = (H @ dg[:, :, None])[:, :, 0]
        denom = (dx * h_dg).sum(1, keepdim=True)
        u = (dx - h_dg) / denom
        v = (dx[:, None, :] @ H)[:, 0]
        if made == memory:
            H, made = -eye.clone(), 0
        H = H + u[:, :, None] * v[:, None, :]
        made += 1
        g, dx = g_new, -(H @ g_new[:, :, None])[:, :, 0]
    return xs


@pytest.mark.parametrize("memory", [20, 3])
def test_broyden_iterates_equal_the_dense_textbook_method(memory):
    # the low-rank bookkeeping (one product with H and one with H^T per step) is an exact rewrite
    torch.manual_seed(0)
    A = 0.9 * real_spectrum_matrix(12, 0.9, seed=3).double()
    bias = torch.randn(3, 12, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ A.T + bias)

    x0 = torch.zeros(3, 12, dtype=torch.float64)
    expected = _dense_good_broyden(f, x0, 10, memory)
    _, stats = broyden(f, x0, max_iter=10, tol=0.0, stop_mode="abs", memory=memory, record="all")
    assert len(stats.trajectory) == len(expected) == 10
    for got, want in zip(stats.trajectory, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
