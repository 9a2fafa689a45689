"""Consistency distillation (C-DEQ): time grid, boundary identity, the "consistency" solver, losses, and a
distillation run on a toy contraction whose one-step student must beat one solver step by a wide margin."""
import math

import pytest
import torch
from torch import nn

from mdeq.core import anderson, fixed_point, get_solver, list_solvers
from mdeq.core.consistency import ConsistencyFunction, MLPGenerator, consistency_schedule, karras_times
from mdeq.core.distillation import collect_trajectory, consistency_losses, distillation_loss, make_ema
from mdeq.core.solvers import consistency, solver_options
from tests.core.problems import tanh_problem


class Counted:
    """f with a call counter."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


class ListGenerator(nn.Module):
    """A per-tensor generator for list states: s_i + a_i * log(t) (a_i starts at zero)."""

    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(n))

    def forward(self, s, t):
        return [si + ai * torch.log(t).view(-1, *[1] * (si.dim() - 1)) for si, ai in zip(s, self.a)]


class Wild(nn.Module):
    """A generator returning a fixed value (huge, inf or NaN) everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, s, t):
        return torch.full_like(s, self.value) if isinstance(s, torch.Tensor) else [torch.full_like(x, self.value)
                                                                                    for x in s]


def bits(z):
    return [t.view(torch.int64) if t.dtype == torch.float64 else t.view(torch.int32) for t in
            ([z] if isinstance(z, torch.Tensor) else z)]


def bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(bits(a), bits(b)))


def list_state(b=3):
    return [torch.randn(b, 2, 4, 4, dtype=torch.float64), torch.randn(b, 3, 2, 2, dtype=torch.float64)]


def list_f(z):
    return [torch.tanh(0.5 * z[0] + 0.1), torch.tanh(0.3 * z[1] - 0.2)]


# --------------------------------------------------------------------------------------------- time grid
def test_karras_times_endpoints_order_and_values():
    t = karras_times(20)
    assert t.shape == (21,) and t.dtype == torch.float64
    assert t[0].item() == 0.002 and t[-1].item() == 5.0  # exact, not just close
    assert (t[1:] > t[:-1]).all()
    lo, hi = 0.002 ** (1 / 7), 5.0 ** (1 / 7)
    assert t[10].item() == pytest.approx(((lo + hi) / 2) ** 7, rel=1e-12)
    assert t[10].item() == pytest.approx(0.2831, abs=1e-4)  # rho = 7 crowds the grid near eps
    t = karras_times(4, eps=0.01, T=2.0, rho=3.0)
    assert t[0].item() == 0.01 and t[-1].item() == 2.0
    assert t[2].item() == pytest.approx(((0.01 ** (1 / 3) + 2.0 ** (1 / 3)) / 2) ** 3, rel=1e-12)
    t = karras_times(1)
    assert t.tolist() == [0.002, 5.0]
    for bad in (dict(num_steps=0), dict(num_steps=2.0), dict(num_steps=3, eps=0.0), dict(num_steps=3, eps=6.0),
                dict(num_steps=3, rho=0.0)):
        with pytest.raises(ValueError):
            karras_times(**bad)


def test_schedule_spaces_the_applications_evenly_in_grid_index():
    assert consistency_schedule(1, 20) == [0]
    assert consistency_schedule(2, 20) == [0, 10]
    assert consistency_schedule(4, 20) == [0, 5, 10, 15]
    assert consistency_schedule(3, 20) == [0, 6, 13]


# --------------------------------------------------------------------------------------------- the student
@pytest.mark.parametrize("value", [1e300, math.inf, math.nan])
def test_boundary_is_bitwise_identity_for_tensor_and_list_states(value):
    z = torch.randn(4, 6, dtype=torch.float64)
    z[0, 0] = -0.0  # 1.0 * z + 0.0 * g would turn it into +0.0
    zl = list_state(4)
    zl[1][2, 0, 0, 0] = -0.0
    student = ConsistencyFunction(Wild(value))
    for state in (z, zl):
        teacher = Counted(lambda s: s)
        # float t == T: z itself, neither the teacher nor G is run
        assert student(state, 5.0, teacher) is state and teacher.calls == 0
        # a (B,) tensor of times with some samples at T: those samples are bitwise z
        t = torch.tensor([5.0, 1.0, 5.0, 0.002], dtype=torch.float64)
        out = student(state, t, teacher)
        for o, s in zip(bits(out), bits(state)):
            assert torch.equal(o[[0, 2]], s[[0, 2]])
        assert bitwise_equal(student(state, torch.full((4,), 5.0), teacher), state)
    assert student.skip_weight(5.0) == 1.0 and student.out_weight(5.0) == 0.0


