"""The generated Cityscapes-layout dataset: layout, label ids, determinism and the versioned cache."""
import numpy as np
import pytest
from PIL import Image

from mdeq.data.cityscapes import CityscapesDataset
from mdeq.data.cityscapes_labels import VALID_LABEL_IDS, label_id_to_train_id
from mdeq.data.synthetic_seg import (
    SYNTHETIC_VERSION, default_synthetic_root, make_synthetic_cityscapes, prepare_synthetic_cityscapes,
)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_sizes_and_label_ids(tmp_path):
    root = make_synthetic_cityscapes(tmp_path / "s", splits={"train": 5, "val": 2}, size=(48, 80), seed=3,
                                     write_train_ids=True)
    images = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    assert [p.relative_to(root / "leftImg8bit" / "train").as_posix() for p in images] == [
        "aachen/aachen_000000_000019_leftImg8bit.png", "aachen/aachen_000001_000019_leftImg8bit.png",
        "aachen/aachen_000002_000019_leftImg8bit.png", "bremen/bremen_000000_000019_leftImg8bit.png",
        "bremen/bremen_000001_000019_leftImg8bit.png"]
    assert len(list((root / "leftImg8bit" / "val").rglob("*.png"))) == 2
    seen = set()
    lut = label_id_to_train_id()
    for image in images:
        label = root / "gtFine" / "train" / image.parent.name / image.name.replace("leftImg8bit", "gtFine_labelIds")
        train = label.with_name(label.name.replace("labelIds", "labelTrainIds"))
        with Image.open(image) as im, Image.open(label) as lb, Image.open(train) as tr:
            assert im.mode == "RGB" and im.size == (80, 48)
            assert lb.mode == "L" and lb.size == (80, 48)
            ids, train_ids = np.array(lb), np.array(tr)
        assert set(np.unique(ids).tolist()) <= VALID_LABEL_IDS
        np.testing.assert_array_equal(train_ids, lut[ids])
        seen |= set(np.unique(ids).tolist())
    assert {7, 8, 11, 23, 26} <= seen  # road, sidewalk, building, sky, car in every few images
    assert {1} <= seen and seen & {0, 3, 4, 6}  # void ids are written as such (ego vehicle always)


def test_classes_are_learnable_from_colour_but_not_constant(tmp_path):
    root = make_synthetic_cityscapes(tmp_path / "s", splits={"train": 4}, size=(64, 128))
    ds = CityscapesDataset(root, "train")
    image, mask = ds.load(0)
    road, sky = image[mask == 0].astype(float), image[mask == 10].astype(float)
    assert road.std(axis=0).min() > 3  # texture and noise
    assert np.linalg.norm(road.mean(0) - sky.mean(0)) > 60  # but the colour tells the class


def test_deterministic_bytes(tmp_path):
    kw = dict(splits={"train": 3, "val": 1}, size=(32, 64), seed=7, write_train_ids=True)
    a = _files(make_synthetic_cityscapes(tmp_path / "a", **kw))
    b = _files(make_synthetic_cityscapes(tmp_path / "b", **kw))
    assert len(a) == 12 and a == b
    c = _files(make_synthetic_cityscapes(tmp_path / "c", **dict(kw, seed=8)))
    assert c.keys() == a.keys() and c != a
    # a split's content does not depend on which other splits are written
    d = _files(make_synthetic_cityscapes(tmp_path / "d", **dict(kw, splits={"val": 1})))
    assert all(d[k] == a[k] for k in d)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 16x16"):
        make_synthetic_cityscapes(tmp_path, size=(8, 64))
    with pytest.raises(ValueError, match="cities"):
        make_synthetic_cityscapes(tmp_path, cities=())


def test_prepare_caches_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    root = prepare_synthetic_cityscapes()
    assert root == default_synthetic_root() == tmp_path / "cache" / f"synthetic-cityscapes-v{SYNTHETIC_VERSION}"
    assert (root / ".complete").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temp folder left behind
    train, val = CityscapesDataset(root, "train"), CityscapesDataset(root, "val")
    assert (len(train), len(val)) == (96, 24)
    assert train.load(0)[0].shape == (128, 256, 3)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert prepare_synthetic_cityscapes() == root and prepare_synthetic_cityscapes(root) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps  # not rewritten


def test_prepare_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete synthetic Cityscapes cache"):
        prepare_synthetic_cityscapes(tmp_path / "d")
