"""Trajectory recorder, budgets (final_step / return_f), initial guesses and fixed-point correction in the core."""
import pytest
import torch
from torch import nn

from mdeq.core import DEQ, anderson, broyden, fixed_point, get_solver
from mdeq.core.regularizers import fixed_point_correction

from .problems import tanh_problem


class Cell(nn.Module):
    """f(z) = tanh(W z + U x): a contraction for small W, with parameters to check gradients on."""

    def __init__(self, dim=6, xdim=3, scale=0.3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(scale * torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5)
        self.u = nn.Parameter(torch.randn(xdim, dim, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.w + x @ self.u)


@pytest.mark.parametrize("solver", [fixed_point, anderson, broyden])
def test_recorded_trajectory_is_the_solvers_iterates(solver):
    f, _, _ = tanh_problem(dim=8, batch=3)
    z0 = torch.zeros(3, 8, dtype=torch.float64)
    _, stats = solver(f, z0, max_iter=6, tol=0.0, record="all", trace=True)
    assert stats.trajectory_steps == list(range(6)) and len(stats.trajectory) == 6 == stats.trace.shape[1]
    torch.testing.assert_close(stats.trajectory[0], z0, rtol=0, atol=0)
    for k, z in enumerate(stats.trajectory):  # the trace's residual at step k is that of the recorded iterate
        res = torch.linalg.vector_norm(f(z) - z, dim=1) / (torch.linalg.vector_norm(f(z), dim=1) + 1e-8)
        torch.testing.assert_close(res, stats.trace[:, k], rtol=1e-9, atol=1e-12)
    if solver is fixed_point:  # Picard's iterates are f^k(z0)
        z = z0
        for k in range(6):
            torch.testing.assert_close(stats.trajectory[k], z, rtol=0, atol=0)
            z = f(z)
    _, sub = solver(f, z0, max_iter=6, tol=0.0, record=[1, 4, 9])
    assert sub.trajectory_steps == [1, 4] and torch.equal(sub.trajectory[1], stats.trajectory[4])
    with pytest.raises(ValueError, match="record"):
        solver(f, z0, record=[-1])


def test_deq_records_list_states_in_their_structure_and_unroll_records_too():
    f = lambda zs: [torch.tanh(0.5 * zs[0] + 1), torch.tanh(0.5 * zs[1] - zs[0].mean(1, keepdim=True))]  # noqa: E731
    z0 = [torch.zeros(2, 3), torch.zeros(2, 5)]
    with torch.no_grad():
        _, stats = DEQ(solver="anderson", max_iter=5, tol=0.0, record=[0, 2])(f, z0)
    assert stats.trajectory_steps == [0, 2] and [t.shape for t in stats.trajectory[1]] == [(2, 3), (2, 5)]
    _, stats = DEQ(solver="unroll", max_iter=3, record="all")(f, z0)
    assert stats.trajectory_steps == [0, 1, 2, 3] and not stats.trajectory[3][0].requires_grad
    torch.testing.assert_close(stats.trajectory[1], f(z0))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "ode"])
def test_final_step_returns_f_of_the_best_iterate_without_another_evaluation(solver):
    f, _, _ = tanh_problem(dim=8, batch=3)
    calls = [0]

    def counted(z):
        calls[0] += 1
        return f(z)

    z0 = torch.zeros(3, 8, dtype=torch.float64)
    with torch.no_grad():
        z_best, _ = DEQ(solver=solver, max_iter=4, tol=0.0)(f, z0)
        z_f, stats = DEQ(solver=solver, max_iter=4, tol=0.0, final_step=True)(counted, z0)
    torch.testing.assert_close(z_f, f(z_best), rtol=1e-12, atol=1e-12)
    assert calls[0] == stats.nfe <= 4
    if solver == "fixed_point":  # k evaluations of Picard with the final step are f applied k times
        with torch.no_grad():
            torch.testing.assert_close(z_f, DEQ(solver="unroll", max_iter=4)(f, z0)[0], rtol=0, atol=0)