def test_untrained_student_is_one_teacher_step_mixed_with_z():
    torch.manual_seed(0)
    f, b, _ = tanh_problem(dim=12, batch=5)
    student = ConsistencyFunction(MLPGenerator(12)).double()
    z = torch.randn(5, 12, dtype=torch.float64)
    for t in (0.002, 0.3, 4.0, torch.tensor([0.002, 0.1, 1.0, 3.0, 5.0], dtype=torch.float64)):
        tt = t if isinstance(t, float) else t[:, None]
        expected = tt / 5.0 * z + (5.0 - tt) / 5.0 * f(z)
        torch.testing.assert_close(student(z, t, f), expected, atol=1e-6, rtol=0)
    # the generator also works on (B, ...) tensors
    g = MLPGenerator(12)
    s = torch.randn(3, 3, 4)
    assert torch.equal(g(s, torch.full((3,), 0.5)), s)


def test_only_the_generator_gets_gradients_the_teacher_is_frozen():
    teacher = nn.Linear(8, 8)
    student = ConsistencyFunction(MLPGenerator(8))
    nn.init.normal_(student.generator.out.weight)  # make the output depend on the first layer too
    z = torch.randn(4, 8)
    student(z, torch.rand(4), lambda s: torch.tanh(teacher(s))).square().sum().backward()
    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_num_train_steps_is_kept_in_the_state_dict():
    student = ConsistencyFunction(MLPGenerator(4))
    assert student.num_train_steps is None
    student.num_train_steps = 20
    loaded = ConsistencyFunction(MLPGenerator(4))
    loaded.load_state_dict(student.state_dict())
    assert loaded.num_train_steps == 20
    assert torch.equal(loaded.times(), karras_times(20))
    with pytest.raises(ValueError):
        student.num_train_steps = 0


# --------------------------------------------------------------------------------------------- the solver
def test_consistency_is_registered_and_needs_a_student():
    assert "consistency" in list_solvers() and get_solver("consistency") is consistency
    opts = solver_options("consistency")
    assert opts["max_iter"] == 1 and opts["student"] is None and opts["measure_residual"] is True
    z0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"solver='consistency' needs a distilled student \(see tools/distill.py\)"):
        consistency(torch.tanh, z0)
    with pytest.raises(ValueError, match="num_train_steps"):
        consistency(torch.tanh, z0, student=ConsistencyFunction(MLPGenerator(3)))
    with pytest.raises(ValueError, match="ConsistencyFunction"):
        consistency(torch.tanh, z0, student="checkpoints/student.pt", num_train_steps=4)
    with pytest.raises(ValueError, match="measure_residual"):
        consistency(torch.tanh, z0, student=ConsistencyFunction(MLPGenerator(3), num_train_steps=4),
                    measure_residual=1)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("measure", [True, False])
def test_k_steps_cost_k_evaluations_plus_one_to_measure(k, measure):
    f, b, _ = tanh_problem(dim=10, batch=6)
    f = Counted(f)
    student = ConsistencyFunction(MLPGenerator(10), num_train_steps=20).double()
    z, stats = consistency(f, torch.zeros_like(b), max_iter=k, student=student, measure_residual=measure,
                           trace=True, record="all")
    assert f.calls == k + measure == stats.nfe
    assert stats.solver == "consistency"
    assert stats.nstep.tolist() == [k] * 6
    for v in (stats.abs_residual, stats.rel_residual, stats.converged, stats.diverged):
        assert v.shape == (6,)
    assert stats.trace.shape == (6, k + measure)
    assert stats.trajectory_steps == list(range(k + 1)) and torch.equal(stats.trajectory[-1], z)
    assert not stats.diverged.any()
    if measure:
        abs_res = torch.linalg.vector_norm(f.f(z) - z, dim=1)
        torch.testing.assert_close(stats.abs_residual, abs_res)
        torch.testing.assert_close(stats.rel_residual, abs_res / (torch.linalg.vector_norm(f.f(z), dim=1) + 1e-8))
        torch.testing.assert_close(stats.trace[:, -1], stats.rel_residual)
        assert torch.equal(stats.converged, stats.rel_residual <= 1e-4)
    else:
        assert stats.abs_residual.isnan().all() and stats.rel_residual.isnan().all() and not stats.converged.any()


