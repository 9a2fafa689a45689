"""Cityscapes/folder segmentation datasets, label mapping and validation, and the albumentations transforms."""
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.data.cityscapes import CityscapesDataset
from mdeq.data.cityscapes_labels import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX, VALID_LABEL_IDS,
                                         label_id_to_train_id, to_label_ids, train_id_to_label_id)
from mdeq.data.errors import DatasetLayoutError, UnreadableImageError
from mdeq.data.factory import build_segmentation_dataset
from mdeq.data.loaders import SeededDataset
from mdeq.data.segmentation import (FolderPairDataset, LabelValueError, build_seg_eval_transform,
                                    build_seg_train_transform, colorize, default_palette, save_label_png)
from mdeq.data.synthetic_seg import default_synthetic_root, make_synthetic_cityscapes

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
no_warnings = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture
def city(tmp_path):
    return make_synthetic_cityscapes(tmp_path / "cs", splits={"train": 4, "val": 2}, size=(32, 64), seed=1,
                                     write_train_ids=True)


def _label_path(ds, i):
    return ds.samples[i][1]


# ------------------------------------------------------------------------------------------------ label table
def test_label_tables():
    lut = label_id_to_train_id()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert {i: int(lut[i]) for i in range(256) if lut[i] != 255} == OFFICIAL
    inv = train_id_to_label_id()
    assert inv.dtype == np.uint8 and inv.shape == (256,)
    assert [int(inv[t]) for t in range(19)] == sorted(OFFICIAL)
    assert all(lut[inv[t]] == t for t in range(19)) and inv[255] == 0
    assert CITYSCAPES_CLASSES[:3] == ("road", "sidewalk", "building") and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_PALETTE.shape == (19, 3)
    assert CITYSCAPES_PALETTE.dtype == np.uint8 and tuple(CITYSCAPES_PALETTE[13]) == (0, 0, 142)  # car
    assert VALID_LABEL_IDS == set(range(34))
    np.testing.assert_array_equal(to_label_ids(np.array([[0, 13], [255, 18]])), [[7, 26], [0, 33]])
    np.testing.assert_array_equal(to_label_ids(torch.tensor([18, 255])), [33, 0])


# ------------------------------------------------------------------------------------------------ Cityscapes
def test_cityscapes_samples_and_mapping(city):
    ids = CityscapesDataset(city, "train", label_type="labelIds")
    train_ids = CityscapesDataset(city, "train", label_type="labelTrainIds")
    auto = CityscapesDataset(city, "train")
    assert len(ids) == 4 and len(CityscapesDataset(city, "val")) == 2
    assert ids.classes == list(CITYSCAPES_CLASSES) and ids.num_classes == 19 and ids.ignore_index == 255
    np.testing.assert_array_equal(ids.palette, CITYSCAPES_PALETTE)
    assert [ids.relative_name(i) for i in range(4)] == [
        "aachen/aachen_000000_000019_leftImg8bit", "aachen/aachen_000001_000019_leftImg8bit",
        "bremen/bremen_000000_000019_leftImg8bit", "bremen/bremen_000001_000019_leftImg8bit"]
    for i, (image, label) in enumerate(ids.samples):
        assert label.endswith(ids.relative_name(i).split("/")[-1].replace("leftImg8bit", "gtFine_labelIds.png"))
        assert "/gtFine/train/" in label and "/leftImg8bit/train/" in image
        assert auto.samples[i][1].endswith("_gtFine_labelTrainIds.png")
        with Image.open(label) as f:
            raw = np.array(f)
        m_ids, m_train, m_auto = ids.load(i)[1], train_ids.load(i)[1], auto.load(i)[1]
        assert m_ids.dtype == np.uint8 and m_ids.shape == (32, 64)
        np.testing.assert_array_equal(m_ids, m_train)
        np.testing.assert_array_equal(m_ids, m_auto)
        void = np.isin(raw, [0, 1, 2, 3, 4, 5, 6])
        assert void.any() and (m_ids[void] == 255).all()  # void ids become ignore
        assert (m_ids[raw == 26] == 13).all() and (m_ids[raw == 7] == 0).all()
        assert set(np.unique(m_ids).tolist()) <= set(range(19)) | {255}


