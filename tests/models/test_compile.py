"""The compiled cell (``model.compile_cell()``): the same outputs as the eager cell, compiled once, not per
iteration, with weight norm and variational dropout."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import mdeq  # noqa: F401


def _pair(**kw):
    torch.manual_seed(0)
    eager = timm.create_model("mdeq_tiny", **kw)
    compiled = copy.deepcopy(eager)
    compiled.compile_cell(dynamic=False)
    return eager, compiled


def test_compiled_cell_equals_the_eager_cell_in_eval_and_training():
    eager, compiled = _pair(deq=dict(solver="anderson", max_iter=5, tol=0.0))
    assert eager.cfg.dropout > 0 and eager.fullstage.branches[0].blocks[0].conv1.parametrizations
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-6)
    eager.train(), compiled.train()
    torch.manual_seed(1)
    ref = eager(x)
    torch.manual_seed(1)  # the masks are drawn eagerly: the same seed, the same masks
    out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(compiled.fullstage.named_parameters())
    # the cell's parameters, by norm: with dropout, a GroupNorm group whose channels are all dropped has zero
    # variance and moves a few float32 entries by ~1% (as any change of summation order)
    for name, p in eager.fullstage.named_parameters():
        assert (grads[name].grad - p.grad).norm() <= 1e-3 * p.grad.norm() + 1e-7, name
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_the_cell_is_compiled_once_not_per_iteration_and_copies_recompile_lazily():
    torch._dynamo.reset()
    counters.clear()
    _, model = _pair(deq=dict(solver="fixed_point", max_iter=4, tol=0.0))
    model.compile_cell(backend="aot_eager")  # the graph capture is what matters here, not the code generator
    x = torch.randn(2, 3, 16, 16)
    for train in (False, True):
        model.train(train)
        model(x).sum().backward() if train else model(x)
    captured = counters["stats"]["unique_graphs"]
    for train in (False, True, False, True):  # more forwards (4 cell evaluations each), same shapes and modes
        model.train(train)
        model(x).sum().backward() if train else model(x)
    assert counters["stats"]["unique_graphs"] == captured > 0
    ema = timm.utils.ModelEmaV3(model)  # deep copy: the compiled function is not copied, the option is
    assert ema.module.fullstage.compile_options == {"backend": "aot_eager"}
    assert ema.module.fullstage._compiled_cell is None
    model.compile_cell(False)
    assert model.fullstage.compile_options is None


@pytest.mark.parametrize("bad", [dict(mode="fastest")])
def test_bad_compile_options_fail_at_first_use_with_torchs_message(bad):
    _, model = _pair(deq=dict(solver="fixed_point", max_iter=2, tol=0.0))
    model.compile_cell(**bad)
    with pytest.raises(RuntimeError, match="fastest"):
        model.eval()(torch.randn(1, 3, 16, 16))