def test_untrained_one_step_solver_is_one_teacher_step_and_follows_the_schedule():
    f, b, _ = tanh_problem(dim=10, batch=4)
    student = ConsistencyFunction(MLPGenerator(10), num_train_steps=20).double()
    z0 = torch.randn_like(b)
    z1, _ = consistency(f, z0, student=student, measure_residual=False)
    eps = 0.002
    torch.testing.assert_close(z1, eps / 5 * z0 + (1 - eps / 5) * f(z0), atol=1e-12, rtol=0)
    z2, _ = consistency(f, z0, max_iter=2, student=student, measure_residual=False)
    t1 = karras_times(20)[10].item()
    torch.testing.assert_close(z2, t1 / 5 * z1 + (1 - t1 / 5) * f(z1), atol=1e-12, rtol=0)
    # an explicit K overrides the student's, and the EMA student is accepted
    z2b, _ = consistency(f, z0, max_iter=2, student=make_ema(student), num_train_steps=4, measure_residual=False)
    t1 = karras_times(4)[2].item()
    torch.testing.assert_close(z2b, t1 / 5 * z1 + (1 - t1 / 5) * f(z1), atol=1e-12, rtol=0)


def test_list_states_match_the_packed_computation():
    torch.manual_seed(0)
    z0 = list_state(3)
    student = ConsistencyFunction(ListGenerator(2), num_train_steps=8)
    with torch.no_grad():
        student.generator.a.copy_(torch.tensor([0.3, -0.2]))
    z, stats = consistency(list_f, z0, max_iter=2, student=student)
    assert isinstance(z, list) and [t.shape for t in z] == [t.shape for t in z0]
    expected = z0
    for n in consistency_schedule(2, 8):
        expected = student(expected, karras_times(8)[n].item(), list_f)
    for a, e in zip(z, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)
    fz = list_f(z)
    abs_res = torch.sqrt(sum((a - b).flatten(1).square().sum(1) for a, b in zip(fz, z)))
    torch.testing.assert_close(stats.abs_residual, abs_res)


def test_non_finite_result_is_marked_diverged():
    student = ConsistencyFunction(Wild(math.nan), num_train_steps=4)
    _, stats = consistency(torch.tanh, torch.zeros(3, 2), student=student)
    assert stats.diverged.all() and not stats.converged.any()
    _, stats = consistency(torch.tanh, torch.zeros(3, 2), student=student, measure_residual=False)
    assert stats.diverged.all()


# ------------------------------------------------------------------------------- trajectories, losses, EMA
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_collect_trajectory_returns_all_k_plus_one_iterates(solver):
    f, b, exact = tanh_problem(dim=10, batch=4)
    traj, z_k = collect_trajectory(f, torch.zeros_like(b), solver=solver, num_steps=12)
    assert len(traj) == 13 and z_k is traj[-1]
    assert torch.equal(traj[0], torch.zeros_like(b))
    picard = [traj[0]]
    for _ in range(12):
        picard.append(f(picard[-1]))
    if solver == "fixed_point":
        for a, e in zip(traj, picard):
            torch.testing.assert_close(a, e, atol=1e-14, rtol=0)
    else:  # Anderson's first step is a plain fixed-point step, then it gets ahead of Picard
        torch.testing.assert_close(traj[1], picard[1])
        assert not torch.allclose(traj[2], f(traj[1]))
        err = lambda z: torch.linalg.vector_norm(z - exact, dim=1)  # noqa: E731
        assert (err(z_k) < err(picard[-1])).all()
    # a map that reaches its fixed point at once: the trajectory is padded with it
    traj, z_k = collect_trajectory(lambda z: torch.ones_like(z), torch.ones(2, 3), num_steps=5)
    assert len(traj) == 6 and all(torch.equal(t, torch.ones(2, 3)) for t in traj)
    # list states
    traj, z_k = collect_trajectory(list_f, list_state(2), num_steps=3)
    assert len(traj) == 4 and isinstance(z_k, list) and len(z_k) == 2