def test_getitem_without_transform(city):
    ds = CityscapesDataset(city, "val")
    x, y = ds[0]
    image, mask = ds.load(0)
    assert x.dtype == torch.float32 and x.shape == (3, 32, 64) and y.dtype == torch.long and y.shape == (32, 64)
    expected = (image[5, 7] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(x[:, 5, 7].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(mask).long())


def test_layout_errors(city, tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*leftImg8bit/<split>/<city>/"):
        CityscapesDataset(tmp_path / "nope")
    with pytest.raises(DatasetLayoutError, match=r"no leftImg8bit folder .*found folders: \['x'\]"):
        (tmp_path / "empty" / "x").mkdir(parents=True)
        CityscapesDataset(tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match=r"no 'test' split .*found splits: \['train', 'val'\]"):
        CityscapesDataset(city, "test")
    (city / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no \\*_leftImg8bit.png images"):
        CityscapesDataset(city, "test")
    with pytest.raises(ValueError, match="label_type must be one of"):
        CityscapesDataset(city, "val", label_type="color")


def test_image_without_label(city):
    for f in (city / "gtFine" / "val" / "bremen").glob("bremen_000000_000019_gtFine_*"):
        f.unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 images .*bremen_000000_000019_leftImg8bit.png: "
                                                 r"expected .*bremen_000000_000019_gtFine_labelIds.png"):
        CityscapesDataset(city, "val")
    # only labelIds asked for: the labelTrainIds of another sample do not count
    (city / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetLayoutError, match="2 of 2 images"):
        CityscapesDataset(city, "val", label_type="labelIds")
    ds = CityscapesDataset(city, "val", require_labels=False)
    assert ds.samples[1][1] is None and ds.samples[0][1].endswith("labelTrainIds.png")
    image, mask = ds.load(1)
    assert mask.shape == image.shape[:2] and (mask == 255).all()
    assert (ds[1][1] == 255).all()


def test_label_value_errors(city):
    ds = CityscapesDataset(city, "train", label_type="labelIds")
    bad = np.array(Image.open(_label_path(ds, 1)))
    bad[0, :3] = 40
    bad[1, 0] = 34
    Image.fromarray(bad).save(_label_path(ds, 1))
    ds.load(0)  # the other samples are fine
    with pytest.raises(LabelValueError, match=r"aachen_000001_000019_gtFine_labelIds.png holds values 34, 40 .*"
                                              r"allowed: 0..33"):
        ds[1]
    tds = CityscapesDataset(city, "train", label_type="labelTrainIds")
    bad = np.array(Image.open(_label_path(tds, 2)))
    bad[3, 3] = 19
    Image.fromarray(bad).save(_label_path(tds, 2))
    with pytest.raises(LabelValueError, match=r"labelTrainIds.png holds values 19 .*allowed: 0..18, 255"):
        tds.load(2)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(_label_path(tds, 3))
    with pytest.raises(LabelValueError, match="3 channels .*single-channel"):
        tds.load(3)
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(_label_path(tds, 0))
    with pytest.raises(DatasetLayoutError, match="is 16x64 but its image .* is 32x64"):
        tds.load(0)


def test_unreadable_image(city):
    ds = CityscapesDataset(city, "val")
    with open(ds.samples[0][0], "wb") as f:
        f.write(b"\x89PNG not really")
    with pytest.raises(UnreadableImageError, match="cannot read image file .*aachen_000000_000019_leftImg8bit.png"):
        ds[0]


# ------------------------------------------------------------------------------------------------ folder pairs
def _folder(root, classes_txt=True):
    rng = np.random.default_rng(0)
    for split, names in (("train", ["a/0001.jpg", "a/0002.png", "b.png"]), ("val", ["c.bmp"])):
        for name in names:
            image = root / "images" / split / name
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(image)
            mask = rng.integers(0, 3, (12, 20)).astype(np.uint8)
            mask[0, 0] = 255
            save_label_png((root / "masks" / split / name).with_suffix(".png"), mask)
    if classes_txt:
        (root / "classes.txt").write_text("background\n\nroad\ncar\n")
    return root


def test_folder_pairs(tmp_path):
    root = _folder(tmp_path / "f")
    ds = FolderPairDataset(root, "train")
    assert ds.classes == ["background", "road", "car"] and ds.num_classes == 3 and len(ds) == 3
    assert [ds.relative_name(i) for i in range(3)] == ["a/0001", "a/0002", "b"]
    assert ds.samples[0][1].endswith("masks/train/a/0001.png")
    np.testing.assert_array_equal(ds.palette, CITYSCAPES_PALETTE[:3])
    x, y = ds[0]
    assert x.shape == (3, 12, 20) and y.shape == (12, 20) and set(y.unique().tolist()) == {0, 1, 2, 255}
    listed = FolderPairDataset(root, "val", classes=["x", "y", "z", "w"])
    assert listed.classes == ["x", "y", "z", "w"] and len(listed) == 1
    seg = build_segmentation_dataset("folder", root, "val", classes=["x", "y", "z"])
    assert isinstance(seg, FolderPairDataset) and seg.num_classes == 3

    two = FolderPairDataset(root, "train", classes=["x", "y"])  # mask value 2 is not a class any more
    with pytest.raises(LabelValueError, match=r"0001.png holds values 2 .*allowed: 0, 1, 255"):
        two.load(0)
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        FolderPairDataset(root, "train", ignore_index=2)
    (root / "masks" / "train" / "b.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 3 images .*b.png: expected .*masks/train/b.png"):
        FolderPairDataset(root, "train")
    assert (FolderPairDataset(root, "train", require_labels=False).load(2)[1] == 255).all()
    with pytest.raises(DatasetLayoutError, match=r"no 'test' split .*found splits: \['train', 'val'\]"):
        FolderPairDataset(root, "test")


def test_folder_needs_class_names(tmp_path):
    root = _folder(tmp_path / "f", classes_txt=False)
    with pytest.raises(DatasetLayoutError, match="pass classes=.* or write .*classes.txt"):
        FolderPairDataset(root)
    palette = default_palette(25)
    assert palette.shape == (25, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[:19], CITYSCAPES_PALETTE)
    np.testing.assert_array_equal(palette, default_palette(25))  # fixed, not random per call


def test_factory(city, tmp_path, monkeypatch):
    assert isinstance(build_segmentation_dataset("cityscapes", city, "val"), CityscapesDataset)
    with pytest.raises(ValueError, match=r"unknown segmentation dataset 'voc'; choices: \['cityscapes', 'folder', "
                                         r"'synthetic', 'synthetic_video'\]"):
        build_segmentation_dataset("voc", city, "val")
    with pytest.raises(ValueError, match="fixed 19 Cityscapes classes"):
        build_segmentation_dataset("cityscapes", city, "val", classes=["a"])
    # "synthetic" = the cache folder of prepare_synthetic_cityscapes (a small stand-in marked complete here;
    # building the real one is tested in test_synthetic_seg.py)
    cache = tmp_path / "cache" / default_synthetic_root().name
    make_synthetic_cityscapes(cache, splits={"val": 3}, size=(16, 32))
    (cache / ".complete").write_text("test\n")
    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    syn = build_segmentation_dataset("synthetic", None, "val")
    assert isinstance(syn, CityscapesDataset) and len(syn) == 3 and syn.root == cache
    assert len(build_segmentation_dataset("synthetic", cache, "val", require_labels=False)) == 3


# ------------------------------------------------------------------------------------------------ transforms
def _without(tf, *names):
    """The same Compose minus the named steps (to look at pixels before Normalize)."""
    import albumentations as A

    return A.Compose([t for t in tf.transforms if type(t).__name__ not in names])


@no_warnings
def test_train_transform_pads_with_ignore(city):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf = build_seg_train_transform(crop_size=(48, 96), scale_range=(0.5, 0.5), flip=False)
    ds = CityscapesDataset(city, "train", transform=tf)
    image, mask = ds.load(0)
    x, y = ds[0]
    assert x.shape == (3, 48, 96) and x.dtype == torch.float32 and y.shape == (48, 96) and y.dtype == torch.long
    assert (y[16:] == 255).all() and (y[:, 32:] == 255).all() and (y[:16, :32] != 255).any()  # top-left placed
    pad_value = torch.tensor((0 - MEAN) / STD, dtype=torch.float32)
    assert torch.allclose(x[:, 20, 50], pad_value) and torch.allclose(x[:, 47, 0], pad_value)
    raw = _without(tf, "Normalize", "ToTensorV2")
    raw.set_random_seed(0)
    out = raw(image=image, mask=mask)
    assert out["image"].dtype == np.uint8 and (out["image"][16:] == 0).all() and (out["image"][:, 32:] == 0).all()
    assert (out["mask"][16:] == 255).all()
    np.testing.assert_array_equal(out["mask"][:16, :32], mask[::2, ::2])  # nearest: every other pixel kept


@no_warnings
def test_train_transform_keeps_label_values():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.where(rng.random((40, 60)) < 0.5, 3, 200).astype(np.uint8)  # linear resizing would mix 3 and 200
    tf = _without(build_seg_train_transform(crop_size=(32, 48), scale_range=(0.55, 1.9)), "Normalize", "ToTensorV2")
    for s in range(12):
        tf.set_random_state(np.random.default_rng(s), random.Random(s))
        out = tf(image=image, mask=mask)
        assert out["image"].shape == (32, 48, 3) and out["mask"].shape == (32, 48)
        assert set(np.unique(out["mask"]).tolist()) <= {3, 200, 255}


@no_warnings
def test_train_transform_flips_sometimes_and_is_seeded_by_numpy(city):
    image = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))
    tf = _without(build_seg_train_transform(crop_size=(32, 64), scale_range=(1.0, 1.0)), "Normalize")
    flips = []
    for s in range(16):
        tf.set_random_state(np.random.default_rng(s), random.Random(s))
        row = tf(image=image, mask=np.zeros((32, 64), np.uint8))["image"][0, 0].numpy()
        assert row[0] in (0, 252)
        flips.append(bool(row[0] == 252))
    assert 0 < sum(flips) < 16

    ds = CityscapesDataset(city, "train", transform=build_seg_train_transform(crop_size=(24, 40)))
    np.random.seed(123)
    a = ds[1]
    np.random.seed(123)
    b = ds[1]
    np.random.seed(124)
    c = ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    seeded = SeededDataset(ds, seed=5)  # the trainer's wrapper: a pure function of (seed, epoch, index)
    first = seeded[2][0]
    assert torch.equal(seeded[2][0], first)
    seeded.set_epoch(1)
    assert not torch.equal(seeded[2][0], first)
    state = np.random.get_state()[1].copy()
    seeded[0]
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@no_warnings
def test_eval_transform_and_argument_checks(city):
    ds = CityscapesDataset(city, "val", transform=build_seg_eval_transform())
    x, y = ds[0]
    plain = CityscapesDataset(city, "val")[0]
    assert x.shape == (3, 32, 64) and torch.allclose(x, plain[0], atol=1e-5) and torch.equal(y, plain[1])
    with pytest.raises(ValueError, match="crop_size must be positive"):
        build_seg_train_transform(crop_size=(0, 10))
    with pytest.raises(ValueError, match="crop_size must be"):
        build_seg_train_transform(crop_size=512)
    with pytest.raises(ValueError, match="0 < low <= high"):
        build_seg_train_transform(scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="0 < low <= high"):
        build_seg_train_transform(scale_range=(2.0, 1.0))


