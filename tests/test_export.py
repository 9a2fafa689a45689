"""``mdeq.export``: the fixed-budget module computes what the model computes at k f-evaluations, eagerly, traced,
as a torch.export program and in ONNX Runtime; the model is left alone; bad requests say what exports."""
import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import mdeq
from mdeq.core import DEQ, budget_options
from mdeq.core.norm import has_weight_norm
from mdeq.export import (EXPORTABLE_SOLVERS, budget_reference, export_format, export_program, fixed_budget,
                         run_exported, save_exported)

pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")]

SIZE = 16
# method -> (architecture kwargs, configure_deq settings)
METHODS = {
    "fixed_point": ({}, dict(solver="fixed_point")),
    "anderson": ({}, dict(solver="anderson")),
    "skip": (dict(skip_init=True), dict(solver="fixed_point", init="skip")),
    "skip_reg": ({}, dict(solver="fixed_point", init="skip_reg")),
    "consistency": (dict(student=True), dict(solver="consistency")),
    "unroll": ({}, dict(solver="unroll")),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The graphs here are tiny: one intra-op thread is as fast, and does not stall when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """mdeq_tiny with the shipped digits weights, the cell's weight-norm magnitudes negated so that the iteration
    does not contract (the best iterate is often not the last), the Skip DEQ predictor and the C-DEQ student
    perturbed away from their init (which predicts zeros / is one teacher step)."""
    torch.manual_seed(0)
    digits = timm.create_model("mdeq_tiny.digits", pretrained=True).state_dict()
    out = {}
    for arch in ({}, dict(skip_init=True), dict(student=True)):
        model = timm.create_model("mdeq_tiny", num_classes=10, **arch)
        missing, unexpected = model.load_state_dict(digits, strict=False)
        assert not unexpected and all(k.startswith(("fullstage.initializer", "fullstage.student")) for k in missing)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("fullstage") and name.endswith("parametrizations.weight.original0"):
                    p.neg_()
                elif name.startswith(("fullstage.initializer", "fullstage.student")):
                    p.add_(0.05 * torch.randn_like(p))
        if arch.get("student"):
            model.fullstage.student.num_train_steps = 6
        out[tuple(arch)] = model.eval()
    return out


def _model(models, method):
    return models[tuple(METHODS[method][0])]


def _images(batch, seed=1, size=SIZE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(out, ref, rel):
    diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 0.1 and diff <= rel * scale, (diff, scale)  # outputs large enough to compare


def _stats(model, k, x, **changes):
    """The model's SolverStats at budget k (which iterate each sample returned)."""
    net = copy.deepcopy(model)
    net.configure_deq(**changes)
    net.configure_deq(**budget_options(net.deq.options, k))
    with torch.no_grad():
        net(x)
    return net.deq_stats


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_the_model_eager_and_traced(models, method, k):
    model, changes = _model(models, method), METHODS[method][1]
    x = _images(3)
    ref = budget_reference(model, k, x, **changes)
    net = fixed_budget(model, k, **changes)
    with torch.no_grad():
        _assert_close(net(x), ref, 1e-5)
        traced = torch.jit.trace(net, _images(2, seed=2), check_trace=False)  # another batch size: B is dynamic
        _assert_close(traced(x), ref, 1e-5)


def test_the_best_iterate_is_selected_per_sample(models):
    """The negated cell's residuals rise again after a few steps: the returned iterate is not the last one."""
    x = _images(3)
    stats = _stats(_model(models, "fixed_point"), 5, x, solver="fixed_point")
    assert (stats.nstep < 5).all() and (stats.nstep > 1).any()


@pytest.mark.parametrize("k,changes,expect", [
    (4, dict(solver="anderson", solver_options=dict(m=2, damping=0.9)), "mixed"),  # per-sample choice, history wraps
    (6, dict(solver="fixed_point", solver_options=dict(damping=0.95)), "mixed"),
    (8, dict(solver="anderson", solver_options=dict(m=2)), "not_last"),
    (5, dict(solver="anderson", solver_options=dict(m=3, lam=0.0)), "not_last"),
    (5, dict(solver="anderson", stop_mode="abs"), None),
    (5, dict(solver="fixed_point", stop_mode="abs"), "not_last"),
    (5, dict(solver="fixed_point", solver_options=dict(divergence_factor=1.1)), "diverged"),  # frozen, fallback
    (5, dict(solver="fixed_point", stop_mode="abs", solver_options=dict(divergence_factor=1.1)), "diverged"),
])
def test_solver_settings_and_per_sample_bookkeeping(models, k, changes, expect):
    model, x = models[()], _images(3)
    stats = _stats(model, k, x, **changes)
    if expect == "mixed":
        assert (stats.nstep < k).any() and len(set(stats.nstep.tolist())) > 1, stats.nstep  # samples differ
    elif expect == "not_last":
        assert (stats.nstep < k).all(), stats.nstep
    elif expect == "diverged":
        assert stats.diverged.any()
    with torch.no_grad():
        _assert_close(fixed_budget(model, k, **changes)(x), budget_reference(model, k, x, **changes), 1e-5)


class _Several(nn.Module):
    """Several fixed-budget modules in one graph: one export (and one ONNX conversion) checks them all."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x):
        return tuple(net(x) for net in self.nets)


def test_torch_export_and_onnx_runtime(models, tmp_path):
    """Every method in one graph: exported at batch 2, run at batch 3 as a torch.export program and in ONNX Runtime
    (converted without the ONNX optimiser, for time; the command-line test runs an optimised file)."""
    cases = [(method, 2) for method in METHODS if method != "anderson"] + [("anderson", 3), ("skip_reg", 1)]
    nets = [fixed_budget(_model(models, m), k, **METHODS[m][1]) for m, k in cases]  # anderson 3: a 2x2 system
    x = _images(3)
    refs = [budget_reference(_model(models, m), k, x, **METHODS[m][1]) for m, k in cases]
    program = export_program(_Several(nets), _images(2, seed=2))
    with torch.no_grad():
        for out, ref in zip(program.module()(x), refs):
            _assert_close(out, ref, 1e-5)
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "several.onnx"
    torch.onnx.export(program, dynamo=True, optimize=False, verbose=False).save(str(path), external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        _assert_close(torch.from_numpy(out), ref, 1e-4)


def test_a_failed_export_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    with pytest.raises(RuntimeError, match="cannot trace"):
        save_exported(Broken(), tmp_path / "broken.pt", _images(2))
    assert list(tmp_path.iterdir()) == []


def test_segmentation_model():
    torch.manual_seed(0)
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=3, num_channels=(8, 16, 32, 64), num_groups=4,
                                         expansion_factor=2, num_layers=1).eval()
    for m in seg.modules():  # the original init N(0, 0.01) makes the logits tiny: torch's default init instead
        if isinstance(m, nn.Conv2d) and not has_weight_norm(m):
            m.reset_parameters()
    x = _images(2, size=32)
    for changes in (dict(solver="fixed_point"), dict(solver="anderson", init="skip_reg")):
        ref = budget_reference(seg, 4, x, **changes)
        net = fixed_budget(seg, 4, **changes)
        with torch.no_grad():
            out = net(x)
            traced = torch.jit.trace(net, x[:1], check_trace=False)
            assert out.shape == ref.shape == (2, 3, 8, 8)
            _assert_close(out, ref, 1e-5)
            _assert_close(traced(x), ref, 1e-5)


def test_the_model_is_left_alone_and_the_module_is_plain(models):
    model = copy.deepcopy(models[("skip_init",)]).train()
    settings, state = model.deq.settings, {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(2)
    with torch.no_grad():
        before = copy.deepcopy(model).eval()(x)
        net = fixed_budget(model, 3, solver="anderson")
    assert model.training and model.deq.settings == settings
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(has_weight_norm(m) for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)  # weight norm folded in the copy only
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert not any(has_weight_norm(m) or isinstance(m, DEQ) for m in net.modules())
    assert net.budget == 3 and "3 f-evaluations: anderson from the Skip DEQ prediction" in repr(net)


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_a_budget_below_one_or_not_an_integer_is_refused(models, k):
    with pytest.raises(ValueError, match=r"budget k must be an integer >= 1"):
        fixed_budget(models[()], k)


@pytest.mark.parametrize("solver", ["broyden", "ode"])
def test_solvers_without_a_static_graph_are_refused(models, solver):
    with pytest.raises(ValueError, match=rf"solver '{solver}' does not export.*fixed_point, anderson, unroll, "
                                         rf"consistency"):
        fixed_budget(models[()], 4, solver=solver)
    assert sorted(EXPORTABLE_SOLVERS) == ["anderson", "consistency", "fixed_point", "unroll"]
    # Skip Reg. DEQ at a budget of one is f(0), whatever the solver
    x = _images(2)
    with torch.no_grad():
        _assert_close(fixed_budget(models[()], 1, solver=solver, init="skip_reg")(x),
                      budget_reference(models[()], 1, x, solver=solver, init="skip_reg"), 1e-5)


def test_other_bad_requests(models):
    with pytest.raises(ValueError, match=r"exports MDEQ models .*got Linear"):
        fixed_budget(nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match=r"needs predictor.*skip_init=True"):
        fixed_budget(models[()], 2, init="skip")
    untrained = timm.create_model("mdeq_tiny", num_classes=10, student=True)
    with pytest.raises(ValueError, match=r"num_train_steps"):
        fixed_budget(untrained, 2, solver="consistency")
    with pytest.raises(ValueError, match=r"cannot tell the format.*\.onnx"):
        export_format("model.bin")


def test_command_line(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from mdeq.cli.export import main, run

    out = run(["mdeq_tiny.digits", "--budget", "3", "--output", str(tmp_path / "digits.onnx"), "--check"])
    assert out["format"] == "onnx" and out["input_size"] == [3, 16, 16] and (tmp_path / "digits.onnx").is_file()
    assert out["max_abs_diff"] <= 1e-4 * out["max_abs_output"]
    assert "max |difference|" in capsys.readouterr().out
    assert main(["mdeq_tiny.digits", "--solver", "fixed_point", "--init", "skip_reg", "--budget", "3", "--format",
                 "export", "--output", str(tmp_path / "digits.pt2"), "--check"]) == 0
    assert "at 3 f-evaluations" in capsys.readouterr().out
    out = run(["mdeq_tiny.digits", "--solver", "unroll", "--output", str(tmp_path / "digits.pt"), "--check"])
    assert out["budget"] == 8 and out["format"] == "torchscript" and out["max_abs_diff"] == 0  # the model's max_iter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx", "digits.pt", "digits.pt2"]
    with pytest.raises(SystemExit):
        run(["mdeq_tiny.digits", "--output", str(tmp_path / "x.pt"), "--input-size", "15"])
    assert "multiples of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["mdeq_tiny.digits", "--output", str(tmp_path / "x.pt"), "--budget", "0"])
    assert "--budget must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- streaming
def _video(frames=4, batch=2, size=SIZE):
    """Slowly changing frames; stream 1's third frame has a NaN pixel."""
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(batch, 3, size, size, generator=g)]
    for _ in range(frames - 1):
        x.append(x[-1] + 0.05 * torch.randn(batch, 3, size, size, generator=g))
    x[2] = x[2].clone()
    x[2][1, 0, 1, 1] = float("nan")
    return x


def _close_or_both_nan(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a.nan_to_num(0), b.nan_to_num(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["anderson", "fixed_point", "skip", "skip_reg", "consistency"])
def test_streaming_module_matches_mdeq_stream_frame_by_frame(models, method):
    model, changes = _model(models, method), METHODS[method][1]
    ref = copy.deepcopy(model)
    ref.configure_deq(**changes)
    eager = mdeq.stream(ref, **budget_options(ref.deq.options, 2))
    net = fixed_budget(model, 2, stream=True, **changes)
    frames = _video()
    state, fresh = net.start(frames[0])
    assert state.shape == (2, sum(t.numel() for t in model.fullstage.initial_state(
        model.forward_stem(frames[0])[1])) // 2) and fresh.all()
    with torch.no_grad():
        for t, x in enumerate(frames):
            if t == 3:  # a cut in stream 0
                eager.reset([0])
                fresh = fresh.clone()
                fresh[0] = True
            out, state, fresh = net(x, state, fresh)
            _close_or_both_nan(out, eager(x))
            _close_or_both_nan(state, torch.cat([z.flatten(1) for z in eager.state["fullstage"]], dim=1))
            assert fresh.tolist() == eager.fresh.tolist() == [False, t == 2]


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_streaming_files_carry_the_state(models, tmp_path, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    net = fixed_budget(models[()], 2, stream=True, solver="anderson")
    frames = _video(frames=3)
    state, fresh = net.start(frames[0])
    path = save_exported(net, tmp_path / f"stream{suffix}", (frames[0], state, fresh))
    file_state, file_fresh = state, fresh
    with torch.no_grad():
        for x in frames:
            out, state, fresh = net(x, state, fresh)
            file_out, file_state, file_fresh = run_exported(path, (x, file_state, file_fresh))
            _close_or_both_nan(file_out, out)
            _close_or_both_nan(file_state, state)
            assert file_fresh.tolist() == fresh.tolist()
    if suffix == ".onnx":
        import onnx
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == ["images", "state", "fresh"]
        assert [o.name for o in graph.output] == ["output", "next_state", "next_fresh"]


def test_command_line_streaming(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from mdeq.cli.export import run

    out = run(["mdeq_tiny.digits", "--budget", "2", "--stream", "--output", str(tmp_path / "stream.onnx"), "--check"])
    assert out["stream"] and out["budget"] == 2 and out["max_abs_diff"] <= 1e-4 * out["max_abs_output"]
    printed = capsys.readouterr().out
    assert "streaming; inputs images (B, 3, 16, 16), state (B, " in printed and "vs mdeq.stream at 2" in printed
    monkeypatch.chdir(tmp_path)  # the default file name lands here
    out = run(["mdeq_tiny.digits", "--budget", "2", "--stream", "--format", "export", "--check"])
    assert out["path"] == "mdeq_tiny_digits_k2_stream.pt2" and out["max_abs_diff"] == 0
    assert (tmp_path / out["path"]).is_file()


def test_streaming_segmentation_module():
    torch.manual_seed(0)
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=3, num_channels=(8, 16, 32, 64), num_groups=4,
                                         expansion_factor=2, num_layers=1).eval()
    net = fixed_budget(seg, 2, stream=True, solver="fixed_point")
    eager = mdeq.stream(seg, **budget_options({**seg.deq.options, "solver": "fixed_point"}, 2))
    x = _images(2, size=32)
    state, fresh = net.start(x)
    with torch.no_grad():
        for _ in range(2):
            out, state, fresh = net(x, state, fresh)
            assert out.shape == (2, 3, 8, 8)
            _close_or_both_nan(out, eager(x))
    assert "streaming" in repr(net)
    with pytest.raises(ValueError, match=r"state must be \(B, \d+\) and fresh \(B,\) bool.*start\(frames\)"):
        net(x, state[:, :-1], fresh)