def test_losses_match_a_direct_computation_and_list_states_are_weighted_per_element():
    torch.manual_seed(0)
    K, B = 6, 5
    f, b, _ = tanh_problem(dim=10, batch=B)
    traj, z_k = collect_trajectory(f, torch.zeros_like(b), num_steps=K)
    student = ConsistencyFunction(MLPGenerator(10), num_train_steps=K).double()
    nn.init.normal_(student.generator.out.weight, std=0.1)
    ema = make_ema(student)
    with torch.no_grad():
        ema.module.generator.out.weight.mul_(0.5)
    times = karras_times(K)
    idx = torch.tensor([0, 5, 2, 2, 4])
    g, loc = consistency_losses(student, ema, traj, times, idx, f, z_k)
    # per sample i: row i of F applied to the whole batch at step idx[i] (f closes over the batch's injection)
    pred = torch.stack([student(traj[n], times[n].item(), f)[i] for i, n in enumerate(idx.tolist())])
    with torch.no_grad():
        tgt = torch.stack([ema(traj[n + 1], times[n + 1].item(), f)[i] for i, n in enumerate(idx.tolist())])
    torch.testing.assert_close(g, nn.functional.smooth_l1_loss(pred, z_k))
    torch.testing.assert_close(loc, nn.functional.mse_loss(pred, tgt))
    # at n = K - 1 the EMA target is z_K itself (boundary condition)
    torch.testing.assert_close(tgt[1], z_k[1], atol=0, rtol=0)
    loss = distillation_loss(g, loc)
    torch.testing.assert_close(loss, 0.9 * g + 0.1 * loc)
    loss.backward()
    assert all(p.grad is None for p in ema.parameters()) and not any(p.requires_grad for p in ema.parameters())
    assert student.generator.inp.weight.grad.abs().sum() > 0

    # a list state split from the same vectors gives the same losses (per-element mean over the packed state)
    split = lambda z: [z[:, :4].reshape(B, 2, 2), z[:, 4:]]  # noqa: E731
    join = lambda z: torch.cat([z[0].flatten(1), z[1]], dim=1)  # noqa: E731

    class Split(nn.Module):
        def __init__(self, gen):
            super().__init__()
            self.gen = gen

        def forward(self, s, t):
            return split(self.gen(join(s), t))

    ls, le = ConsistencyFunction(Split(student.generator)), ConsistencyFunction(Split(ema.module.generator))
    gl, ll = consistency_losses(ls, le, [split(z) for z in traj], times, idx, lambda z: split(f(join(z))),
                                split(z_k))
    torch.testing.assert_close((gl, ll), (g, loc))
    for bad in (torch.tensor([0, 6, 1, 1, 1]), torch.tensor([-1, 0, 0, 0, 0]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="indices"):
            consistency_losses(student, ema, traj, times, bad, f, z_k)


def test_ema_is_frozen_and_averages_with_the_decay():
    student = ConsistencyFunction(MLPGenerator(3), num_train_steps=5)
    ema = make_ema(student, decay=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    before = ema.module.generator.inp.weight.clone()
    with torch.no_grad():
        student.generator.inp.weight.add_(1.0)
    ema.update_parameters(student)  # the first update copies
    torch.testing.assert_close(ema.module.generator.inp.weight, before + 1.0)
    with torch.no_grad():
        student.generator.inp.weight.add_(1.0)
    ema.update_parameters(student)
    torch.testing.assert_close(ema.module.generator.inp.weight, before + 1.0 + 0.1)
    student.num_train_steps = 9
    ema.update_parameters(student)
    assert ema.module.num_train_steps == 9


# --------------------------------------------------------------------------------------------- distillation
D, DX, K = 16, 4, 20


def _toy(n: int, gen: torch.Generator, w: torch.Tensor, u: torch.Tensor):
    """Inputs x and the teacher f_x(z) = tanh(W z + U x) per sample."""
    x = torch.randn(n, DX, generator=gen)
    inj = x @ u.T
    return x, (lambda z: torch.tanh(z @ w.T + inj))


@pytest.fixture(scope="module")
def distilled():
    """Distil a student on toy teacher trajectories; return held-out errors ||z - z*|| (batch means)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention on a shared machine
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
        w = q @ torch.diag(torch.linspace(-0.9, 0.9, D)) @ q.T  # ||W|| = 0.9: Picard needs ~35 steps to 1e-5
        u = 0.5 * torch.randn(D, DX, generator=gen) / DX ** 0.5
        x_train, f_train = _toy(1024, gen, w, u)
        _, f_test = _toy(256, gen, w, u)
        z0 = torch.zeros(256, D)
        traj, z_k = collect_trajectory(f_train, torch.zeros(1024, D), num_steps=K)

        student = ConsistencyFunction(MLPGenerator(D, hidden=96), num_train_steps=K)
        ema = make_ema(student, decay=0.98)
        z_star, sstats = anderson(f_test, z0, max_iter=300, tol=1e-6)
        assert sstats.converged.all()
        err = lambda z: torch.linalg.vector_norm(z - z_star, dim=1).mean().item()  # noqa: E731
        out = {"untrained": err(consistency(f_test, z0, student=student)[0]), "z0": err(z0)}

        steps = 600
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        times = karras_times(K)
        losses = []
        for _ in range(steps):
            sel = torch.randint(0, 1024, (128,))
            inj = x_train[sel] @ u.T
            g, loc = consistency_losses(student, ema, [z[sel] for z in traj], times, torch.randint(0, K, (128,)),
                                        lambda z: torch.tanh(z @ w.T + inj), z_k[sel])
            loss = distillation_loss(g, loc)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(student)
            losses.append(loss.item())
        out["loss_first"], out["loss_last"] = sum(losses[:20]) / 20, sum(losses[-20:]) / 20

        for k in (1, 2, 4):
            out[f"student_{k}"] = err(consistency(f_test, z0, max_iter=k, student=student)[0])
            out[f"picard_{k}"] = err(fixed_point(f_test, z0, max_iter=k + 1, tol=0.0)[0])  # k steps, then measured
            out[f"anderson_{k}"] = err(anderson(f_test, z0, max_iter=k + 1, tol=0.0)[0])
        out["ema_1"] = err(consistency(f_test, z0, student=ema)[0])
        return out
    finally:
        torch.set_num_threads(threads)


def test_untrained_student_starts_at_one_picard_step(distilled):
    # z0 = 0: F(z0, eps) = (1 - eps/T) f(z0), within 0.04% of one Picard step
    assert distilled["untrained"] == pytest.approx(distilled["picard_1"], rel=2e-3)
    assert distilled["loss_last"] < 0.2 * distilled["loss_first"]


def test_one_student_step_lands_far_closer_than_one_solver_step(distilled):
    d = distilled
    # measured student/Picard at one evaluation of f: 0.20 here, 0.18-0.25 over 7 seeds
    assert d["student_1"] <= d["picard_1"] / 3
    assert d["student_1"] <= d["anderson_1"] / 3  # Anderson's first step is a fixed-point step
    # ...and closer than two solver steps (twice the evaluations): measured 0.36 x, at most 0.48 x over seeds
    assert d["student_1"] <= 0.6 * d["picard_2"] and d["student_1"] <= 0.6 * d["anderson_2"]
    assert d["ema_1"] == pytest.approx(d["student_1"], rel=0.05)


def test_more_student_steps_do_not_drift(distilled):
    d = distilled
    # measured: two steps give 0.43 x the one-step error (0.43-0.47 over seeds); four give 0.76 x the two-step
    # error here but up to 1.14 x over seeds (and eight drift back up: repeated jumps leave the trajectories)
    assert d["student_2"] <= d["student_1"]
    assert d["student_4"] <= 1.5 * d["student_2"]
    assert d["student_2"] <= d["picard_2"] / 3 and d["student_2"] <= d["anderson_2"] / 3
