"""Degenerate input: an empty batch gives empty outputs, a non-finite sample gives a non-finite output (and is
counted as diverged by the tools), as in any timm model."""
import copy
import logging

import pytest
import timm
import torch

import mdeq
from mdeq.core import DEQ
from mdeq.engine.distributed import DistEnv
from mdeq.engine.evaluate import evaluate_classifier
from mdeq.engine.seg_inference import SegInference, evaluate_segmentation
from mdeq.engine.train_stats import StatsWindow
from mdeq.export import fixed_budget
from mdeq.engine import solver_health


@pytest.fixture(autouse=True)
def _fresh_warnings():
    solver_health._warned.clear()
    yield
    solver_health._warned.clear()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("mdeq_tiny", num_classes=10).eval()


# ---------------------------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "unroll"])
def test_core_solves_an_empty_batch(solver):
    deq = DEQ(solver=solver, max_iter=5)
    w = torch.randn(6, 6) * 0.1
    for z0 in (torch.zeros(0, 6), [torch.zeros(0, 2, 3), torch.zeros(0, 4)]):
        f = (lambda z: torch.tanh(z @ w)) if isinstance(z0, torch.Tensor) else (lambda z: [torch.tanh(t) for t in z])
        z, stats = deq(f, z0)
        shapes = [t.shape for t in (z if isinstance(z, list) else [z])]
        assert shapes == [t.shape for t in (z0 if isinstance(z0, list) else [z0])]
        assert stats.nstep.shape == (0,) and stats.diverged.shape == (0,)


def test_empty_batch_gives_empty_outputs(tiny):
    x = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        assert tiny(x).shape == (0, 10)
        feats = tiny.forward_intermediates(x, intermediates_only=True)
    assert [tuple(t.shape) for t in feats] == [(0, 24, 32, 32), (0, 24, 32, 32), (0, 24, 16, 16)]
    tiny.train()
    try:
        y = tiny(x)
        y.sum().backward()  # an empty loss still reaches the parameters
    finally:
        tiny.eval()
        tiny.zero_grad(set_to_none=True)
    assert y.shape == (0, 10)


def test_empty_batch_features_and_segmentation():
    feat = timm.create_model("mdeq_small", features_only=True).eval()
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=5).eval()
    x = torch.zeros(0, 3, 64, 64)
    with torch.no_grad():
        assert [tuple(t.shape) for t in feat(x)] == [(0, 32, 32, 32), (0, 32, 16, 16), (0, 64, 8, 8),
                                                      (0, 128, 4, 4), (0, 256, 2, 2)]
        assert tuple(seg(x).shape) == (0, 5, 16, 16)
        slide = SegInference(seg, mode="slide", window=(32, 32), stride=(16, 16))
        assert tuple(slide.predict(x).shape) == (0, 64, 64)


# ---------------------------------------------------------------------------------------------- non-finite input
def _poisoned():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    bad = x.clone()
    bad[1, 0, 5, 5] = float("nan")
    bad[3, 2, 0, 31] = float("inf")
    return x, bad


def test_nonfinite_sample_gives_nonfinite_logits_and_leaves_the_others_alone(tiny):
    x, bad = _poisoned()
    with torch.no_grad():
        clean = tiny(x)
        out = tiny(bad)
        diverged = tiny.deq_stats.diverged.tolist()
    assert torch.isfinite(out).all(dim=1).tolist() == [True, False, True, False]
    assert torch.isnan(out[[1, 3]]).all()
    assert diverged == [False, True, False, True]
    torch.testing.assert_close(out[[0, 2]], clean[[0, 2]], rtol=1e-5, atol=1e-6)


def test_nonfinite_input_propagates_through_features_and_export(tiny):
    _, bad = _poisoned()
    with torch.no_grad():
        feats = tiny.forward_intermediates(bad, intermediates_only=True)
        exported = fixed_budget(tiny, 3)(bad)
    for t in feats[1:]:  # the branch states (the stem tap is local: only its NaN pixels' neighbourhood)
        assert torch.isnan(t[[1, 3]]).all() and torch.isfinite(t[[0, 2]]).all()
    assert torch.isfinite(exported).all(dim=1).tolist() == [True, False, True, False]


def test_training_forward_of_a_nonfinite_sample_is_nonfinite(tiny):
    _, bad = _poisoned()
    model = copy.deepcopy(tiny).train()  # a NaN batch poisons BatchNorm's running statistics
    out = model(bad)
    assert not torch.isfinite(out[1]).any()


def test_evaluation_counts_and_warns_once(tiny, caplog):
    _, bad = _poisoned()
    loader = [(bad, torch.tensor([0, 1, 2, 3])), (bad[:2], torch.tensor([0, 1]))]
    with caplog.at_level(logging.WARNING, logger="mdeq"):
        res = evaluate_classifier(tiny, loader, DistEnv(), progress=False)
        again = evaluate_classifier(tiny, loader, DistEnv(), progress=False)
    assert res.deq_diverged == again.deq_diverged == 3 and res.count == 6
    warnings = [r for r in caplog.records if "diverged for 3 of 6 samples" in r.getMessage()]
    assert len(warnings) == 1


def test_segmentation_evaluation_counts_diverged():
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=3).eval()
    seg.configure_deq(max_iter=2)
    x = torch.randn(2, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    loader = [(x, torch.zeros(2, 64, 64, dtype=torch.long))]
    res = evaluate_segmentation(seg, loader, DistEnv(), 3, progress=False,
                                inference=SegInference(seg, mode="slide", window=(32, 32), stride=(32, 32)))
    assert res.deq_diverged == 1 and res.as_dict()["deq_diverged"] == 1


def test_training_window_logs_diverged(tiny):
    _, bad = _poisoned()
    with torch.no_grad():
        tiny(bad)
    w = StatsWindow()
    w.add(1.0, 4, tiny.deq_stats)
    w.add(1.0, 4, tiny.deq_stats)
    assert w.deq_scalars()["deq/fwd/diverged"] == 4.0
