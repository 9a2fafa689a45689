import copy
import pickle

import pytest
import torch
from torch import nn

from mdeq.core import DEQ, anderson


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + c): contractive when ||W|| < 1."""

    def __init__(self, dim=8, in_dim=5, lipschitz=0.7, dtype=torch.float64):
        super().__init__()
        w = torch.randn(dim, dim, dtype=dtype)
        self.W = nn.Parameter(lipschitz * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(dim, in_dim, dtype=dtype) / in_dim**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(dim, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def _loss(z, target):
    return ((z - target) ** 2).sum()


def exact_gradients(cell, x, target):
    """dL/dtheta and dL/dx through z* = f(z*, x) by the implicit function theorem with dense Jacobians."""
    params = [cell.W, cell.U, cell.c]
    with torch.no_grad():
        z_star, _ = anderson(lambda z: cell(z, x), torch.zeros(x.shape[0], cell.W.shape[0], dtype=x.dtype),
                             max_iter=500, tol=1e-14)
    grads = [torch.zeros_like(p) for p in params]
    gx = torch.zeros_like(x)
    eye = torch.eye(cell.W.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        zi, xi = z_star[i], x[i].detach()
        jac = torch.autograd.functional.jacobian(lambda z: cell(z[None], xi[None])[0], zi)
        dl_dz = 2 * (zi - target[i])
        u = torch.linalg.solve((eye - jac).T, dl_dz)  # u^T = dL/dz (I - J)^-1
        xi = xi.clone().requires_grad_()
        out = cell(zi[None], xi[None])[0]
        g = torch.autograd.grad(out, params + [xi], u)
        for acc, gi in zip(grads, g[:-1]):
            acc += gi
        gx[i] = g[-1]
    return grads + [gx], z_star


def deq_gradients(cell, x, target, **options):
    x = x.detach().clone().requires_grad_()
    cell.zero_grad()
    deq = DEQ(**options)
    z, stats = deq(lambda z: cell(z, x), torch.zeros(x.shape[0], cell.W.shape[0], dtype=x.dtype))
    _loss(z, target).backward()
    return [cell.W.grad.clone(), cell.U.grad.clone(), cell.c.grad.clone(), x.grad.clone()], stats


@pytest.fixture
def problem():
    cell = TanhCell()
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.randn(3, 8, dtype=torch.float64)
    return cell, x, target


@pytest.mark.parametrize("b_solver", ["fixed_point", "anderson", "broyden"])
def test_ift_gradients_equal_exact_implicit_gradients(problem, b_solver):
    cell, x, target = problem
    exact, _ = exact_gradients(cell, x, target)
    got, stats = deq_gradients(cell, x, target, solver="anderson", max_iter=200, tol=1e-12,
                               b_solver=b_solver, b_max_iter=500, b_tol=1e-12)
    for g, e in zip(got, exact):
        assert (torch.linalg.vector_norm(g - e) / torch.linalg.vector_norm(e)).item() < 1e-4
    assert stats.backward is not None and stats.backward.converged.all()


def test_ift_gradient_agrees_with_finite_differences(problem):
    cell, x, target = problem
    got, _ = deq_gradients(cell, x, target, max_iter=300, tol=1e-13, b_max_iter=300, b_tol=1e-13)
    deq = DEQ(max_iter=300, tol=1e-13)
    z0 = torch.zeros(3, 8, dtype=torch.float64)

    def loss_at():
        with torch.no_grad():
            z, _ = deq(lambda z: cell(z, x), z0)
            return _loss(z, target).item()

    eps = 1e-6
    for (i, j) in [(0, 1), (3, 2), (7, 7)]:
        with torch.no_grad():
            cell.W[i, j] += eps
        up = loss_at()
        with torch.no_grad():
            cell.W[i, j] -= 2 * eps
        down = loss_at()
        with torch.no_grad():
            cell.W[i, j] += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd - got[0][i, j].item()) <= 1e-5 * max(1.0, abs(fd))


def _cosine(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("options", [dict(backward="phantom", phantom_steps=5, phantom_damping=0.6),
                                     dict(backward="one_step")])
def test_inexact_gradients_point_the_same_way_as_the_exact_one(problem, options):
    cell, x, target = problem
    exact, _ = exact_gradients(cell, x, target)
    got, stats = deq_gradients(cell, x, target, max_iter=200, tol=1e-12, **options)
    assert stats.backward is None
    assert _cosine(got, exact) > 0.9


def test_phantom_gradient_tends_to_the_exact_one_with_many_steps(problem):
    cell, x, target = problem
    exact, _ = exact_gradients(cell, x, target)
    got, _ = deq_gradients(cell, x, target, max_iter=200, tol=1e-12, backward="phantom",
                           phantom_steps=200, phantom_damping=1.0)
    assert _cosine(got, exact) > 1 - 1e-10


def test_unroll_equals_explicit_backprop_through_the_same_steps(problem):
    cell, x, target = problem
    got, stats = deq_gradients(cell, x, target, solver="unroll", max_iter=7)
    assert stats.nfe == 7 and (stats.nstep == 7).all()
    x2 = x.detach().clone().requires_grad_()
    cell.zero_grad()
    z = torch.zeros(3, 8, dtype=torch.float64)
    for _ in range(7):
        z = cell(z, x2)
    _loss(z, target).backward()
    ref = [cell.W.grad, cell.U.grad, cell.c.grad, x2.grad]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_inference_returns_the_solver_iterate_and_training_returns_f_of_it(problem):
    cell, x, _ = problem
    deq = DEQ(max_iter=50, tol=1e-6)
    z0 = torch.zeros(3, 8, dtype=torch.float64)
    with torch.no_grad():
        z_inf, stats = deq(lambda z: cell(z, x), z0)
        z_ref, _ = anderson(lambda z: cell(z, x), z0, max_iter=50, tol=1e-6)
    assert torch.equal(z_inf, z_ref) and not z_inf.requires_grad
    z_train, _ = deq(lambda z: cell(z, x), z0)
    assert z_train.requires_grad
    torch.testing.assert_close(z_train, cell(z_inf, x))


def test_list_state_gradients_equal_flat_state_gradients():
    cell = TanhCell(dim=12)
    x = torch.randn(2, 5, dtype=torch.float64)
    target = torch.randn(2, 12, dtype=torch.float64)
    flat, _ = deq_gradients(cell, x, target, max_iter=100, tol=1e-12, b_tol=1e-12, b_max_iter=200)

    x2 = x.clone().requires_grad_()
    cell.zero_grad()

    def f_list(zs):  # two "resolutions": (4,) and (2, 2, 2)
        out = cell(torch.cat([zs[0], zs[1].reshape(2, -1)], 1), x2)
        return [out[:, :4], out[:, 4:].reshape(2, 2, 2, 2)]

    z, _ = DEQ(max_iter=100, tol=1e-12, b_tol=1e-12, b_max_iter=200)(
        f_list, [torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 2, 2, 2, dtype=torch.float64)])
    assert isinstance(z, list) and z[1].shape == (2, 2, 2, 2)
    _loss(torch.cat([z[0], z[1].reshape(2, -1)], 1), target).backward()
    for g, r in zip([cell.W.grad, cell.U.grad, cell.c.grad, x2.grad], flat):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the block."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self):
        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _training_forward_saved_bytes(max_iter, **options):
    cell = TanhCell(dim=64, in_dim=16, lipschitz=0.999, dtype=torch.float32)
    x = torch.randn(4, 16)
    deq = DEQ(max_iter=max_iter, tol=0.0, **options)  # tol 0: every solve runs max_iter steps
    with _SavedBytes() as saved:
        z, stats = deq(lambda z: cell(z, x), torch.zeros(4, 64))
    assert stats.nfe == max_iter
    z.sum().backward()
    return saved.bytes


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_ift_training_memory_does_not_grow_with_solver_depth(solver):
    small = _training_forward_saved_bytes(5, solver=solver)
    large = _training_forward_saved_bytes(50, solver=solver)
    assert small > 0 and small == large


def test_unrolled_training_memory_grows_linearly_with_depth():
    b5, b10, b50 = (_training_forward_saved_bytes(n, solver="unroll") for n in (5, 10, 50))
    per_step = (b10 - b5) / 5
    assert per_step > 0 and b50 - b5 == 45 * per_step


def test_jacobian_penalty_is_returned_and_reaches_the_parameters(problem):
    cell, x, _ = problem
    for options in [dict(), dict(backward="phantom"), dict(backward="one_step"), dict(solver="unroll")]:
        cell.zero_grad()
        z, stats = DEQ(max_iter=30, **options)(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64),
                                               jac_probes=2)
        assert stats.jac_loss is not None and stats.jac_loss.item() > 0
        stats.jac_loss.backward()
        assert cell.W.grad.abs().sum() > 0


def test_options_are_validated_and_configure_is_atomic():
    deq = DEQ(solver="fixed_point", max_iter=10)
    with pytest.raises(TypeError, match="unknown DEQ option.*'f_thres'"):
        DEQ(f_thres=10)
    with pytest.raises(ValueError, match="unknown solver 'lbfgs'"):
        deq.configure(solver="lbfgs")
    with pytest.raises(ValueError, match="unknown option.*'history'.*anderson"):
        deq.configure(solver="anderson", solver_options=dict(history=3))
    with pytest.raises(ValueError, match="backward"):
        deq.configure(backward="neumann")
    with pytest.raises(ValueError, match="max_iter"):
        deq.configure(max_iter=2.5)
    assert deq.solver == "fixed_point" and deq.max_iter == 10  # failed calls changed nothing
    deq.configure(solver="anderson", solver_options=dict(m=3), b_max_iter=7)
    assert deq.solver == "anderson" and deq.solver_options == {"m": 3} and deq.b_max_iter == 7
    assert deq.b_tol == deq.tol and "anderson" in repr(deq)
    with pytest.raises(ValueError, match="jac_probes"):
        with torch.no_grad():
            deq(lambda z: z * 0.5, torch.ones(1, 2), jac_probes=1)


def test_max_iter_can_be_overridden_per_call(problem):
    cell, x, _ = problem
    deq = DEQ(solver="fixed_point", max_iter=50, tol=0.0)
    with torch.no_grad():
        _, stats = deq(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64), max_iter=4)
    assert stats.nfe == 4 and deq.max_iter == 50


class DEQModel(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.deq = DEQ(max_iter=40, tol=1e-10)

    def forward(self, x):
        z, self.last_stats = self.deq(lambda z: self.cell(z, x), torch.zeros(x.shape[0], 8, dtype=x.dtype))
        return z


def test_module_with_deq_deep_copies_pickles_and_keeps_working(problem):
    cell, x, target = problem
    model = DEQModel(cell)
    _loss(model(x), target).backward()  # a training step leaves grads and stats behind
    clone = copy.deepcopy(model)
    clone2 = pickle.loads(pickle.dumps(model))
    for m in (clone, clone2):
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x))
        m.zero_grad()
        _loss(m(x), target).backward()
        torch.testing.assert_close(m.cell.W.grad, model.cell.W.grad)


def test_meta_device_only_infers_shapes():
    cell = TanhCell(dtype=torch.float32).to("meta")
    x = torch.empty(2, 5, device="meta")
    z, stats = DEQ()(lambda z: [cell(z[0], x)], [torch.empty(2, 8, device="meta")])
    assert z[0].shape == (2, 8) and z[0].device.type == "meta"


def test_solve_runs_in_float32_under_autocast():
    cell = TanhCell(dtype=torch.float32)
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            z, stats = DEQ(max_iter=60, tol=1e-6)(lambda z: cell(z, x), torch.zeros(3, 8))
        z_train, _ = DEQ(max_iter=60, tol=1e-6)(lambda z: cell(z, x), torch.zeros(3, 8))
    assert z.dtype == torch.float32 and stats.abs_residual.dtype == torch.float32
    assert stats.converged.all()  # a bfloat16 solve stalls near 1e-3
    assert z_train.dtype == torch.float32  # packed state; the graph of f(z*) ran in bfloat16
    torch.testing.assert_close(z_train, z, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_its_dtype_and_solves_in_float32(dtype):
    cell = TanhCell(dtype=torch.float32).to(dtype)
    x = torch.randn(3, 5, dtype=dtype)
    seen = []

    def f(z):
        seen.append(z.dtype)
        return cell(z, x)

    z, stats = DEQ(max_iter=40, tol=1e-2)(f, torch.zeros(3, 8, dtype=dtype))
    assert z.dtype == dtype and set(seen) == {dtype}
    assert stats.abs_residual.dtype == torch.float32 and stats.converged.all()
    z.float().sum().backward()
    assert cell.W.grad.dtype == dtype and torch.isfinite(cell.W.grad).all()


def test_options_set_as_attributes_are_validated_and_used(problem):
    cell, x, _ = problem
    deq = DEQ(solver="fixed_point", max_iter=50, tol=0.0)
    deq.max_iter = 3
    with torch.no_grad():
        _, stats = deq(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64))
    assert stats.nfe == 3
    with pytest.raises(ValueError, match="max_iter"):
        deq.max_iter = 0
    with pytest.raises(ValueError, match="solver_options: m must be a positive integer"):
        deq.configure(solver="anderson", solver_options=dict(m=0))
    with pytest.raises(ValueError, match="b_solver_options: lam"):
        deq.configure(b_solver_options=dict(lam=-1.0))
    with pytest.raises(ValueError, match="b_tol"):
        deq.configure(b_tol=True)


def test_a_registered_solver_is_usable_by_name(problem):
    from mdeq.core import fixed_point, register_solver
    from mdeq.core.solvers import list_solvers

    name = "test_half_damped"
    if name not in list_solvers():
        @register_solver(name)
        def half_damped(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", trace=False):
            return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=trace, damping=0.5)

    with pytest.raises(ValueError, match="already registered"):
        register_solver(name)(lambda f, z0: None)
    cell, x, _ = problem
    with torch.no_grad():
        z, stats = DEQ(solver=name, max_iter=200, tol=1e-8)(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.float64))
    assert stats.converged.all()
    torch.testing.assert_close(z, cell(z, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown option"):
        DEQ(solver=name, solver_options=dict(damping=0.3))


def test_f_that_ignores_the_state_gets_its_plain_gradient():
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z, stats = DEQ(max_iter=10)(lambda z: 2.0 * x, torch.zeros(2, 4, dtype=torch.float64))
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert stats.backward.converged.all()


def test_diverging_backward_solve_falls_back_to_the_one_step_gradient():
    # z = 1.5 z + x has the fixed point -2x (Anderson finds it), but u = 1.5 u + v has no convergent iteration
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    deq = DEQ(solver="anderson", max_iter=20, tol=1e-10, b_solver="fixed_point", b_max_iter=500)
    z, stats = deq(lambda z: 1.5 * z + x, torch.zeros(3, 4, dtype=torch.float64))
    torch.testing.assert_close(z, -2 * x, atol=1e-8, rtol=0)
    z.sum().backward()
    assert stats.backward.diverged.all()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # u = v = 1, then df/dx = 1
