import math

import pytest
import torch
import torch.nn.functional as F

from mdeq.engine.seg_loss import CITYSCAPES_CLASS_WEIGHTS, SegmentationLoss, resolve_class_weights


def test_plain_ce_upsamples_logits_to_the_labels_and_skips_ignore():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 16, 16))
    target[0, :5] = 255
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    valid = target != 255
    picked = logp.permute(0, 2, 3, 1)[valid].gather(1, target[valid][:, None]).squeeze(1)
    expected = -picked.mean()
    assert SegmentationLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_weights_weight_each_pixel_by_its_true_class():
    logits = torch.zeros(1, 2, 1, 2)           # uniform: every pixel's CE is log 2
    target = torch.tensor([[[0, 1]]])
    w = torch.tensor([1.0, 3.0])
    loss = SegmentationLoss(class_weights=w)(logits, target)
    assert loss.item() == pytest.approx(math.log(2))  # weighted mean of equal losses
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3)]]]])  # pixel 1: p(true)=3/4
    loss = SegmentationLoss(class_weights=w)(logits, target)
    expected = (1 * math.log(2) + 3 * -math.log(0.75)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ohem_keeps_only_hard_pixels_but_at_least_min_kept():
    # 4 pixels with true-class probabilities 0.5, 0.95, 0.99, 0.6 (2 classes; logit of class 1 is 0)
    probs = torch.tensor([0.5, 0.95, 0.99, 0.6])
    logits = torch.stack([torch.log(probs / (1 - probs)), torch.zeros(4)]).view(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    ce = -torch.log(probs)
    # thresh 0.9, min_kept 1: the 2nd smallest probability (0.6) is below 0.9, so p < 0.9 -> the 1st and 4th
    loss = SegmentationLoss(ohem_thresh=0.9, ohem_min_kept=1)(logits, target)
    assert loss.item() == pytest.approx(((ce[0] + ce[3]) / 2).item(), rel=1e-5)
    # min_kept 3: the threshold rises to the 4th smallest probability (0.99): p < 0.99 keeps 3 pixels
    loss = SegmentationLoss(ohem_thresh=0.9, ohem_min_kept=3)(logits, target)
    assert loss.item() == pytest.approx(((ce[0] + ce[1] + ce[3]) / 3).item(), rel=1e-5)


@pytest.mark.parametrize("ohem", [None, 0.7])
def test_a_batch_with_only_ignore_pixels_is_a_differentiable_zero(ohem):
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss(ohem_thresh=ohem)(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_weight_spec_and_errors():
    assert torch.equal(resolve_class_weights("cityscapes", 19), torch.tensor(CITYSCAPES_CLASS_WEIGHTS))
    assert resolve_class_weights(None, 5) is None
    assert resolve_class_weights([1, 2], 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="19"):
        resolve_class_weights([1.0] * 18, 19)
    with pytest.raises(ValueError, match="cityscapes"):
        resolve_class_weights("ade20k", 150)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SegmentationLoss(ohem_thresh=1.5)
    with pytest.raises(ValueError, match="logits"):
        SegmentationLoss()(torch.randn(2, 3, 4), torch.zeros(2, 4, 4, dtype=torch.long))
