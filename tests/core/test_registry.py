"""What solvers declare when they register, one home for each default, one merge rule, and settings validated
once (when set), not on every forward."""
import inspect

import pytest
import torch

from mdeq.core import DEQ, DEQ_OPTIONS, budget_options, merge_deq_options, register_solver, solver_spec
from mdeq.core import deq as deq_module
from mdeq.core.solvers import COMMON_OPTIONS, SolverSpec, anderson, list_solvers


def test_solvers_declare_what_they_need_and_can_do():
    specs = {name: solver_spec(name) for name in ("fixed_point", "anderson", "broyden", "ode", "consistency",
                                                  "unroll")}
    assert all(s.can_record for s in specs.values())
    assert specs["consistency"].needs == ("student",) and not specs["consistency"].can_return_f
    assert specs["consistency"].fixed_budget == {"measure_residual": False}
    assert specs["unroll"].differentiable and specs["unroll"].fixed_budget == {}
    assert not specs["ode"].exact_budget and specs["ode"].evals_per_step({"method": "bosh3"}) == 3
    assert specs["ode"].evals_per_step({"method": "dopri5"}) == 6
    for name in ("fixed_point", "anderson", "broyden"):
        s = specs[name]
        assert s.can_return_f and s.exact_budget and s.fixed_budget == {"tol": 0.0} and not s.needs
        assert s.evals_per_step(s.defaults()) == 1


def test_one_home_for_each_default():
    # the public function's signature shows the declared defaults, and the DEQ layer uses the same ones
    sig = inspect.signature(anderson).parameters
    assert sig["max_iter"].default == COMMON_OPTIONS["max_iter"].default == DEQ().options["max_iter"]
    assert sig["m"].default == solver_spec("anderson").options["m"].default == 7
    assert DEQ(solver="consistency").options["max_iter"] == 1  # consistency's own default
    assert set(DEQ().options) == set(DEQ_OPTIONS)


def test_registration_refuses_an_option_without_a_declaration():
    with pytest.raises(ValueError, match="declared in options="):
        @register_solver("test_undeclared")
        def undeclared(f, z0, *, max_iter=5, history=3):
            return None
    assert "test_undeclared" not in list_solvers()


def test_switching_solver_drops_the_previous_solvers_options_in_one_place():
    base = dict(solver="broyden", solver_options={"memory": 26}, b_solver="broyden", b_solver_options={"memory": 27})
    merged = merge_deq_options(base, dict(solver="anderson", b_solver="anderson"))
    assert "solver_options" not in merged and "b_solver_options" not in merged
    kept = merge_deq_options(base, dict(solver="anderson", solver_options={"m": 3}))
    assert kept["solver_options"] == {"m": 3} and kept["b_solver_options"] == {"memory": 27}
    assert merge_deq_options(base, dict(max_iter=3))["solver_options"] == {"memory": 26}
    deq = DEQ(**base)
    deq.configure(solver="anderson")
    assert deq.options["solver_options"] == {}


def test_settings_are_validated_when_set_not_on_every_forward(monkeypatch):
    checks = {"deq": 0, "solver": 0}
    real_check, real_resolve = deq_module.check_deq_options, SolverSpec.resolve

    def counting_check(settings):
        checks["deq"] += 1
        return real_check(settings)

    def counting_resolve(self, given):
        checks["solver"] += 1
        return real_resolve(self, given)

    monkeypatch.setattr(deq_module, "check_deq_options", counting_check)
    monkeypatch.setattr(SolverSpec, "resolve", counting_resolve)
    deq = DEQ(solver="anderson", max_iter=6, tol=0.0, b_solver="broyden", b_max_iter=4)
    assert checks == {"deq": 1, "solver": 0}
    w = torch.randn(5, 5, dtype=torch.float64) * 0.2
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        z, stats = deq(lambda z: torch.tanh(z @ w + x), torch.zeros(3, 5, dtype=torch.float64))
        z.sum().backward()
    assert stats.nfe == 6 and stats.backward.nfe == 4
    assert checks == {"deq": 1, "solver": 0}  # three forwards and backwards: nothing checked again
    deq.configure(max_iter=3)
    assert checks["deq"] == 2
    anderson(lambda z: z * 0.5, torch.ones(2, 3), max_iter=2)  # a direct call validates what it is given
    assert checks["solver"] == 1


def test_budget_options_come_from_the_declarations():
    assert budget_options(dict(solver="anderson", solver_options={"m": 3}), 4) == dict(
        solver="anderson", max_iter=4, tol=0.0, final_step=True, solver_options={"m": 3})
    assert budget_options(dict(solver="consistency"), 2) == dict(
        solver="consistency", max_iter=2, final_step=False, solver_options={"measure_residual": False})
    assert budget_options(dict(solver="unroll"), 3) == dict(solver="unroll", max_iter=3, final_step=False)
    assert budget_options(dict(solver="anderson", init="skip_reg"), 3)["max_iter"] == 2  # one for z0 = f(z0)
