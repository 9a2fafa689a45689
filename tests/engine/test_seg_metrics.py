"""Confusion matrix and mIoU: a hand-computed example, the absent-class rule, errors, and the 2-rank reduce."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdeq.engine.distributed import DistEnv
from mdeq.engine.seg_metrics import ConfusionMatrix, SegMetrics, nanmean

# fork (where there is one): the children inherit the imported modules instead of re-importing mdeq (seconds each)
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
I = 255  # noqa: E741 (ignore)
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, I, I],
                       [2, 2, 2, I]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 1, 0, 0],
                     [2, 2, 2, 1]])
# 13 counted pixels (3 ignored). (gt, pred) pairs: row 0: (0,0) (0,1) (1,1) (1,1); row 1: (0,0) (0,0) (1,1) (1,2);
# row 2: (2,2) (2,1); row 3: (2,2) (2,2) (2,2).
EXPECTED = torch.tensor([[3, 1, 0],   # gt 0: 4 pixels
                         [0, 3, 1],   # gt 1: 4 pixels
                         [0, 1, 4]])  # gt 2: 5 pixels; predicted: 3, 5, 5
# IoU = TP / (row + col - TP): 3/(4+3-3) = 3/4, 3/(4+5-3) = 1/2, 4/(5+5-4) = 2/3; mIoU = (3/4 + 1/2 + 2/3)/3 = 23/36
# Acc = TP / row: 3/4, 3/4, 4/5 -> mAcc = (0.75 + 0.75 + 0.8)/3 = 2.3/3; aAcc = trace/sum = 10/13


def _cm(pred, target, c=3, **kw):
    cm = ConfusionMatrix(c, **kw)
    cm.update(pred, target)
    return cm


def test_hand_computed_example():
    cm = _cm(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, EXPECTED)
    m = cm.compute()
    assert m.iou == pytest.approx([75.0, 50.0, 200.0 / 3], rel=1e-12)
    assert m.miou == pytest.approx(100.0 * 23 / 36, rel=1e-12)
    assert m.acc == pytest.approx([75.0, 75.0, 80.0], rel=1e-12)
    assert m.macc == pytest.approx(230.0 / 3, rel=1e-12)
    assert m.aacc == pytest.approx(1000.0 / 13, rel=1e-12)
    assert m.pixels == 13 and m.class_pixels == [4, 4, 5]


def test_absent_class_rule():
    # 4 classes: class 2 is predicted once but never in the GT (IoU 0, counted); class 3 is nowhere (NaN, excluded)
    m = _cm(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]), c=4).compute()
    # IoU0 = 1/(2+1-1) = 50, IoU1 = 2/(2+2-2) = 100, IoU2 = 0/(0+1-0) = 0 -> mIoU = 150/3 = 50
    assert m.iou[:3] == [50.0, 100.0, 0.0] and math.isnan(m.iou[3])
    assert m.miou == 50.0
    # recall: 50, 100, NaN (no GT), NaN -> mAcc 75; aAcc 3/4
    assert m.acc[:2] == [50.0, 100.0] and math.isnan(m.acc[2]) and math.isnan(m.acc[3])
    assert m.macc == 75.0 and m.aacc == 75.0
    assert m.class_pixels == [2, 2, 0, 0]


def test_empty_matrix_is_nan():
    m = ConfusionMatrix(3).compute()
    assert all(math.isnan(v) for v in m.iou + m.acc + [m.miou, m.macc, m.aacc])
    assert m.pixels == 0
    cm = _cm(torch.tensor([1, 2]), torch.tensor([I, I]))  # only ignored pixels: nothing counted
    assert cm.matrix.sum() == 0 and math.isnan(cm.compute().miou)
    assert math.isnan(nanmean([math.nan])) and nanmean([1.0, math.nan, 3.0]) == 2.0


def test_ignore_pixels_dropped_whatever_the_prediction():
    # an out-of-range prediction at an ignored pixel is dropped with the pixel
    cm = _cm(torch.tensor([0, 7, -1, 1]), torch.tensor([0, I, I, 1]))
    assert torch.equal(cm.matrix, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]))
    # ignore_index=None counts everything; another ignore value drops that class
    assert _cm(PRED, TARGET.clamp(max=2), ignore_index=None).matrix.sum() == 16
    assert _cm(PRED, TARGET.clamp(max=2), ignore_index=0).matrix[0].sum() == 0


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(PRED, TARGET[:3])
    with pytest.raises(ValueError, match=r"target has values outside \[0, 3\) other than ignore_index=255: \[3, 254\]"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.tensor([3, 254, 0]))
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 3\): \[-1, 5\]"):
        cm.update(torch.tensor([5, -1, 0]), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert cm.matrix.sum() == 0  # nothing counted by a failed update
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


def test_deferred_checks_raise_at_compute():
    # the no-sync path (default on accelerators): bad pixels are kept out of the matrix and compute() raises
    cm = ConfusionMatrix(3, eager_checks=False)
    cm.update(torch.tensor([0, 5, 1, 0]), torch.tensor([0, 1, 1, 9]))
    assert torch.equal(cm.matrix, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="2 counted pixels"):
        cm.compute()
    cm.reset()
    cm.update(PRED, TARGET)
    assert torch.equal(cm.matrix, EXPECTED)
    cm.compute()


def test_accumulation_equals_concatenation_and_reset():
    g = torch.Generator().manual_seed(1)
    preds = [torch.randint(0, 5, (2, 6, 7), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 6, 7), generator=g).masked_fill_(torch.rand(2, 6, 7, generator=g) < .2, I)
               for _ in range(3)]
    targets = [t.masked_fill(t == 5, I) for t in targets]
    many = ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        many.update(p, t.to(torch.uint8))  # uint8 masks are fine
    one = _cm(torch.cat(preds), torch.cat(targets), c=5)
    assert torch.equal(many.matrix, one.matrix)
    assert many.matrix.sum() == sum(int((t != I).sum()) for t in targets)
    assert many.compute() == one.compute()
    many.reset()
    assert many.matrix.sum() == 0


def test_table_and_as_dict():
    m = _cm(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]), c=4).compute()
    assert m.table(["road", "car", "bus", "train"]) == (
        "| class | IoU % | Acc % | GT pixels |\n"
        "|---|---:|---:|---:|\n"
        "| road | 50.00 | 50.00 | 2 |\n"
        "| car | 100.00 | 100.00 | 2 |\n"
        "| bus | 0.00 | n/a | 0 |\n"
        "| train | n/a | n/a | 0 |\n"
        "| mIoU | 50.00 | 75.00 | 4 |\n")
    assert m.table().splitlines()[2].startswith("| 0 | 50.00")
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        m.table(["a", "b", "c"])
    d = m.as_dict("val/", class_names=["road", "car", "bus", "train"])
    assert d["val/miou"] == 50.0 and d["val/macc"] == 75.0 and d["val/aacc"] == 75.0 and d["val/pixels"] == 4
    assert d["val/iou.bus"] == 0.0 and math.isnan(d["val/iou.train"])
    assert set(m.as_dict()) == {"miou", "macc", "aacc", "pixels", "iou.0", "iou.1", "iou.2", "iou.3"}
    assert isinstance(m, SegMetrics)


def _reduce_worker(rank, world, init_file, preds, targets, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cm = ConfusionMatrix(5)
    for p, t in zip(preds[rank::world], targets[rank::world]):
        cm.update(p, t)
    cm.reduce(DistEnv(rank=rank, world_size=world))
    torch.save(cm.matrix.clone(), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_reduce_over_two_gloo_processes_equals_all_data():
    g = torch.Generator().manual_seed(2)
    preds = [torch.randint(0, 5, (3, 8, 8), generator=g) for _ in range(5)]  # 5 batches: ranks get 3 and 2
    targets = [torch.randint(0, 6, (3, 8, 8), generator=g) for _ in range(5)]
    targets = [t.masked_fill(t == 5, I) for t in targets]
    full = _cm(torch.cat(preds), torch.cat(targets), c=5).matrix
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_reduce_worker, args=(2, os.path.join(tmp, "init"), preds, targets, tmp), nprocs=2,
                           join=True, start_method=START_METHOD)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    for res in results:
        assert torch.equal(res, full)
    ConfusionMatrix(5).reduce(DistEnv())  # single process: a no-op
