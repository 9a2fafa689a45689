"""The cheap-equilibrium choices on the MDEQ models: Skip DEQ predictor, Skip Reg., C-DEQ student, warm starts,
fixed-point correction outputs, and exact f-evaluation budgets."""
import pytest
import timm
import torch

import mdeq
from mdeq.core import budget_options


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_skip_init_builds_a_multiscale_predictor_that_learns(x):
    model = timm.create_model("mdeq_tiny", num_classes=10, skip_init=True, deq=dict(max_iter=6))
    assert model.deq.options["init"] == "skip"  # a model with the predictor starts from its prediction
    init = model.fullstage.initializer
    assert init is not None and [h.out_channels for h in init.heads] == [24, 24]
    guess = init(model.forward_stem(x)[1])
    assert [tuple(g.shape) for g in guess] == [(2, 24, 32, 32), (2, 24, 16, 16)]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in guess)  # untrained: the plain DEQ's start
    out = model(x)
    loss = out.logsumexp(1).mean() + model.deq_stats.init_loss
    loss.backward()
    assert init.heads[0].weight.grad.abs().sum() > 0 and init.heads[1].weight.grad.abs().sum() > 0
    assert timm.create_model("mdeq_tiny").fullstage.initializer is None  # only when asked for


def test_warm_start_and_bad_z0(x):
    model = timm.create_model("mdeq_tiny", num_classes=10, deq=dict(solver="broyden", max_iter=12, tol=1e-3)).eval()
    x = x[:1, :, :16, :16]
    with torch.no_grad():
        model(x)
        cold = model.deq_stats.nstep.float().mean()
        z_star = model.forward_equilibrium(x)
        model.forward_equilibrium(x, z0=z_star)
        warm = model.deq_stats.nstep.float().mean()
        assert warm < cold  # starting at the equilibrium needs (far) fewer steps
        with pytest.raises(ValueError, match="z0 must be 2 tensors"):
            model(x, z0=z_star[:1])


def test_correction_outputs_are_head_outputs_at_trajectory_states(x):
    model = timm.create_model("mdeq_tiny", num_classes=10, deq=dict(max_iter=8, tol=0.0, correction_states=3))
    out = model(x)
    aux = model.deq_stats.aux_outputs
    assert len(aux) == 3 and all(a.shape == out.shape and a.requires_grad for a in aux)
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=5, num_channels=(8, 16, 32, 64), num_groups=4,
                                         expansion_factor=2, deq=dict(max_iter=6, tol=0.0, correction_states=2,
                                                                      solver="anderson"))
    seg_out = seg(torch.randn(2, 3, 64, 64))
    assert len(seg.deq_stats.aux_outputs) == 2 and seg.deq_stats.aux_outputs[0].shape == seg_out.shape


def test_consistency_student_is_part_of_the_model_and_untrained_it_is_one_teacher_step(x):
    model = timm.create_model("mdeq_tiny", num_classes=10, student=True, deq=dict(solver="consistency", max_iter=1))
    model.eval()
    assert any(k.startswith("fullstage.student.") for k in model.state_dict())
    with pytest.raises(ValueError, match="num_train_steps"):
        with torch.no_grad():
            model(x)
    model.fullstage.student.num_train_steps = 10
    with torch.no_grad():
        stage = model.fullstage
        inj = model.forward_stem(x)[1]
        z = stage(inj)
        t0 = stage.student.times()[0].item()
        T = stage.student.T
        one_step = stage.cell(stage.initial_state(inj), inj)
        # F(0, eps) = (eps/T) 0 + ((T - eps)/T) G(f(0)) and an untrained G is the identity
        for a, b in zip(z, one_step):
            torch.testing.assert_close(a, (T - t0) / T * b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, deq", [({}, dict(solver="anderson")), ({}, dict(solver="broyden")),
                                       ({}, dict(solver="fixed_point")),
                                       (dict(skip_init=True), dict(solver="anderson")),
                                       ({}, dict(solver="anderson", init="skip_reg")), ({}, dict(solver="ode")),
                                       (dict(student=True), dict(solver="consistency")), ({}, dict(solver="unroll"))])
def test_budget_options_spend_exactly_k_f_evaluations(arch, deq, x):
    model = timm.create_model("mdeq_tiny", num_classes=10, deq=deq, **arch).eval()
    if model.fullstage.student is not None:
        model.fullstage.student.num_train_steps = 8
    calls = [0]
    cell = model.fullstage.cell

    def counted(*a, **k):
        calls[0] += 1
        return cell(*a, **k)

    model.fullstage.cell = counted
    base = dict(model.deq.options)
    for k in (1, 2, 3, 4, 8):
        model.configure_deq(**{**base, **budget_options(base, k)})
        calls[0] = 0
        with torch.no_grad():
            model(x)
        assert calls[0] == model.deq_stats.nfe, (deq, k)
        if deq["solver"] == "ode":  # whole Runge-Kutta steps only: 1 + 3n evaluations (bosh3) within the budget
            assert calls[0] == 1 + 3 * ((k - 1) // 3)
        else:
            assert calls[0] == k, (deq, k)


def test_architecture_fields_build_the_parts_and_run_time_settings_never_change_modules(x):
    plain = timm.create_model("mdeq_tiny", num_classes=10)
    keys = set(plain.state_dict())
    with pytest.raises(ValueError, match="skip_init=True"):  # refused when set, not at the next forward
        plain.configure_deq(init="skip")
    with pytest.raises(ValueError, match="student=True"):
        plain.configure_deq(solver="consistency")
    for settings in (dict(init="skip_reg"), dict(solver="ode"), dict(solver="unroll", max_iter=2), dict(record="all"),
                     dict(correction_states=2), dict(backward="phantom")):
        plain.configure_deq(**settings)
        assert set(plain.state_dict()) == keys and plain.addon_prefixes() == ()
    both = timm.create_model("mdeq_tiny", num_classes=10, skip_init=True, student=True)
    assert both.addon_prefixes() == ("fullstage.initializer.", "fullstage.student.")
    both.configure_deq(init="zeros")  # the predictor is not used, but stays: a model's parts are its architecture
    assert any(k.startswith("fullstage.initializer.") for k in both.state_dict())


@pytest.mark.parametrize("old, field", [(dict(init="skip"), "skip_init"), (dict(solver="consistency"), "student")])
def test_the_old_spelling_still_builds_the_part_and_names_the_new_one(old, field):
    with pytest.warns(FutureWarning, match=f"{field}=True"):
        model = timm.create_model("mdeq_tiny", num_classes=10, deq=old)
    assert getattr(model.cfg, field) and model.addon_prefixes()
