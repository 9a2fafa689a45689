import json
from pathlib import Path

import pytest
import timm
import torch

import mdeq
from mdeq.core.state import is_channels_last
from mdeq.models import CLS_PRESETS, MDEQConfig, create_segmentation_model, to_official_state_dict
from mdeq.models.config import official_solver
from tests.models import official_reference as ref

KEYS = Path(__file__).resolve().parent / "official_keys"  # copies of shared/official_mdeq/keys_*.json
CLS = {"mdeq_tiny": "cifar_tiny", "mdeq_cifar_large": "cifar_large", "mdeq_small": "imagenet_small",
       "mdeq_large": "imagenet_large", "mdeq_xl": "imagenet_xl"}
SEG = {"mdeq_small": "cityscapes_small", "mdeq_large": "cityscapes_large", "mdeq_xl": "cityscapes_xl"}


def _official(name):
    return json.loads((KEYS / f"keys_{name}.json").read_text())


def _randomize_bn_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("name", sorted(CLS))
def test_classifier_presets_have_the_official_parameter_count_and_names(name):
    off = _official(CLS[name])
    model = timm.create_model(name, num_classes=off["config"]["num_classes"], device="meta")
    assert sum(p.numel() for p in model.parameters()) == off["params"]
    ours = {k: list(v.shape) for k, v in to_official_state_dict(model.state_dict()).items()}
    assert ours == dict((k, s) for k, s in off["keys"])


@pytest.mark.parametrize("name", sorted(SEG))
def test_segmentation_presets_have_the_official_parameter_count_and_names(name):
    off = _official(SEG[name])
    model = create_segmentation_model(name, num_classes=19, device="meta")
    assert sum(p.numel() for p in model.parameters()) == off["params"]
    ours = {k: list(v.shape) for k, v in to_official_state_dict(model.state_dict()).items()}
    assert ours == dict((k, s) for k, s in off["keys"])


@pytest.mark.parametrize("name,size", [("mdeq_tiny", 32), ("mdeq_small", 64), ("mdeq_cifar_large", 32)])
def test_unrolled_output_equals_the_original_forward(name, size):
    model = timm.create_model(name).eval()
    _randomize_bn_stats(model)
    model.configure_deq(solver="unroll", max_iter=model.cfg.num_layers)
    x = torch.randn(2, 3, size, size)
    W = to_official_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.classify(W, model.cfg, x), rtol=1e-5, atol=1e-5)


def test_segmentation_unrolled_output_equals_the_original_forward():
    model = create_segmentation_model("mdeq_small", num_classes=19).eval()
    _randomize_bn_stats(model)
    model.configure_deq(solver="unroll", max_iter=model.cfg.num_layers)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, ref.segment(to_official_state_dict(model.state_dict()), model.cfg, x),
                                   rtol=1e-5, atol=1e-5)
        assert out.shape == (1, 19, 16, 32)  # 1/4 of the input
        assert model.predict(x).shape == (1, 19, 64, 128)


def test_deq_mode_iterates_the_same_cell_as_the_unrolled_mode():
    # fixed-point iteration's residual trace is ||z_{k+1} - z_k|| along the unrolled trajectory
    model = timm.create_model("mdeq_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.configure_deq(solver="fixed_point", max_iter=5, tol=0.0, stop_mode="abs", trace=True)
        model.forward_equilibrium(x)
        trace = model.deq_stats.trace
        unrolled = []
        for k in range(6):
            model.configure_deq(solver="unroll", max_iter=k) if k else None
            z = model.forward_equilibrium(x) if k else [torch.zeros_like(t) for t in model.forward_equilibrium(x)]
            unrolled.append(torch.cat([t.flatten(1) for t in z], 1))
    diffs = torch.stack([(unrolled[k + 1] - unrolled[k]).norm(dim=1) for k in range(5)], 1)
    assert trace.shape == (2, 5)
    torch.testing.assert_close(trace, diffs, rtol=1e-4, atol=1e-4)


def test_preset_settings_and_run_time_configuration():
    model = timm.create_model("mdeq_small")
    # the official budgets F_THRES 26 / B_THRES 27 (the original's Broyden evaluates f at z0, then takes the
    # threshold's steps; max_iter counts every evaluation) and tolerance, solved by Anderson, the faster solver
    assert model.deq.solver == "anderson" and model.deq.max_iter == 26 + 1 and model.deq.b_max_iter == 27 + 1
    assert model.deq.b_solver == "anderson" and model.deq.stop_mode == "abs" and model.deq.tol == 1e-3
    # the original's Broyden (memory = threshold) is one call away; the catalog's official entries carry it
    model.configure_deq(**official_solver(26, 27, "abs"))
    assert model.deq.solver == "broyden" and model.deq.solver_options == {"memory": 26}
    assert (model.deq.max_iter, model.deq.b_max_iter, model.deq.b_solver_options) == (27, 28, {"memory": 27})
    tiny = timm.create_model("mdeq_tiny", deq=dict(solver="anderson", max_iter=12, solver_options={}))
    assert tiny.deq.solver == "anderson" and tiny.deq.max_iter == 12 and tiny.deq.stop_mode == "rel"
    tiny.configure_deq(solver="fixed_point", max_iter=3, tol=0.0, solver_options={})
    with torch.no_grad():
        tiny.eval()(torch.randn(2, 3, 32, 32))
    assert tiny.deq_stats.nfe == 3
    with pytest.raises(ValueError, match="unknown solver"):
        tiny.configure_deq(solver="newton")
    with pytest.raises(TypeError):
        timm.create_model("mdeq_tiny", not_an_option=1)


def test_config_fields_are_create_model_keywords():
    model = timm.create_model("mdeq_tiny", num_channels=(16, 16), head_channels=(4, 8), final_chansize=32,
                              dropout=0.0, num_layers=4, num_classes=3)
    assert model.cfg.num_channels == (16, 16) and model.cfg.num_layers == 4 and model.num_features == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="num_groups"):
        timm.create_model("mdeq_tiny", num_channels=(12, 12))
    assert CLS_PRESETS["mdeq_small"].size_divisor == 32 and isinstance(CLS_PRESETS["mdeq_small"], MDEQConfig)


