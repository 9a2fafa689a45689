import pytest
import timm
import torch

import mdeq
from mdeq.engine.seg_model import build_segmentation_model, load_classification_backbone
from mdeq.engine.weights import freeze_groups, load_backbone_weights
from mdeq.models.convert import StateDictMismatch, load_converted

NARROW = dict(num_channels=(8, 16, 32, 64), expansion_factor=2, num_groups=4)


def test_classification_backbone_fills_every_backbone_tensor_and_leaves_the_head():
    cls = timm.create_model("mdeq_small", num_classes=10, **NARROW)
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=19, **NARROW)
    head_before = {k: v.clone() for k, v in seg.state_dict().items() if k.startswith("last_layer.")}
    counts = load_classification_backbone(seg, cls.state_dict())
    assert counts["loaded"] == counts["backbone"] == 122 and counts["missing"] == []
    for k, v in seg.state_dict().items():
        if k.startswith("last_layer."):
            assert torch.equal(v, head_before[k])
        else:
            assert torch.equal(v, cls.state_dict()[k]), k


def test_classification_backbone_of_another_preset_or_foreign_weights_is_refused():
    seg = mdeq.create_segmentation_model("mdeq_small", num_classes=19, **NARROW)
    wide = timm.create_model("mdeq_small", num_classes=10, num_channels=(16, 32, 64, 128), num_groups=4,
                             expansion_factor=2)
    with pytest.raises(StateDictMismatch, match="another architecture"):
        load_classification_backbone(seg, wide.state_dict())
    with pytest.raises(StateDictMismatch, match="none of the 122 backbone tensors"):
        load_classification_backbone(seg, {"fc.weight": torch.zeros(2)})


def test_weights_of_a_model_with_frozen_batchnorm_load_back():
    """timm's freeze swaps in FrozenBatchNorm2d, which has no num_batches_tracked; such weights still load."""
    tuned = mdeq.create_segmentation_model("mdeq_small", num_classes=3, **NARROW)
    freeze_groups(tuned, ["stem"])
    sd = tuned.state_dict()
    assert not any(k.startswith("downsample.") and k.endswith("num_batches_tracked") for k in sd)
    fresh = mdeq.create_segmentation_model("mdeq_small", num_classes=3, **NARROW)
    load_converted(fresh, sd)
    assert torch.equal(fresh.downsample[1].running_var, tuned.downsample[1].running_var)
    other = mdeq.create_segmentation_model("mdeq_small", num_classes=5, **NARROW)
    fresh_head, _ = load_backbone_weights(other, sd, head_names=("last_layer.3",))
    assert fresh_head == ["last_layer.3.weight", "last_layer.3.bias"]


def test_model_config_sources_are_exclusive_and_checked():
    with pytest.raises(ValueError, match="at most one of"):
        build_segmentation_model(dict(name="mdeq_small", weights="a.pth", backbone="b.pth"), 19)
    with pytest.raises(ValueError, match="not a segmentation preset"):
        build_segmentation_model(dict(name="mdeq_tiny"), 19)
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained timm tag"):
        build_segmentation_model(dict(name="mdeq_small", kwargs=NARROW, backbone="missing_file"), 19)