# ------------------------------------------------------------------------------------------------ label maps
def test_colorize_and_label_png(tmp_path):
    mask = np.array([[0, 1], [255, 18]])
    rgb = colorize(mask, CITYSCAPES_PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [244, 35, 232]
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [119, 11, 32]
    np.testing.assert_array_equal(colorize(torch.from_numpy(mask), CITYSCAPES_PALETTE, ignore_color=(9, 9, 9))[1, 0],
                                  [9, 9, 9])
    label = np.random.default_rng(0).integers(0, 256, (7, 11)).astype(np.uint8)
    path = save_label_png(tmp_path / "a" / "b" / "x.png", torch.from_numpy(label).long())
    with Image.open(path) as f:
        assert f.mode == "L"
        np.testing.assert_array_equal(np.array(f), label)
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "y.png", np.array([[300]]))
    assert IGNORE_INDEX == 255


def test_eval_batches_of_different_image_sizes_fail_clearly():
    import torch

    from mdeq.data.segmentation import collate_same_size

    same = collate_same_size([(torch.zeros(3, 4, 6), torch.zeros(4, 6)), (torch.ones(3, 4, 6), torch.ones(4, 6))])
    assert same[0].shape == (2, 3, 4, 6) and same[1].shape == (2, 4, 6)
    with pytest.raises(ValueError, match=r"4x6, 8x6\).*eval batch size of 1"):
        collate_same_size([(torch.zeros(3, 4, 6), torch.zeros(4, 6)), (torch.zeros(3, 8, 6), torch.zeros(8, 6))])