def test_wrong_input_size_names_valid_sizes_and_in_chans_works():
    model = timm.create_model("mdeq_small").eval()
    with pytest.raises(ValueError, match=r"100x112 .* multiples of 32 .* H 96 or 128, W 96 or 128"):
        model(torch.randn(1, 3, 100, 112))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    gray = timm.create_model("mdeq_tiny", in_chans=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_features_only_gives_the_stem_tap_and_every_branch():
    feats = timm.create_model("mdeq_small", features_only=True).eval()
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert feats.feature_info.channels() == [32, 32, 64, 128, 256]
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in out] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


def test_training_step_reaches_every_parameter_and_weight_norm_is_computed_once():
    model = timm.create_model("mdeq_tiny", deq=dict(solver="anderson", max_iter=6, solver_options={}))
    calls = []
    for name, sub in model.named_modules():
        if name.endswith("parametrizations.weight"):
            sub[0].register_forward_hook(lambda *a: calls.append(1))
    model.jac_probes = 1
    out = model(torch.randn(2, 3, 32, 32))
    (out.square().mean() + model.deq_stats.jac_loss).backward()
    assert len(calls) == 3 * model.cfg.num_branches  # conv1, conv2, post-fuse conv: once per forward
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert model.deq_stats.backward is not None and model.deq_stats.nfe == 6


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_channels_last_model_solves_in_channels_last_and_equals_the_nchw_model(solver):
    # model.to(memory_format=channels_last) with a channels-last input keeps the whole state channels-last.
    # Training is compared in float64: with dropout, a GroupNorm group whose channels are all dropped has zero
    # variance, and float32 rounding (a different summation order) then moves some gradients by ~1%
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny", deq=dict(solver=solver, max_iter=6, tol=0.0))
    fast = timm.create_model("mdeq_tiny", deq=dict(solver=solver, max_iter=6, tol=0.0))
    fast.load_state_dict(model.state_dict())
    fast.to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 16, 16)
    xf = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(xf), model.eval()(x), rtol=1e-5, atol=1e-5)
        z = fast.forward_equilibrium(xf)
    assert all(is_channels_last(t) for t in z)  # views into the solver's (B, D) matrix, NHWC per sample
    model.double().train(), fast.double().train()
    torch.manual_seed(1)
    ref = model(x.double())
    torch.manual_seed(1)  # the same dropout masks
    out = fast(xf.double())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    grads = dict(fast.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-8, atol=1e-10)


def test_model_deep_copies_and_works_with_model_ema_after_a_regularised_training_step():
    import copy

    from timm.utils import ModelEmaV3

    model = timm.create_model("mdeq_tiny", deq=dict(solver="anderson", max_iter=4, solver_options={}))
    model.jac_probes = 1
    out = model(torch.randn(2, 3, 32, 32))
    (out.sum() + model.deq_stats.jac_loss).backward()
    ema = ModelEmaV3(model, decay=0.9)
    clone = copy.deepcopy(model)
    assert clone.deq_stats is None and model.deq_stats is not None
    ema.update(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ema.module.eval()(x), clone.eval()(x))
