"""``mdeq.stream``: each stream's solve starts from its own previous equilibrium, the first frame (and the first
after ``reset``) as the model's own, with the per-frame settings only during the frame; faults restart a stream."""
import copy
import math

import pytest
import timm
import torch

import mdeq
from mdeq.core import DEQ, list_solvers
from mdeq.core.solvers import root_solvers

SIZE = 16  # mdeq_tiny: 2 branches of 16 and 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("mdeq_tiny", num_classes=5).eval()


@pytest.fixture(scope="module")
def video():
    """Two streams of 4 slowly changing frames (each frame = the last + a little noise)."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 3, SIZE, SIZE, generator=g)]
    for _ in range(3):
        x.append(x[-1] + 0.05 * torch.randn(2, 3, SIZE, SIZE, generator=g))
    return x


def _reference(model, frames, **options):
    """Frame by frame with the model's own API: the equilibrium of the last frame as the next z0."""
    net = copy.deepcopy(model)
    net.configure_deq(**options)
    outs, z = [], None
    with torch.no_grad():
        for x in frames:
            outs.append(net(x, z))
            z = [t.clone() for t in net.forward_equilibrium(x, z)]
    return outs


def test_each_frame_starts_from_the_previous_equilibrium(model, video):
    run = mdeq.stream(model, max_iter=3)
    got = [run(x) for x in video]
    want = _reference(model, video, max_iter=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert run.frame_index.tolist() == [3, 3]
    stats, = run.stats.values()
    assert stats.nstep.tolist() == [3, 3] and stats.nfe == 3
    # the warm start helps: the same 3 evaluations from zeros leave a larger residual on the last frame
    with torch.no_grad():
        net = copy.deepcopy(model)
        net.configure_deq(max_iter=3)
        net(video[-1])
    assert (stats.rel_residual < net.deq_stats.rel_residual).all()


def test_model_settings_are_left_alone_and_no_graph_is_kept(model, video):
    before = model.deq.settings
    run = mdeq.stream(model, max_iter=2, solver="fixed_point")
    with torch.enable_grad():
        out = run(video[0])
    assert model.deq.settings == before
    assert not out.requires_grad
    for states in run.state.values():
        assert all(t.grad_fn is None and not t.requires_grad for t in states)


@pytest.mark.parametrize("solver", root_solvers())
def test_every_root_solver_streams(model, video, solver):
    run = mdeq.stream(model, solver=solver, max_iter=4)
    got = [run(x) for x in video[:3]]
    for g, w in zip(got, _reference(model, video[:3], solver=solver, max_iter=4)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    stats, = run.stats.values()
    assert stats.solver == solver
    if solver in ("anderson", "broyden"):  # (Picard-type solvers do not contract on this untrained cell)
        residuals = []
        for _ in range(3):  # one frame shown again and again: each solve goes on where the last stopped
            run(video[0])
            residuals.append(run.stats["fullstage"].rel_residual)
        assert (residuals[2] < residuals[0]).all(), residuals


def test_two_videos_in_one_batch_do_not_share_state(model, video):
    both = mdeq.stream(model, max_iter=3)
    alone = [mdeq.stream(model, max_iter=3) for _ in range(2)]
    for x in video:
        out = both(x)
        for i in range(2):
            torch.testing.assert_close(out[i:i + 1], alone[i](x[i:i + 1]), rtol=1e-5, atol=1e-6)


def test_reset_restarts_only_the_selected_streams(model, video):
    run = mdeq.stream(model, max_iter=3)
    run(video[0])
    run(video[1])
    run.reset(torch.tensor([False, True]))
    assert run.fresh.tolist() == [False, True]
    out = run(video[2])
    want_warm = _reference(model, video[:3], max_iter=3)[-1]
    fresh = mdeq.stream(model, max_iter=3)(video[2])
    torch.testing.assert_close(out[0], want_warm[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], fresh[1], rtol=1e-5, atol=1e-6)
    assert run.frame_index.tolist() == [2, 0]
    run.reset([0])  # stream indices work too
    assert run.fresh.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"one flag per stream, shape \(2,\)"):
        run.reset(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        run.reset([5])
    run.reset([])  # no stream
    assert run.fresh.tolist() == [True, False]
    fresh_run = mdeq.stream(model, max_iter=3)
    fresh_run.reset([])  # before the first frame: checked as far as it can be, nothing to restart
    with pytest.raises(ValueError, match="bool mask or stream indices"):
        fresh_run.reset(torch.tensor([0.5, 1.0]))


def test_skip_deq_first_frame_is_the_prediction_later_frames_the_previous_equilibrium(video):
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny", num_classes=5, skip_init=True).eval()
    with torch.no_grad():  # a predictor that predicts something (an untrained one predicts zeros)
        for head in model.fullstage.initializer.heads:
            head.weight.normal_(std=0.05)
    model.configure_deq(init="skip", solver="fixed_point")
    run = mdeq.stream(model, max_iter=2)
    first = run(video[0])
    net = copy.deepcopy(model)
    net.configure_deq(max_iter=2)
    with torch.no_grad():
        torch.testing.assert_close(first, net(video[0]), rtol=1e-5, atol=1e-6)
        z = net.forward_equilibrium(video[0])
        second = run(video[1])
        net.configure_deq(init="zeros")  # the warm start, not the prediction
        torch.testing.assert_close(second, net(video[1], z), rtol=1e-5, atol=1e-6)
        net.configure_deq(init="skip")
        predicted = net.forward_equilibrium(video[1])  # the prediction's start would give another state
        assert not torch.allclose(run.state["fullstage"][0], predicted[0], atol=1e-3)


def test_a_nan_frame_gives_nan_for_its_stream_and_restarts_it(model, video):
    run = mdeq.stream(model, max_iter=3)
    clean = mdeq.stream(model, max_iter=3)
    run(video[0]), clean(video[0])
    bad = video[1].clone()
    bad[1, 0, 3, 3] = float("nan")
    out = run(bad)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], clean(video[1])[0], rtol=1e-5, atol=1e-6)
    assert run.fresh.tolist() == [False, True]
    nxt = run(video[2])
    assert torch.isfinite(nxt).all()
    torch.testing.assert_close(nxt[1], mdeq.stream(model, max_iter=3)(video[2])[1], rtol=1e-5, atol=1e-6)
    assert run.frame_index.tolist() == [2, 0]


