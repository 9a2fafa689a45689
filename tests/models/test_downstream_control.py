"""Solver control of MDEQs inside downstream wrappers: ``mdeq.configure_deq(module, ...)`` / ``mdeq.deq_stats(module)``
on smp models, timm's features_only wrapper (``MDEQFeatures``) and a user's model holding two MDEQs; which presets
segmentation_models_pytorch accepts as ``tu-`` encoders."""
import sys

import pytest
import timm
import torch
from torch import nn
from timm.models._features import FeatureGetterNet

import mdeq
from mdeq.models import MDEQFeatures

BUDGET = dict(solver="anderson", max_iter=3, b_max_iter=3)


def _error(fn, *args, **kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_model_on_tu_mdeq_small_runs_with_the_solver_set_through_configure_deq(arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = getattr(smp, arch)("tu-mdeq_small", encoder_weights=None, classes=3)
    path = "encoder.model.model.fullstage"  # smp encoder -> MDEQFeatures -> MDEQNet -> the equilibrium stage
    assert isinstance(model.encoder.model, MDEQFeatures)
    assert mdeq.deq_stats(model) == {path: None}  # not run yet
    deqs = mdeq.configure_deq(model, **BUDGET)
    assert list(deqs) == [path] and deqs[path] is model.encoder.model.model.fullstage.deq
    assert (deqs[path].solver, deqs[path].max_iter, deqs[path].b_max_iter) == ("anderson", 3, 3)

    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    stats = mdeq.deq_stats(model)
    assert list(stats) == [path]
    s = stats[path]
    assert s.solver == "anderson" and s.nfe <= 3 and int(s.nstep.max()) <= 3 and s.nstep.shape == (2,)
    assert s.backward is not None and s.backward.nfe <= 3  # the implicit backward ran under the same budget
    assert s is model.encoder.model.deq_stats  # the wrapper's own view
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in model.encoder.model.model.fullstage.parameters() if g is not None)


def test_features_only_wrapper_has_the_models_deq_control():
    feats = timm.create_model("mdeq_tiny", features_only=True)
    model = timm.create_model("mdeq_tiny")
    assert isinstance(feats, MDEQFeatures) and isinstance(feats, FeatureGetterNet)
    assert feats.deq_stats is None
    deq = feats.configure_deq(solver="fixed_point", max_iter=2)
    assert deq is feats.model.fullstage.deq and (deq.solver, deq.max_iter) == ("fixed_point", 2)
    with torch.no_grad():
        outs = feats(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs] == [(24, 32, 32), (24, 32, 32), (24, 16, 16)]
    assert feats.deq_stats.solver == "fixed_point" and feats.deq_stats.nfe <= 2

    # options are checked by the model's own check: same exception, same message, nothing changed
    for bad in (dict(max_iter=0), dict(solver="nope"), dict(maxiter=3), dict(solver="consistency"),
                dict(init="skip")):
        assert _error(feats.configure_deq, **bad) == _error(model.configure_deq, **bad)
        assert _error(mdeq.configure_deq, feats, **bad) == _error(model.configure_deq, **bad)
    assert (feats.model.fullstage.deq.solver, feats.model.fullstage.deq.max_iter) == ("fixed_point", 2)

    # only the stem tap kept: the equilibrium stage is pruned, there is no solver to set
    stem = timm.create_model("mdeq_tiny", features_only=True, out_indices=(0,))
    assert stem.deq_stats is None and mdeq.find_mdeqs(stem) == {}
    with pytest.raises(ValueError, match=r"^no MDEQ found in MDEQFeatures"):
        stem.configure_deq(max_iter=3)


class TwoMDEQs(nn.Module):
    """A user's model: two MDEQ classifiers on two views, one of them with the Skip DEQ predictor."""

    def __init__(self):
        super().__init__()
        self.rgb = timm.create_model("mdeq_tiny", num_classes=4)
        self.aux = nn.Sequential(timm.create_model("mdeq_tiny", num_classes=4, skip_init=True))

    def forward(self, x):
        return self.rgb(x) + self.aux(x.flip(-1))


def test_users_model_with_two_mdeqs():
    model = TwoMDEQs()
    paths = ["rgb.fullstage", "aux.0.fullstage"]
    assert list(mdeq.find_mdeqs(model)) == paths  # each equilibrium once, not also as its enclosing model
    assert mdeq.deq_stats(model) == {p: None for p in paths}
    deqs = mdeq.configure_deq(model, solver="anderson", max_iter=3, b_max_iter=2)
    assert list(deqs) == paths
    assert deqs["rgb.fullstage"] is model.rgb.deq and deqs["aux.0.fullstage"] is model.aux[0].deq
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    stats = mdeq.deq_stats(model)
    assert list(stats) == paths and stats["rgb.fullstage"] is not stats["aux.0.fullstage"]
    for s in stats.values():
        assert s.solver == "anderson" and s.nfe <= 3 and int(s.nstep.max()) <= 3 and s.backward.nfe <= 2

    # all or nothing: init='skip' needs the predictor only aux has -> the model's own error, and neither changes
    before = [d.settings for d in deqs.values()]
    kind, message = _error(mdeq.configure_deq, model, init="skip")
    assert (kind, message) == _error(model.rgb.configure_deq, init="skip")
    assert [d.settings for d in deqs.values()] == before
    with pytest.raises(ValueError) as info:
        mdeq.configure_deq(model, max_iter=-1)
    assert str(info.value) == _error(model.rgb.configure_deq, max_iter=-1)[1]
    if sys.version_info >= (3, 11):  # the note naming the MDEQ that refused
        assert "refused by the MDEQ at 'rgb.fullstage'" in "".join(info.value.__notes__)
    mdeq.configure_deq(model.aux, init="skip")  # the one that has the predictor accepts it
    assert model.aux[0].deq.init == "skip" and model.rgb.deq.options["init"] != "skip"

    # a stage shared by two parents is one MDEQ, configured once
    shared = nn.ModuleDict(dict(a=model.rgb, b=model.rgb))
    assert list(mdeq.find_mdeqs(shared)) == ["a.fullstage"]
    assert list(mdeq.find_mdeqs(model.rgb.fullstage)) == [""]


def test_module_without_mdeq_is_refused():
    for fn in (mdeq.configure_deq, mdeq.deq_stats):
        with pytest.raises(ValueError, match=r"^no MDEQ found in Sequential"):
            fn(nn.Sequential(nn.Conv2d(3, 3, 1)), **({"max_iter": 3} if fn is mdeq.configure_deq else {}))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        mdeq.deq_stats("mdeq_small")


# the reductions of the default feature taps: the stem tap (after the first stem conv) and one per branch
TAP_REDUCTIONS = {
    "mdeq_tiny": [1, 1, 2],  # CIFAR stem (downsample_times=0): the stem tap and branch 0 are both at 1/1
    "mdeq_cifar_large": [1, 1, 2, 4, 8],
    "mdeq_small": [2, 4, 8, 16, 32],  # ImageNet stem (downsample_times=2): 1/2, then branches at 1/4 .. 1/32
    "mdeq_large": [2, 4, 8, 16, 32],
    "mdeq_xl": [2, 4, 8, 16, 32],
}


@pytest.mark.parametrize("name", sorted(TAP_REDUCTIONS))
def test_which_presets_smp_accepts_as_encoders(name):
    """smp's tu- encoders need each tap to halve the previous one ((2, 4, .., 32), (4, .., 32) or (1, 2, .., 16));
    the CIFAR presets have two taps at full resolution and are refused (an ImageNet stem through smp's kwargs does
    not help: smp checks the taps of the model built from the name alone)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    with torch.device("meta"):
        assert timm.create_model(name, features_only=True).feature_info.reduction() == TAP_REDUCTIONS[name]
        if TAP_REDUCTIONS[name][0] == 1:
            with pytest.raises(ValueError, match="Unsupported model downsampling pattern"):
                smp.Unet(f"tu-{name}", encoder_weights=None)
            with pytest.raises(ValueError, match="Unsupported model downsampling pattern"):
                smp.Unet(f"tu-{name}", encoder_weights=None, downsample_times=2)
        else:
            unet = smp.Unet(f"tu-{name}", encoder_weights=None)
            assert unet.encoder.out_channels[1:] == timm.create_model(name, features_only=True).feature_info.channels()
            assert list(mdeq.find_mdeqs(unet)) == ["encoder.model.model.fullstage"]
