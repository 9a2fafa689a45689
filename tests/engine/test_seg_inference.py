"""Segmentation inference modes (whole, slide, padding, flip, multi-scale) and evaluate_segmentation."""
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdeq import create_segmentation_model
from mdeq.data.loaders import ShardSampler
from mdeq.engine.distributed import DistEnv
from mdeq.engine.seg_inference import SegInference, evaluate_segmentation, pad_to_multiple, slide_windows

from .test_seg_metrics import PRED, START_METHOD, TARGET

TINY = dict(num_channels=(8, 16, 32, 64), num_groups=4, expansion_factor=2, num_layers=1,
            deq=dict(solver="broyden", max_iter=4, solver_options=dict(memory=4)))


@pytest.fixture(scope="module")
def mdeq_seg():
    torch.manual_seed(0)
    return create_segmentation_model("mdeq_small", num_classes=3, **TINY).eval()


def _pixel_model(k=4):
    torch.manual_seed(0)
    return nn.Conv2d(3, k, 1)  # per-pixel: crops, padding and mirroring cannot change a pixel's logits


class Counter(nn.Module):
    """Constant logits equal to how many times it has been called (1, 2, ...), with fake DEQ stats."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.deq_stats = None
        self.modes = []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.training)
        b = x.shape[0]
        self.deq_stats = SimpleNamespace(nstep=torch.full((b,), self.calls), rel_residual=torch.full((b,), 0.1),
                                         abs_residual=torch.arange(b, dtype=torch.float32) * self.calls,
                                         diverged=torch.zeros(b, dtype=torch.bool))
        return torch.full((b, 2, x.shape[2], x.shape[3]), float(self.calls))


def test_pad_to_multiple():
    x = torch.ones(2, 3, 50, 64)
    y, size = pad_to_multiple(x, 32, value=-1.0)
    assert y.shape == (2, 3, 64, 64) and size == (50, 64)
    assert torch.equal(y[..., :50, :], x) and (y[..., 50:, :] == -1).all()
    assert pad_to_multiple(x, 1)[0] is x


def test_slide_windows_and_count_map():
    # 64x96, window 64x64, stride 32: two windows, columns 32..63 covered twice
    wins = slide_windows(64, 96, (64, 64), (32, 32))
    assert wins == [(0, 64, 0, 64), (0, 64, 32, 96)]
    count = torch.zeros(64, 96)
    for y1, y2, x1, x2 in wins:
        count[y1:y2, x1:x2] += 1
    assert (count[:, :32] == 1).all() and (count[:, 32:64] == 2).all() and (count[:, 64:] == 1).all()
    # the last window is moved back inside: rows (100 - 64 + 47) // 48 + 1 = 2 -> [0, 64) and [36, 100)
    assert slide_windows(100, 64, (64, 64), (48, 48)) == [(0, 64, 0, 64), (36, 100, 0, 64)]
    # an image smaller than the window is one window: the whole image
    assert slide_windows(40, 50, (64, 64), (32, 32)) == [(0, 40, 0, 50)]


def test_slide_averages_overlapping_windows():
    model = Counter()
    out = SegInference(model, mode="slide", window=64, stride=32).logits(torch.zeros(1, 3, 64, 96))
    assert model.calls == 2 and out.shape == (1, 2, 64, 96)
    assert (out[..., :32] == 1).all() and (out[..., 32:64] == 1.5).all() and (out[..., 64:] == 2).all()


def test_slide_covering_window_equals_whole_on_mdeq(mdeq_seg):
    x = torch.randn(2, 3, 32, 64)
    whole = SegInference(mdeq_seg)
    assert whole.size_divisor == 32
    ref = whole.logits(x)
    assert ref.shape == (2, 3, 32, 64) and ref.dtype == torch.float32
    for window in [(32, 64), (64, 96)]:  # exactly the image, and larger than it
        assert torch.equal(SegInference(mdeq_seg, mode="slide", window=window).logits(x), ref)
    stats = whole.last_stats()
    assert set(stats) == {"nstep", "rel_residual", "abs_residual", "diverged"} and stats["nstep"].shape == (2,)
    assert (stats["nstep"] >= 1).all()


def test_mdeq_input_not_a_multiple_of_32(mdeq_seg):
    x = torch.randn(1, 3, 50, 70)
    out = SegInference(mdeq_seg).logits(x)
    assert out.shape == (1, 3, 50, 70)
    # a covering window is the same computation (padded the same way)
    assert torch.equal(SegInference(mdeq_seg, mode="slide", window=(64, 96)).logits(x), out)


def test_slide_with_overlap_equals_whole_for_a_per_pixel_model():
    model = _pixel_model()
    x = torch.randn(2, 3, 64, 96)
    ref = SegInference(model).logits(x)
    torch.testing.assert_close(ref, model(x), rtol=0, atol=1e-6)
    # 40x40 windows are padded to 64x64 (size_divisor 32) and overlap: still the same logits
    out = SegInference(model, mode="slide", window=40, stride=(24, 28), size_divisor=32).logits(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_padding_does_not_shift_pixels():
    model = _pixel_model()
    x = torch.randn(1, 3, 50, 70)
    out = SegInference(model, size_divisor=32).logits(x)
    assert out.shape == (1, 4, 50, 70)
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)


def test_flip_and_multiscale_return_summed_probabilities():
    model = _pixel_model()
    x = torch.randn(2, 3, 32, 48)
    plain = SegInference(model)
    assert not plain.returns_probabilities
    flip = SegInference(model, flip=True)
    probs = flip.logits(x)
    assert flip.returns_probabilities and flip.num_passes == 2
    torch.testing.assert_close(probs, 2 * model(x).softmax(1), rtol=0, atol=1e-6)
    assert torch.equal(flip.predict(x), plain.predict(x))
    ms = SegInference(model, scales=(0.5, 0.75, 1.0, 1.5), flip=True)
    out = ms.logits(x)
    assert out.shape == (2, 4, 32, 48) and ms.num_passes == 8
    torch.testing.assert_close(out.sum(1), torch.full((2, 32, 48), 8.0), rtol=0, atol=1e-5)
    assert ms.predict(x).shape == (2, 32, 48) and ms.predict(x).dtype == torch.int64
    # one pass at another scale: raw logits brought back to the input size
    half = SegInference(model, scales=(0.5,)).logits(x)
    assert half.shape == (2, 4, 32, 48) and not torch.allclose(half.sum(1), torch.ones(2, 32, 48))


def test_flip_is_mirrored_back():
    class LeftHalf(nn.Module):  # class 1 on the left half of the image it sees, class 0 on the right
        def forward(self, x):
            w = x.shape[-1]
            logits = torch.zeros(x.shape[0], 2, x.shape[2], w)
            logits[:, 1, :, : w // 2] = 1.0
            logits[:, 0, :, w // 2:] = 1.0
            return logits

    # un-flipped, the mirrored pass says class 0 on the left: the sum ties everywhere (without the un-flip the
    # two passes would agree and the sum would be 2 * softmax)
    out = SegInference(LeftHalf(), flip=True).logits(torch.zeros(1, 3, 8, 8))
    torch.testing.assert_close(out, torch.ones(1, 2, 8, 8))
    # a model that follows the content is mirror-equivariant: flip TTA gives the plain prediction
    x = torch.randint(0, 3, (2, 1, 8, 8)).float().expand(2, 3, 8, 8)
    assert torch.equal(SegInference(OneHot(), flip=True).predict(x), x[:, 0].long())


def test_eval_mode_no_grad_stats_and_amp():
    model = Counter().train()
    inf = SegInference(model, scales=(1.0, 0.5), flip=True, amp_dtype=torch.bfloat16)
    out = inf.logits(torch.zeros(2, 3, 8, 8, requires_grad=True))
    assert model.training and model.modes == [False] * 4  # eval inside the call, restored after
    assert out.dtype == torch.float32 and not out.requires_grad
    stats = inf.last_stats()  # passes nstep 1, 2, 3, 4 -> mean 2.5 per sample; abs = i * call -> i * 2.5
    assert torch.equal(stats["nstep"], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(stats["abs_residual"], torch.tensor([0.0, 2.5]))
    assert SegInference(_pixel_model()).last_stats() is None


def test_option_errors():
    m = _pixel_model()
    with pytest.raises(ValueError, match="mode must be"):
        SegInference(m, mode="tiles")
    with pytest.raises(ValueError, match="needs a window"):
        SegInference(m, mode="slide")
    with pytest.raises(ValueError, match="only apply to mode='slide'"):
        SegInference(m, window=64)
    with pytest.raises(ValueError, match="larger than window"):
        SegInference(m, mode="slide", window=64, stride=65)
    with pytest.raises(ValueError, match="window must be"):
        SegInference(m, mode="slide", window=(64, 0))
    for scales in [(), (1.0, -0.5), (0,)]:
        with pytest.raises(ValueError, match="scales"):
            SegInference(m, scales=scales)
    with pytest.raises(ValueError, match="size_divisor"):
        SegInference(m, size_divisor=0)
    assert SegInference(m, mode="slide", window=(32, 48)).stride == (32, 48)
    assert SegInference(m).size_divisor == 1


class OneHot(nn.Module):
    """Logits that make the prediction the class id stored in the image's channel 0 (with fake DEQ stats)."""

    def forward(self, x):
        b = x.shape[0]
        self.deq_stats = SimpleNamespace(nstep=torch.full((b,), 5), rel_residual=torch.full((b,), .25),
                                         abs_residual=torch.ones(b), diverged=torch.zeros(b, dtype=torch.bool))
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 3, 1, 2).float() * 10