def test_bad_input_names_reset(model, video):
    run = mdeq.stream(model, max_iter=2)
    run(video[0])
    with pytest.raises(ValueError, match=r"holds 2 streams but got 3 frames.*reset\(\)"):
        run(torch.randn(3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"frame size.*reset\(\)|state belongs to frames.*reset\(\)"):
        run(torch.randn(2, 3, 2 * SIZE, 2 * SIZE))
    run.reset()
    assert run(torch.randn(3, 3, 2 * SIZE, 2 * SIZE)).shape == (3, 5)
    for part in (model, model.classifier):  # the model, or any part of it, in train mode
        part.train()
        try:
            with pytest.raises(RuntimeError, match="eval mode.*model.eval"):
                run(torch.randn(3, 3, 2 * SIZE, 2 * SIZE))
        finally:
            model.eval()
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        mdeq.stream(model, max_iter=0)
    with pytest.raises(ValueError, match="no MDEQ found"):
        mdeq.stream(torch.nn.Conv2d(3, 3, 1))


def test_a_stage_run_twice_in_one_frame_is_refused(model, video):
    class TwoPasses(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) + self.net(x.flip(-1))

    run = mdeq.stream(TwoPasses(model).eval(), max_iter=2)
    with pytest.raises(RuntimeError, match="ran twice in one frame"):
        run(video[0])


def test_features_only_and_segmentation_models_stream(video):
    torch.manual_seed(0)
    feats = timm.create_model("mdeq_tiny", features_only=True).eval()
    run = mdeq.stream(feats, max_iter=2)
    for x in video[:2]:
        out = run(x)
    assert [tuple(t.shape[-2:]) for t in out] == [(16, 16), (16, 16), (8, 8)]  # stem tap + 2 branches
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=3, num_channels=(8, 16, 32, 64),
                                         expansion_factor=2, num_groups=4).eval()
    x = torch.randn(2, 3, 32, 32)
    run = mdeq.stream(seg, solver="anderson", max_iter=2)
    first, second = run(x), run(x)
    assert first.shape == second.shape == (2, 3, 8, 8)
    stats, = run.stats.values()
    assert stats.nfe == 2 and not math.isnan(float(stats.rel_residual.mean()))


def test_a_model_with_two_mdeqs_keeps_a_state_for_each(video):
    class Pair(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    a, b = (timm.create_model("mdeq_tiny", num_classes=5).eval() for _ in range(2))
    run = mdeq.stream(Pair(a, b).eval(), max_iter=2)
    ra, rb = mdeq.stream(a, max_iter=2), mdeq.stream(b, max_iter=2)
    for x in video:
        torch.testing.assert_close(run(x), ra(x) + rb(x), rtol=1e-5, atol=1e-6)
    assert sorted(run.stats) == sorted(run.state) == ["a.fullstage", "b.fullstage"]


def test_a_channels_last_model_streams_in_channels_last(model, video):
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    run, ref = mdeq.stream(cl, max_iter=3), mdeq.stream(model, max_iter=3)
    for x in video:
        torch.testing.assert_close(run(x.contiguous(memory_format=torch.channels_last)), ref(x), rtol=1e-4,
                                   atol=1e-5)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in run.state["fullstage"])


def test_deq_warm_mask_and_temporarily():
    """The core: warm samples start from z0 whatever init says; all warm = no initial guess computed."""
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4)
    calls = []

    def f(z):
        return torch.tanh(z @ W + 1.0)

    def predictor():
        calls.append(1)
        return torch.full((3, 4), 0.5)

    z0 = torch.randn(3, 4)
    deq = DEQ(solver="unroll", max_iter=1, init="skip")
    with torch.no_grad():
        z, _ = deq(f, z0, predictor=predictor, warm=torch.tensor([True, False, True]))
    torch.testing.assert_close(z, torch.stack([f(z0[0]), f(torch.full((4,), 0.5)), f(z0[2])]))
    calls.clear()
    with torch.no_grad():
        z, stats = deq(f, z0, predictor=predictor, warm=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(z, f(z0))
    assert stats.nfe == 1 and not calls  # every sample warm: no prediction
    deq.configure(init="skip_reg")  # its start f(z0) is one step from any z0: warm or not, exactly k evaluations
    with torch.no_grad():
        z, stats = deq(f, z0, warm=torch.tensor([True, False, True]))
    torch.testing.assert_close(z, f(f(z0)))
    assert stats.nfe == 2
    with pytest.raises(ValueError, match=r"warm must be a bool tensor of shape \(3,\)"):
        deq(f, z0, warm=torch.ones(2, dtype=torch.bool))
    before = deq.settings
    with deq.temporarily(max_iter=5, solver="fixed_point"):
        assert deq.max_iter == 5 and deq.solver == "fixed_point"
    assert deq.settings == before
    with pytest.raises(ValueError):
        with deq.temporarily(max_iter=-1):
            pass
    assert deq.settings == before
    assert "unroll" in list_solvers()
