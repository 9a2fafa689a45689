"""The MDEQ training schedule: phases, the official Jacobian-weight rule, frequency and max_iter jitter."""
import numpy as np
import pytest
import timm

import mdeq  # noqa: F401
from mdeq.engine.deq_schedule import DEQ_MODE, PRETRAIN, DEQSchedule, JacobianSchedule

DEQ = dict(solver="anderson", max_iter=14, tol=1e-3, backward="ift", b_solver="anderson", b_max_iter=14)


def test_phases_and_official_weight_rule():
    s = DEQSchedule(pretrain_steps=100, unroll_steps=5, deq=DEQ,
                    jac=JacobianSchedule(weight=2.5, freq=1.0, incremental=50, stop_epoch=7, pretrain_weight=0.03))
    assert s.plan(99, 0).phase == PRETRAIN and s.plan(100, 0).phase == DEQ_MODE
    assert s.plan(99, 0).jac_weight == pytest.approx(0.03)
    assert s.plan(99, 0).max_iter == 5  # the unrolled depth
    assert s.plan(100, 1).jac_weight == pytest.approx(2.5)
    assert s.plan(149, 1).jac_weight == pytest.approx(2.5)
    assert s.plan(150, 1).jac_weight == pytest.approx(2.6)  # +0.1 per `incremental` DEQ steps
    assert s.plan(260, 2).jac_weight == pytest.approx(2.8)
    assert s.plan(260, 7).jac_weight == 0.0 and not s.plan(260, 7).compute_jac  # stop epoch


def test_frequency_and_max_iter_jitter_are_seeded():
    s = DEQSchedule(pretrain_steps=0, deq=DEQ, max_iter_jitter=2, seed=1,
                    jac=JacobianSchedule(weight=1.0, freq=0.25))
    plans = [s.plan(t, 0) for t in range(4000)]
    frac = np.mean([p.compute_jac for p in plans])
    assert abs(frac - 0.25) < 0.03
    deltas = {p.max_iter - 14 for p in plans if p.compute_jac}
    assert deltas == {-2, -1, 0, 1}  # U{-delta..+1} on Jacobian steps
    assert {p.max_iter for p in plans if not p.compute_jac} == {14}
    again = DEQSchedule(pretrain_steps=0, deq=DEQ, max_iter_jitter=2, seed=1,
                        jac=JacobianSchedule(weight=1.0, freq=0.25))
    assert [again.plan(t, 0) for t in range(4000)] == plans  # same on every rank / after a resume
    other = DEQSchedule(pretrain_steps=0, deq=DEQ, max_iter_jitter=2, seed=2,
                        jac=JacobianSchedule(weight=1.0, freq=0.25))
    assert [other.plan(t, 0) for t in range(200)] != plans[:200]


def test_apply_configures_the_model():
    model = timm.create_model("mdeq_tiny", num_classes=3)
    s = DEQSchedule(pretrain_steps=10, unroll_steps=3, deq=DEQ, eval_max_iter=20,
                    jac=JacobianSchedule(weight=1.0, freq=1.0, probes=3))
    s.apply(model, s.plan(0, 0))
    assert model.deq.options["solver"] == "unroll" and model.deq.options["max_iter"] == 3
    assert model.jac_probes == 0
    s.apply(model, s.plan(10, 0))
    assert model.deq.options["solver"] == "anderson" and model.deq.options["max_iter"] == 14
    assert model.deq.options["b_max_iter"] == 14 and model.jac_probes == 3
    s.apply_eval(model, 5)
    assert model.deq.options["solver"] == "unroll" and model.jac_probes == 0  # still pre-training
    s.apply_eval(model, 10)
    assert model.deq.options["solver"] == "anderson" and model.deq.options["max_iter"] == 20


@pytest.mark.parametrize("bad", [dict(freq=1.5), dict(weight=-1.0), dict(incremental=-1), dict(probes=0)])
def test_bad_jacobian_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        JacobianSchedule(**bad)


def test_schedule_needs_a_forward_threshold():
    with pytest.raises(ValueError, match="max_iter"):
        DEQSchedule(deq=dict(solver="anderson"))