def _hand_example_dataset():
    # the 4x4 example of test_seg_metrics split into its top and bottom halves: mIoU 100 * 23/36
    images = PRED.view(2, 1, 2, 4).float().expand(2, 3, 2, 4).contiguous()
    return TensorDataset(images, TARGET.view(2, 2, 4))


def test_evaluate_segmentation_hand_computed():
    seen = []
    loader = DataLoader(_hand_example_dataset(), batch_size=1)
    res = evaluate_segmentation(OneHot(), loader, DistEnv(), num_classes=3, progress=False,
                                on_batch=lambda idx, im, m, p: seen.append((idx, p.clone())))
    assert res.count == 2 and res.miou == pytest.approx(100.0 * 23 / 36, rel=1e-12)
    assert res.metrics.aacc == pytest.approx(1000.0 / 13, rel=1e-12)
    assert res.deq_nstep_mean == 5.0 and res.deq_rel_residual_mean == 0.25 and res.deq_abs_residual_mean == 1.0
    assert [s[0] for s in seen] == [[0], [1]]
    assert torch.equal(torch.cat([s[1] for s in seen]).view(4, 4), PRED)
    d = res.as_dict("val/")
    assert d["val/count"] == 2 and d["val/miou"] == res.miou


def test_evaluate_segmentation_indices_from_the_shard_sampler_and_no_stats():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2).remainder(3).contiguous()
    masks = images[:, 0].long()
    loader = DataLoader(TensorDataset(images, masks), batch_size=2, sampler=ShardSampler(5, num_replicas=2, rank=0))
    calls = []

    def on_batch(indices, ims, ms, pred):
        calls.append(indices)
        assert torch.equal(ims, images[indices]) and torch.equal(pred, masks[indices])

    model = nn.Sequential(OneHot())  # deq_stats of the inner module is not looked up: no stats
    res = evaluate_segmentation(model, loader, DistEnv(), 3, progress=False, on_batch=on_batch)
    assert calls == [[0, 2], [4]] and res.count == 3 and res.miou == 100.0
    assert res.deq_nstep_mean == 0.0 and res.deq_rel_residual_mean == 0.0
    with pytest.raises(ValueError, match="empty"):
        evaluate_segmentation(OneHot(), [], DistEnv(), 3, progress=False)


def _eval_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ds = _hand_example_dataset()
    loader = DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds), num_replicas=world, rank=rank))
    seen = []
    res = evaluate_segmentation(OneHot(), loader, DistEnv(rank=rank, world_size=world), 3, progress=False,
                                on_batch=lambda idx, *_: seen.append(idx))
    torch.save(dict(miou=res.miou, count=res.count, nstep=res.deq_nstep_mean, seen=seen,
                    matrix=torch.tensor(res.metrics.class_pixels)), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_evaluate_segmentation_over_two_gloo_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_eval_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method=START_METHOD)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["miou"] == pytest.approx(100.0 * 23 / 36, rel=1e-12)  # each rank saw half, all get the total
        assert res["count"] == 2 and res["nstep"] == 5.0 and res["seen"] == [[rank]]
        assert res["matrix"].tolist() == [4, 4, 5]
