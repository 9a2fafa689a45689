import copy

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from mdeq.core import DEQ, VariationalDropout, apply_weight_norm, forward_scope, remove_weight_norm
from mdeq.core.norm import has_weight_norm


class ConvCell(nn.Module):
    """A small weight-normed conv cell with variational dropout, like an MDEQ block."""

    def __init__(self, ch=4, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, 2 * ch, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * ch, ch, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, ch)
        self.drop = VariationalDropout(dropout)
        with torch.no_grad():
            self.conv1.weight.mul_(0.3)
            self.conv2.weight.mul_(0.3)
        apply_weight_norm(self)

    def forward(self, z, x):
        return self.gn(torch.tanh(self.drop(self.conv2(torch.relu(self.conv1(z)))) + x)) * 0.5


class Net(nn.Module):
    def __init__(self, dropout=0.0, **deq):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.cell = ConvCell(dropout=dropout)
        self.deq = DEQ(**{"max_iter": 12, "tol": 1e-5, **deq})

    def forward(self, img):
        x = self.stem(img)
        with forward_scope(self.cell):
            z, self.stats = self.deq(lambda z: self.cell(z, x), torch.zeros_like(x))
        return z.mean(dim=(2, 3))


def _count_weight_computations(module):
    counter = {"n": 0}
    for name, sub in module.named_modules():
        if name.endswith("parametrizations.weight"):
            sub[0].register_forward_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
    return counter


def test_weight_norm_keeps_the_weight_and_uses_the_legacy_formula():
    conv = nn.Conv2d(3, 5, 3)
    w = conv.weight.detach().clone()
    assert apply_weight_norm(conv) == [""]
    torch.testing.assert_close(conv.weight, w)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (5, 1, 1, 1)
    torch.testing.assert_close(conv.weight, v * g / v.flatten(1).norm(dim=1).view(5, 1, 1, 1))
    assert apply_weight_norm(conv) == []  # idempotent
    assert remove_weight_norm(conv) == [""] and isinstance(conv.weight, nn.Parameter)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "unroll"])
def test_weight_is_computed_once_per_forward_whatever_the_solver_depth(solver):
    net = Net(solver=solver, tol=0.0, max_iter=9)
    counter = _count_weight_computations(net.cell)
    img = torch.randn(2, 3, 8, 8)
    net(img).sum().backward()
    assert net.stats.nfe == 9
    assert counter["n"] == 2  # conv1 and conv2, once each
    counter["n"] = 0
    with torch.no_grad():
        net(img)
    assert counter["n"] == 2


@pytest.mark.parametrize("options", [dict(solver="unroll", max_iter=4), dict(backward="ift"),
                                     dict(backward="phantom"), dict(backward="one_step")])
def test_cached_weight_still_gives_gradients_to_g_and_v(options):
    net = Net(**options)
    img = torch.randn(2, 3, 8, 8)
    net(img).pow(2).sum().backward()
    cached = [p.grad.clone() for p in net.cell.parameters()]
    net.zero_grad()
    # the same computation without the cache (weights recomputed at every evaluation)
    x = net.stem(img)
    z, _ = net.deq(lambda z: net.cell(z, x), torch.zeros_like(x))
    z.mean(dim=(2, 3)).pow(2).sum().backward()
    plain = [p.grad for p in net.cell.parameters()]
    names = [n for n, _ in net.cell.named_parameters()]
    assert any("original0" in n for n in names) and any("original1" in n for n in names)
    for c, p in zip(cached, plain):
        assert c.abs().sum() > 0
        torch.testing.assert_close(c, p)


def test_weight_normed_deq_model_deep_copies_and_works_with_model_ema():
    net = Net(dropout=0.2)
    img = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(img).sum().backward()  # deepcopy right after a training forward broke TorchDEQ's weight norm
    clone = copy.deepcopy(net)
    ema = ModelEmaV3(net, decay=0.5)
    opt.step()
    ema.update(net)
    net.eval(), clone.eval()
    with torch.no_grad():
        out_ema = ema.module(img)
        out_net = net(img)
        out_clone = clone(img)
    assert torch.isfinite(out_ema).all()
    assert not torch.allclose(out_ema, out_net) and not torch.allclose(out_clone, out_net)
    g_ema = ema.module.cell.conv1.parametrizations.weight.original0
    g_net = net.cell.conv1.parametrizations.weight.original0
    g_clone = clone.cell.conv1.parametrizations.weight.original0
    torch.testing.assert_close(g_ema, 0.5 * g_net + 0.5 * g_clone)


def test_dropout_mask_is_shared_by_every_iteration_and_new_each_forward():
    drop = VariationalDropout(0.5)
    seen = []
    drop.register_forward_hook(lambda m, i, o: seen.append((m.mask.clone(), torch.equal(o, i[0] * m.mask))))
    net = Net(dropout=0.5, solver="fixed_point", tol=0.0, max_iter=6)
    net.cell.drop = drop
    img = torch.randn(2, 3, 8, 8)
    net(img)
    assert len(seen) == 7  # 6 solver steps + the differentiable application
    masks = [m for m, _ in seen]
    assert all(applied for _, applied in seen)
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert masks[0].shape == (2, 4, 1, 1)  # one decision per sample and channel
    assert set(masks[0].unique().tolist()) <= {0.0, 2.0} and (masks[0] == 0).any()
    assert drop.mask is None  # released at the end of the forward
    seen.clear()
    torch.manual_seed(123)
    net(img)
    assert not torch.equal(seen[0][0], masks[0])


def test_dropout_is_identity_in_eval_and_mask_follows_the_input_device():
    drop = VariationalDropout(0.3)
    x = torch.randn(4, 6, 5, 5)
    drop.eval()
    assert torch.equal(drop(x), x) and drop.mask is None
    drop.train()
    out = drop(torch.empty(4, 6, 5, 5, device="meta"))
    assert out.device.type == "meta" and drop.mask.device.type == "meta"
    y = drop(x)  # a mask on another device is not reused
    assert drop.mask.device == x.device and y.shape == x.shape
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalDropout(1.0)


def test_dropout_mask_is_the_same_for_the_float32_solve_and_the_autocast_application():
    net = Net(dropout=0.5, solver="fixed_point", tol=0.0, max_iter=4)
    masks = []
    net.cell.drop.register_forward_hook(lambda m, i, o: masks.append((m.mask, i[0].dtype, torch.equal(o, i[0] * m.mask.to(i[0].dtype)))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 3, 8, 8)).float().sum().backward()
    assert {dtype for _, dtype, _ in masks} == {torch.float32, torch.bfloat16}
    assert all(m is masks[0][0] for m, _, _ in masks) and all(ok for _, _, ok in masks)


def test_dropout_refuses_a_state_of_another_shape_within_one_forward():
    drop = VariationalDropout(0.2)
    drop(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="reset_dropout"):
        drop(torch.randn(2, 5, 4, 4))


def test_removing_weight_norm_from_a_deep_copy_leaves_the_original_weight_normed():
    import copy

    conv = nn.Conv2d(3, 4, 3)
    apply_weight_norm(conv)
    clone = copy.deepcopy(conv)
    remove_weight_norm(clone)
    assert isinstance(clone.weight, nn.Parameter) and has_weight_norm(conv)
    torch.testing.assert_close(conv.weight, clone.weight)  # the original still computes its weight
