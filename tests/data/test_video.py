"""Video segmentation data: the generated clips, the Cityscapes sequence and frame-folder layouts, shot cuts and the
parallel-stream iterator."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.data.cityscapes_labels import CITYSCAPES_CLASSES, VALID_LABEL_IDS, label_id_to_train_id
from mdeq.data.errors import DatasetLayoutError
from mdeq.data.factory import VIDEO_DATASETS, build_video_dataset
from mdeq.data.segmentation import LabelValueError, build_seg_eval_transform
from mdeq.data.synthetic_video import (SYNTHETIC_VIDEO_VERSION, default_synthetic_video_root, make_synthetic_video,
                                       shot_starts)
from mdeq.data.video import (CityscapesSequenceDataset, FrameFolderDataset, VideoClip, frames_since_cut, natural_key,
                             stream_batches)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path):
    with Image.open(path) as f:
        return np.array(f)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_video(tmp_path_factory.mktemp("video") / "v", splits={"train": 1, "val": 2}, frames=6,
                                size=(32, 64), shots=2, seed=1)


# ------------------------------------------------------------------------------------------------ generated clips
def test_synthetic_layout_and_manifest(synth):
    val = sorted(p.relative_to(synth).as_posix() for p in (synth / "leftImg8bit_sequence" / "val").rglob("*.png"))
    assert val == [f"leftImg8bit_sequence/val/aachen/aachen_000000_{t:06d}_leftImg8bit.png" for t in range(6)] + [
        f"leftImg8bit_sequence/val/bremen/bremen_000000_{t:06d}_leftImg8bit.png" for t in range(6)]
    labels = sorted((synth / "gtFine" / "val").rglob("*.png"))
    assert [p.name for p in labels[:2]] == ["aachen_000000_000000_gtFine_labelIds.png",
                                           "aachen_000000_000001_gtFine_labelIds.png"]
    assert len(labels) == 12 and len(list((synth / "gtFine" / "train").rglob("*.png"))) == 6
    manifest = json.loads((synth / "videos.json").read_text())
    assert manifest["splits"] == {
        "train": [{"name": "aachen/aachen_000000", "frames": 6, "cuts": [3]}],
        "val": [{"name": "aachen/aachen_000000", "frames": 6, "cuts": [3]},
                {"name": "bremen/bremen_000000", "frames": 6, "cuts": [3]}]}
    seen = set()
    for label in labels:
        ids = _read(label)
        image = label.parent.parent.parent.parent / "leftImg8bit_sequence" / "val" / label.parent.name / \
            label.name.replace("gtFine_labelIds", "leftImg8bit")
        with Image.open(image) as im:
            assert im.mode == "RGB" and im.size == (64, 32)
        assert ids.shape == (32, 64) and set(np.unique(ids).tolist()) <= VALID_LABEL_IDS
        seen |= set(np.unique(ids).tolist())
    assert {1, 7, 8, 23, 26} <= seen  # ego vehicle, road, sidewalk, sky, car
    assert shot_starts(30, 3) == (10, 20) and shot_starts(6, 2) == (3,) and shot_starts(7, 1) == ()


def test_synthetic_deterministic_bytes(tmp_path):
    kw = dict(splits={"train": 1, "val": 1}, frames=3, size=(16, 32), shots=2, seed=5)
    a = _files(make_synthetic_video(tmp_path / "a", **kw))
    b = _files(make_synthetic_video(tmp_path / "b", **kw))
    assert len(a) == 13 and a == b  # 2 clips x 3 frames x (image + label) + videos.json
    c = _files(make_synthetic_video(tmp_path / "c", **dict(kw, seed=6)))
    assert c.keys() == a.keys() and c != a
    d = _files(make_synthetic_video(tmp_path / "d", **dict(kw, splits={"val": 1})))  # splits are independent
    assert all(d[k] == a[k] for k in d if k != "videos.json")
    with pytest.raises(ValueError, match="at least 16x16"):
        make_synthetic_video(tmp_path / "e", size=(8, 64))
    with pytest.raises(ValueError, match="1 <= shots <= frames"):
        make_synthetic_video(tmp_path / "e", frames=2, shots=3)


def test_synthetic_motion_and_cuts(tmp_path):
    root = make_synthetic_video(tmp_path / "v", splits={"val": 2}, frames=8, size=(64, 128), shots=2, seed=0)
    for clip in CityscapesSequenceDataset(root, "val").clips:
        images = [_read(f).astype(np.float64) for f in clip.frames]
        labels = [_read(f) for f in clip.labels]
        assert clip.cuts == (4,)
        mad = [np.abs(images[t] - images[t - 1]).mean() for t in range(1, 8)]
        changed = [(labels[t] != labels[t - 1]).mean() for t in range(1, 8)]
        within, across = [m for t, m in enumerate(mad, 1) if t != 4], mad[3]
        assert max(within) < 14 and across > 2.5 * max(within)  # a cut is a new scene, a step in a shot is not
        assert min(changed) > 0.01 and changed[3] > 0.3  # camera and cars move; the cut changes the whole scene
        assert all(t == 4 or changed[t - 1] < 0.15 for t in range(1, 8))
        noise = [np.abs(images[t] - images[t - 1])[labels[t] == labels[t - 1]].std() for t in (1, 2)]
        assert min(noise) > 2  # every frame has its own pixel noise
        cars = [np.argwhere(lab == 26) for lab in labels[:4]]
        assert all(len(c) for c in cars)


# ------------------------------------------------------------------------------------------------ Cityscapes
def test_sequence_dataset_reads_what_was_drawn(synth):
    ds = CityscapesSequenceDataset(synth, "val")
    assert len(ds) == 2 and [c.name for c in ds.clips] == ["aachen/aachen_000000", "bremen/bremen_000000"]
    assert ds.classes == list(CITYSCAPES_CLASSES) and ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.palette.shape == (19, 3) and tuple(ds.palette[13]) == (0, 0, 142)
    clip = ds.clips[1]
    assert clip.cuts == (3,) and clip.annotated == tuple(range(6)) and ds.num_frames(1) == ds.num_frames(clip) == 6
    assert [frames_since_cut(clip, t) for t in range(6)] == [0, 1, 2, 0, 1, 2]
    assert ds.frame_name(1, 4) == "bremen/bremen_000000_000004_leftImg8bit"
    lut = label_id_to_train_id()
    image, mask = ds.load_frame(1, 4)
    raw = _read(clip.labels[4])
    assert image.dtype == torch.float32 and image.shape == (3, 32, 64)
    assert mask.dtype == torch.long and mask.shape == (32, 64)
    np.testing.assert_array_equal(mask.numpy(), lut[raw])
    assert (mask.numpy()[raw == 26] == 13).all() and (mask.numpy()[raw == 1] == 255).all()
    expected = (_read(clip.frames[4]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    ds.transform = build_seg_eval_transform()  # the albumentations eval transform gives the same tensors
    image2, mask2 = ds.load_frame(clip, 4)
    np.testing.assert_allclose(image2.numpy(), image.numpy(), atol=1e-5)
    assert torch.equal(mask2, mask)
    with pytest.raises(IndexError, match="frame 6 is out of range for clip 'bremen/bremen_000000' \\(6 frames\\)"):
        ds.load_frame(1, 6)


def _sequence_tree(root, size=(8, 16)):
    """aachen_000000: frames 0..4 and 10..14 (a gap: two clips, unlabelled); aachen_000001: frames 0..29 with frame
    19 labelled (labelIds and labelTrainIds that disagree on purpose, to see which one is read)."""
    h, w = size
    rng = np.random.default_rng(0)
    for seq, numbers in (("000000", list(range(5)) + list(range(10, 15))), ("000001", range(30))):
        for n in numbers:
            _save(root / "leftImg8bit_sequence" / "val" / "aachen" / f"aachen_{seq}_{n:06d}_leftImg8bit.png",
                  rng.integers(0, 256, size=(h, w, 3)))
    ids = np.full((h, w), 7, dtype=np.uint8)
    ids[:, : w // 2] = 26
    ids[0] = 1
    label_dir = root / "gtFine" / "val" / "aachen"
    _save(label_dir / "aachen_000001_000019_gtFine_labelIds.png", ids)
    _save(label_dir / "aachen_000001_000019_gtFine_labelTrainIds.png", np.full((h, w), 2))
    return ids


def test_hand_built_sequence(tmp_path):
    ids = _sequence_tree(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"(?s)2 of 3 clips in .*have no annotated frame, e\.g\. "
                                                 r"aachen/aachen_000000_000000 \(expected e\.g\. .*gtFine/val/aachen/"
                                                 r"aachen_000000_000004_gtFine_labelIds.png.*leftImg8bit_sequence/"):
        CityscapesSequenceDataset(tmp_path, "val")
    ds = CityscapesSequenceDataset(tmp_path, "val", require_labels=False)
    assert [(c.name, len(c.frames), c.annotated, c.cuts) for c in ds.clips] == [
        ("aachen/aachen_000000_000000", 5, (), ()), ("aachen/aachen_000000_000010", 5, (), ()),
        ("aachen/aachen_000001", 30, (19,), ())]
    assert ds.frame_name(1, 0) == "aachen/aachen_000000_000010_leftImg8bit"
    assert ds.clips[2].frames[10].endswith("aachen_000001_000010_leftImg8bit.png")
    image, mask = ds.load_frame(2, 18)
    assert image.shape == (3, 8, 16) and mask is None
    assert ds.load_frame(2, 19)[1].unique().tolist() == [2]  # auto: labelTrainIds preferred
    by_ids = CityscapesSequenceDataset(tmp_path, "val", label_type="labelIds", require_labels=False)
    mask = by_ids.load_frame(2, 19)[1].numpy()
    np.testing.assert_array_equal(mask, label_id_to_train_id()[ids])
    assert set(np.unique(mask).tolist()) == {0, 13, 255}  # road, car, ego vehicle -> ignore
    bad = tmp_path / "gtFine" / "val" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"
    _save(bad, np.full((8, 16), 40))
    with pytest.raises(LabelValueError, match=r"aachen_000001_000019_gtFine_labelIds.png holds values 40 .*allowed: "
                                              r"0\.\.33"):
        by_ids.load_frame(2, 19)


def test_sequence_layout_errors(tmp_path, synth):
    help_text = r".*expected the official Cityscapes sequence layout.*leftImg8bit_sequence/<split>/<city>/"
    with pytest.raises(DatasetLayoutError, match="(?s)does not exist" + help_text):
        CityscapesSequenceDataset(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)no leftImg8bit_sequence folder .*found folders: none"
                                                 + help_text):
        CityscapesSequenceDataset(tmp_path / "x")
    with pytest.raises(DatasetLayoutError, match=r"(?s)no 'test' split .*found splits: \['train', 'val'\]" + help_text):
        CityscapesSequenceDataset(synth, "test")
    (tmp_path / "y" / "leftImg8bit_sequence" / "val" / "aachen").mkdir(parents=True)
    (tmp_path / "y" / "leftImg8bit_sequence" / "val" / "aachen" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"(?s)no \*_leftImg8bit.png frames .*found 1 other files, e\.g\. "
                                                 r"aachen/notes.txt" + help_text):
        CityscapesSequenceDataset(tmp_path / "y")
    _save(tmp_path / "y" / "leftImg8bit_sequence" / "val" / "aachen" / "aachen_x_leftImg8bit.png", np.zeros((4, 4, 3)))
    with pytest.raises(DatasetLayoutError, match=r"aachen_x_leftImg8bit.png is not named <city>_<seq>_<frame>"):
        CityscapesSequenceDataset(tmp_path / "y")
    with pytest.raises(ValueError, match="label_type must be one of"):
        CityscapesSequenceDataset(synth, label_type="color")


def test_manifest_errors(tmp_path):
    root = make_synthetic_video(tmp_path / "v", splits={"val": 1}, frames=4, size=(16, 32), shots=2)
    manifest = root / "videos.json"
    cases = (({"name": "aachen/aachen_000009", "cuts": [2]},
              r"lists 1 'val' clips that are not in the data, e\.g\. \['aachen/aachen_000009'\]"),
             ({"name": "aachen/aachen_000000", "frames": 5}, "lists 5 frames but 4 are on disk"),
             ({"name": "aachen/aachen_000000", "cuts": [2, 0]}, r"cuts must be increasing frame indices in 1\.\.3"))
    for entry, message in cases:
        manifest.write_text(json.dumps({"splits": {"val": [entry]}}))
        with pytest.raises(DatasetLayoutError, match=message):
            CityscapesSequenceDataset(root, "val")
    manifest.write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=r"cannot read .*videos.json: JSONDecodeError"):
        CityscapesSequenceDataset(root, "val")
    manifest.unlink()
    assert CityscapesSequenceDataset(root, "val").clips[0].cuts == ()


# ------------------------------------------------------------------------------------------------ own videos
def _frame_folder(root, videos, masks=(), size=(4, 6), classes=("bg", "car")):
    """images/val/<video>/<frame>.png with pixel value = 10 * clip number + frame number (red channel)."""
    for v, (video, names) in enumerate(videos.items()):
        for f, name in enumerate(names):
            h, w = size(video) if callable(size) else size
            image = np.zeros((h, w, 3), dtype=np.uint8)
            image[..., 0] = 10 * v + f
            _save(root / "images" / "val" / video / f"{name}.png", image)
    for video, name, value in masks:
        h, w = size(video) if callable(size) else size
        _save(root / "masks" / "val" / video / f"{name}.png", np.full((h, w), value))
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_frame_folder_natural_order_and_masks(tmp_path):
    root = _frame_folder(tmp_path, {"street/day1": ["frame10", "frame2", "frame1"], "b": ["x"]},
                         masks=[("street/day1", "frame2", 1), ("street/day1", "frame10", 255)])
    ds = FrameFolderDataset(root, "val")
    assert [c.name for c in ds.clips] == ["b", "street/day1"] and ds.classes == ["bg", "car"]
    clip = ds.clips[1]
    assert [p.rsplit("/", 1)[1] for p in clip.frames] == ["frame1.png", "frame2.png", "frame10.png"]
    assert clip.annotated == (1, 2) and ds.frame_name(1, 2) == "street/day1/frame10"
    image, mask = ds.load_frame(1, 0)
    assert mask is None and image.shape == (3, 4, 6)
    assert ds.load_frame(1, 1)[1].unique().tolist() == [1] and ds.load_frame(1, 2)[1].unique().tolist() == [255]
    assert sorted(["frame10", "Frame2", "frame1", "a", "a1", "a10b", "a2"], key=natural_key) == [
        "a", "a1", "a2", "a10b", "frame1", "Frame2", "frame10"]
    _save(root / "masks" / "val" / "street" / "day1" / "frame2.png", np.full((4, 6), 2))
    with pytest.raises(LabelValueError, match=r"frame2.png holds values 2 .*allowed: 0, 1, 255"):
        ds.load_frame(1, 1)
    (root / "videos.json").write_text(json.dumps({"splits": {"val": [{"name": "street/day1", "cuts": [2]}]}}))
    ds = FrameFolderDataset(root, "val", classes=["a", "b", "c"])
    assert [c.cuts for c in ds.clips] == [(), (2,)] and ds.num_classes == 3
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 videos .*have no mask, e\.g\. b \(expected e\.g\. "
                                                 r".*masks/val/b/x.png"):
        FrameFolderDataset(root, "val", require_labels=True)


def test_frame_folder_split_level_video_and_errors(tmp_path):
    root = _frame_folder(tmp_path / "a", {".": ["f3", "f20"]})
    ds = FrameFolderDataset(root, "val")
    assert [(c.name, len(c.frames)) for c in ds.clips] == [("val", 2)] and ds.frame_name(0, 1) == "f20"
    help_text = r".*expected one folder of frames per video.*images/<split>/<video>/<frame>.<ext>"
    _save(root / "images" / "val" / "v" / "0.png", np.zeros((4, 6, 3)))
    with pytest.raises(DatasetLayoutError, match=r"(?s)holds frames and also sub-folders with frames" + help_text):
        FrameFolderDataset(root, "val")
    with pytest.raises(DatasetLayoutError, match="(?s)does not exist" + help_text):
        FrameFolderDataset(tmp_path / "none")
    with pytest.raises(DatasetLayoutError, match=r"(?s)no 'train' split .*found splits: \['val'\]" + help_text):
        FrameFolderDataset(root, "train")
    bare = _frame_folder(tmp_path / "b", {}, classes=())
    (bare / "images" / "val").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"(?s)no class names: pass classes=.*classes.txt" + help_text):
        FrameFolderDataset(bare, "val")
    with pytest.raises(DatasetLayoutError, match=r"(?s)no frames under .*images/val" + help_text):
        FrameFolderDataset(bare, "val", classes=["x"])


# ------------------------------------------------------------------------------------------------ streams
def _steps(dataset, streams):
    return [(b.reset.tolist(), b.clip.tolist(), b.frame.tolist(), b.active.tolist(),
             b.images[:, 0, 0, 0].tolist(), [None if m is None else int(m[0, 0]) for m in b.masks])
            for b in stream_batches(dataset, streams)]


def test_stream_batches_step_by_step(tmp_path):
    root = _frame_folder(tmp_path, {"a": ["0", "1", "2", "3"], "b": ["0"], "c": ["0", "1"]},
                         masks=[("a", "1", 1), ("c", "0", 0)])
    ds = FrameFolderDataset(root, "val", transform=None)
    ds.transform = lambda image, mask: {"image": image, "mask": mask}  # raw pixels: red = 10 * clip + frame
    assert _steps(ds, 2) == [
        ([True, True], [0, 1], [0, 0], [True, True], [0.0, 10.0], [None, None]),
        ([False, True], [0, 2], [1, 0], [True, True], [1.0, 20.0], [1, 0]),
        ([False, False], [0, 2], [2, 1], [True, True], [2.0, 21.0], [None, None]),
        ([False, False], [0, -1], [3, -1], [True, False], [3.0, 21.0], [None, None]),  # idle: c's last frame again
    ]
    assert _steps(ds, 1) == [
        ([True], [0], [0], [True], [0.0], [None]), ([False], [0], [1], [True], [1.0], [1]),
        ([False], [0], [2], [True], [2.0], [None]), ([False], [0], [3], [True], [3.0], [None]),
        ([True], [1], [0], [True], [10.0], [None]),
        ([True], [2], [0], [True], [20.0], [0]), ([False], [2], [1], [True], [21.0], [None])]
    four = _steps(ds, 4)  # more slots than clips: the fourth never plays (zeros), every slot resets on step 0
    assert four[0][:4] == ([True] * 4, [0, 1, 2, -1], [0, 0, 0, -1], [True, True, True, False])
    assert [s[4] for s in four] == [[0.0, 10.0, 20.0, 0.0], [1.0, 10.0, 21.0, 0.0], [2.0, 10.0, 21.0, 0.0],
                                    [3.0, 10.0, 21.0, 0.0]]
    batch = next(stream_batches(ds, 2))
    assert batch.images.shape == (2, 3, 4, 6) and batch.images.dtype == torch.float32
    assert batch.reset.dtype == torch.bool and batch.clip.dtype == torch.long and batch.active.dtype == torch.bool
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="streams must be a whole number >= 1"):
            next(stream_batches(ds, bad))


def test_stream_batches_need_one_size_for_several_streams(tmp_path):
    root = _frame_folder(tmp_path, {"a": ["0", "1"], "b": ["0"], "c": ["0"]},
                         size=lambda video: (6, 6) if video == "c" else (4, 6))
    ds = FrameFolderDataset(root, "val")
    with pytest.raises(ValueError, match=r"differ in size \(clip 'a' frame 1: 4x6, clip 'c' frame 0: 6x6; H x W\)"
                                         r".*use streams=1"):
        list(stream_batches(ds, 2))
    sizes = [tuple(b.images.shape[-2:]) for b in stream_batches(ds, 1)]
    assert sizes == [(4, 6), (4, 6), (4, 6), (6, 6)]


def test_video_clip_checks_and_frames_since_cut():
    clip = VideoClip("v", ("a", "b", "c", "d", "e"), (None, "x", None, None, "y"), cuts=(2, 4))
    assert clip.annotated == (1, 4)
    assert [frames_since_cut(clip, t) for t in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(IndexError, match="frame 5 is out of range for clip 'v'"):
        frames_since_cut(clip, 5)
    with pytest.raises(ValueError, match=r"cuts must be increasing frame indices in 1\.\.4"):
        VideoClip("v", ("a",) * 5, (None,) * 5, cuts=(0, 2))
    with pytest.raises(ValueError, match=r"cuts must be increasing"):
        VideoClip("v", ("a",) * 5, (None,) * 5, cuts=(3, 2))
    with pytest.raises(ValueError, match="2 frames but 1 label entries"):
        VideoClip("v", ("a", "b"), (None,))
    with pytest.raises(ValueError, match="has no frames"):
        VideoClip("v", (), ())


# ------------------------------------------------------------------------------------------------ factory
def test_factory_and_default_set(tmp_path, monkeypatch, synth):
    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    assert VIDEO_DATASETS == ("synthetic_video", "cityscapes_sequence", "video_folder")
    with pytest.raises(ValueError, match=r"unknown video dataset 'kitti'; choices: \['synthetic_video', "):
        build_video_dataset("kitti", None, "val")
    with pytest.raises(ValueError, match="needs a root folder"):
        build_video_dataset("cityscapes_sequence", None, "val")
    with pytest.raises(ValueError, match="needs a root folder"):
        build_video_dataset("video_folder", None, "val")
    with pytest.raises(ValueError, match="fixed 19 Cityscapes classes"):
        build_video_dataset("synthetic_video", synth, "val", classes=["a"])
    with pytest.raises(ValueError, match="applies to Cityscapes only"):
        build_video_dataset("video_folder", tmp_path, "val", label_type="labelIds")
    clips = build_video_dataset("cityscapes_sequence", synth, "train").clips
    assert [c.name for c in clips] == ["aachen/aachen_000000"]
    folder = _frame_folder(tmp_path / "f", {"a": ["0"]})
    assert isinstance(build_video_dataset("video_folder", folder, "val", require_labels=False), FrameFolderDataset)

    val = build_video_dataset("synthetic_video", None, "val")  # the default set, written once into the cache
    root = default_synthetic_video_root()
    assert root == tmp_path / "cache" / f"synthetic-video-v{SYNTHETIC_VIDEO_VERSION}" and (root / ".complete").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temp folder left behind
    train = build_video_dataset("synthetic_video", None, "train")
    assert (len(train), len(val)) == (8, 4) and {len(c.frames) for c in train.clips + val.clips} == {30}
    assert {c.cuts for c in val.clips} == {(10, 20)} and all(c.annotated == tuple(range(30)) for c in val.clips)
    assert val.load_frame(3, 29)[0].shape == (3, 128, 256)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    build_video_dataset("synthetic_video", None, "val")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps  # not rewritten


def test_the_generated_frames_train_as_stills(monkeypatch, tmp_path):
    """data=synthetic_video in train_seg: every frame of the generated clips is one still image with its labels."""
    from mdeq.data import synthetic_video
    from mdeq.data.factory import build_segmentation_dataset

    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_SPLITS", {"train": 2, "val": 1})
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_FRAMES", 3)
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_SIZE", (32, 64))
    train = build_segmentation_dataset("synthetic_video", None, "train")
    video = build_video_dataset("synthetic_video", None, "train")
    assert len(train) == 6 and train.num_classes == 19
    image, mask = train[4]
    want_image, want_mask = video.load_frame(1, 1)
    assert torch.equal(image, want_image) and torch.equal(mask, want_mask)
    with pytest.raises(ValueError, match="fixed 19 Cityscapes classes"):
        build_segmentation_dataset("synthetic_video", None, "train", classes=["a"])