def test_skip_predictor_gets_gradients_from_the_initial_guess_loss():
    cell, x = Cell(), torch.randn(4, 3, dtype=torch.float64)
    predictor = nn.Linear(3, 6).double()
    deq = DEQ(solver="anderson", max_iter=30, tol=1e-10, init="skip", init_weight=0.5)
    z, stats = deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64), predictor=lambda: predictor(x))
    guess = predictor(x)
    expected = 0.5 * (guess - z.detach()).pow(2).mean()
    torch.testing.assert_close(stats.init_loss, expected)
    stats.init_loss.backward()
    assert predictor.weight.grad.abs().sum() > 0
    assert cell.w.grad is None  # z* detached: only the predictor learns from this loss
    # not detached: the loss also reaches f's parameters through the implicit gradient of z*
    deq.configure(init_detach=False)
    z, stats = deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64), predictor=lambda: predictor(x))
    stats.init_loss.backward()
    assert cell.w.grad is not None and cell.w.grad.abs().sum() > 0
    # under no_grad there is no loss and the predictor only sets the start
    with torch.no_grad():
        _, stats = deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64), predictor=lambda: predictor(x))
    assert stats.init_loss is None
    with pytest.raises(ValueError, match="needs a predictor"):
        deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64))


def test_skip_reg_starts_from_f_of_zero_and_its_regulariser_trains_f():
    cell, x = Cell(), torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    deq = DEQ(solver="fixed_point", max_iter=5, tol=0.0, init="skip_reg", record=[0])
    z, stats = deq(lambda z: cell(z, x), z0)
    torch.testing.assert_close(stats.trajectory[0], cell(z0, x).detach(), rtol=0, atol=0)  # z0 = f(0, x)
    assert stats.nfe == 6  # the start costs one f-evaluation
    expected = (cell(z0, x) - z.detach()).pow(2).mean()
    torch.testing.assert_close(stats.init_loss, expected)
    stats.init_loss.backward()
    assert cell.u.grad.abs().sum() > 0  # the injection's weights learn to put f(0, x) near z*
    assert torch.equal(cell.w.grad, torch.zeros_like(cell.w))  # f(0, x) does not depend on W


def test_correction_states_are_differentiable_and_weighted_by_gamma():
    cell, x = Cell(), torch.randn(4, 3, dtype=torch.float64)
    deq = DEQ(solver="anderson", max_iter=9, tol=0.0, correction_states=2, correction_steps=2)
    z, stats = deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64))
    assert len(stats.corrections) == 2 and all(c.requires_grad for c in stats.corrections)
    losses = [c.pow(2).sum() for c in stats.corrections] + [z.pow(2).sum()]
    total = fixed_point_correction(losses, 0.8)
    torch.testing.assert_close(total, 0.64 * losses[0] + 0.8 * losses[1] + losses[2])
    total.backward()
    assert cell.w.grad.abs().sum() > 0
    with torch.no_grad():  # inference: no corrections
        assert deq(lambda z: cell(z, x), torch.zeros(4, 6, dtype=torch.float64))[1].corrections is None


def test_option_validation_of_the_new_settings():
    for bad in (dict(init="warm"), dict(init_weight=-1.0), dict(init_detach="yes"), dict(correction_states=-1),
                dict(correction_gamma=0.0), dict(final_step=1), dict(record="some")):
        with pytest.raises(ValueError):
            DEQ(**bad)
    with pytest.raises(ValueError, match="cannot record"):
        from mdeq.core import register_solver
        from mdeq.core.solvers import list_solvers

        if "test_no_record" not in list_solvers():
            @register_solver("test_no_record")
            def no_record(f, z0, *, max_iter=5, tol=1e-4, stop_mode="rel", trace=False):
                return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
        with torch.no_grad():
            DEQ(solver="test_no_record", record="all")(lambda z: z * 0.5, torch.zeros(2, 3))
    assert "ode" in __import__("mdeq.core.solvers", fromlist=["list_solvers"]).list_solvers()
    assert get_solver("consistency") is not None
