"""Video evaluation: scores on the annotated frames, f-evaluations per frame, the streamed run against
from-scratch solves, and the scores against the frames since a scene cut."""
import pytest
import torch
import torch.nn.functional as F

import mdeq
from mdeq.core import budget_options
from mdeq.data.factory import build_video_dataset
from mdeq.data.synthetic_video import make_synthetic_video
from mdeq.engine.seg_metrics import ConfusionMatrix
from mdeq.engine.video_eval import compare_video, evaluate_video, video_table

NARROW = dict(num_channels=(8, 16, 32, 64), expansion_factor=2, num_groups=4, num_layers=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """3 val clips of 6 frames (a cut at frame 3), 32x64, every frame labelled."""
    root = make_synthetic_video(tmp_path_factory.mktemp("video") / "v", splits={"val": 3}, frames=6, size=(32, 64),
                                shots=2, seed=2)
    return build_video_dataset("cityscapes_sequence", root, "val")


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    model = mdeq.create_segmentation_model("mdeq_small", num_classes=19, **NARROW).eval()
    with torch.no_grad():  # the original init N(0, 0.01) gives near-constant logits: a classifier that varies
        model.last_layer[3].weight.normal_(std=0.5)
    return model


def _scratch_reference(model, data, settings):
    """mIoU of every annotated frame solved from scratch, computed frame by frame with the model's API."""
    cm = ConfusionMatrix(data.num_classes, data.ignore_index)
    with mdeq.models.configured_deq(model, **settings), torch.no_grad():
        for c in range(len(data)):
            for t in range(data.num_frames(c)):
                image, mask = data.load_frame(c, t)
                logits = model(image[None])
                pred = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
                cm.update(pred[0], mask)
    return cm.compute().miou


def _one_stream_per_clip(model, data, settings):
    """mIoU of every clip run alone through its own ``mdeq.stream``, frame by frame."""
    cm = ConfusionMatrix(data.num_classes, data.ignore_index)
    for c in range(len(data)):
        run = mdeq.stream(model, **settings)
        for t in range(data.num_frames(c)):
            image, mask = data.load_frame(c, t)
            pred = F.interpolate(run(image[None]), size=image.shape[-2:], mode="bilinear",
                                 align_corners=False).argmax(1)
            cm.update(pred[0], mask)
    return cm.compute().miou


@pytest.mark.parametrize("streams", [1, 2])
def test_scratch_scores_every_annotated_frame_once(seg, clips, streams):
    settings = budget_options(seg.deq.options, 2)
    res = evaluate_video(seg, clips, streaming=False, settings=settings, streams=streams, progress=False)
    assert res.frames == res.scored == 18
    assert res.miou == pytest.approx(_scratch_reference(seg, clips, settings), abs=1e-9)
    assert res.evals_per_frame == 2.0 and res.ms_per_frame > 0
    # frames since the cut at 3: t = 0, 1, 2 in every clip
    assert [c["frame"] for c in res.after_cut] == [0, 1, 2] and all(c["frames"] == 3 for c in res.after_cut)


def test_streaming_matches_mdeq_stream_clip_by_clip(seg, clips):
    settings = budget_options(seg.deq.options, 1)
    res = evaluate_video(seg, clips, streaming=True, settings=settings, streams=2, progress=False)
    assert res.miou == pytest.approx(_one_stream_per_clip(seg, clips, settings), abs=1e-9)
    assert res.streaming and res.evals_per_frame == 1.0 and res.frames == 18


def test_compare_runs_every_budget_both_ways_and_the_reference(seg, clips):
    lines = []
    runs = compare_video(seg, clips, [1, 2], dict(max_iter=6, tol=1e-3, stop_mode="rel"), progress=False,
                         say=lines.append)
    assert [r.name for r in runs] == ["stream @1", "scratch @1", "stream @2", "scratch @2", "scratch, reference"]
    assert [r.evals_per_frame for r in runs[:4]] == [1.0, 1.0, 2.0, 2.0]
    reference = dict(max_iter=6, tol=1e-3, stop_mode="rel")
    nfe = []  # the reference's evaluations, frame by frame through the model's own API
    with mdeq.models.configured_deq(seg, **reference), torch.no_grad():
        for c in range(len(clips)):
            for t in range(clips.num_frames(c)):
                seg(clips.load_frame(c, t)[0][None])
                nfe.append(seg.deq_stats.nfe)
    assert runs[-1].evals_per_frame == pytest.approx(sum(nfe) / len(nfe)) and runs[-1].settings == reference
    assert len(lines) == 5 and lines[0].startswith("stream @1: mIoU")
    table = video_table(runs)
    assert "| stream @2 |" in table and "t=0 | t=1 | t=2" in table
    assert seg.deq.settings.get("max_iter") != 6  # the model's own settings are back


def test_a_set_without_labels_is_refused(seg, tmp_path):
    from PIL import Image
    import numpy as np

    for t in range(2):
        path = tmp_path / "images" / "val" / "clip" / f"f{t}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8)).save(path)
    data = build_video_dataset("video_folder", tmp_path, "val", classes=[f"c{i}" for i in range(19)],
                               require_labels=False)
    with pytest.raises(ValueError, match="no annotated frame"):
        evaluate_video(seg, data, streaming=True, settings=dict(max_iter=1), progress=False)


def _write_folder_video(root, lengths, size=(32, 64), odd=None):
    """images/val/<clip>/f<t>.png with masks; ``odd`` = (clip, frame) written at another size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(lengths):
        for t in range(n):
            h, w = (size[0], 2 * size[1]) if odd == (c, t) else size
            for kind, array in (("images", rng.integers(0, 256, (h, w, 3))), ("masks", rng.integers(0, 19, (h, w)))):
                path = root / kind / "val" / f"clip{c}" / f"f{t}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(path)
    return build_video_dataset("video_folder", root, "val", classes=[f"c{i}" for i in range(19)])


def test_parallel_streams_over_clips_of_different_lengths_match_one_stream_per_clip(seg, tmp_path):
    data = _write_folder_video(tmp_path, [3, 5, 2])
    settings = budget_options(seg.deq.options, 1)
    res = evaluate_video(seg, data, streaming=True, settings=settings, streams=2, progress=False)
    assert res.frames == res.scored == 10 and res.after_cut == []  # no cuts known in this layout
    assert res.miou == pytest.approx(_one_stream_per_clip(seg, data, settings), abs=1e-9)


def test_a_clip_that_changes_size_is_named(seg, tmp_path):
    data = _write_folder_video(tmp_path, [3], odd=(0, 2))
    with pytest.raises(ValueError, match=r"clip 'clip0' changes its frame size at frame 2 \(32x64 -> 32x128\)"):
        evaluate_video(seg, data, streaming=True, settings=dict(max_iter=1), progress=False)
