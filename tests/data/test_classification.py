"""ImageFolder checks, the seeded/resumable data pipeline and the digits cache."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.data.classification import ImageFolderDataset, build_imagefolder_datasets, find_split
from mdeq.data.errors import DatasetLayoutError, UnreadableImageError
from mdeq.data.loaders import ResumableSampler, SeededDataset, ShardSampler, build_train_loader
from mdeq.data.digits import prepare_digits


def _tree(root, splits=("train", "val"), classes=("a", "b", "c10", "c2"), n=3, size=8):
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 0, 0)).save(d / f"{i}.png")
    return root


def test_layout_errors_show_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"train/<class_name>/<image>"):
        find_split(tmp_path / "missing", "train")
    _tree(tmp_path / "noval", splits=("train",))
    with pytest.raises(DatasetLayoutError, match=r"no 'val' split folder .*found folders: \['train'\]"):
        build_imagefolder_datasets(tmp_path / "noval")
    flat = _tree(tmp_path / "flat", splits=("train",))
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetLayoutError, match="directly .* instead of one sub-folder per class"):
        build_imagefolder_datasets(flat)
    extra = _tree(tmp_path / "extra")
    (extra / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(extra / "val" / "zebra" / "0.png")
    with pytest.raises(DatasetLayoutError, match="classes that the train split does not have: \\['zebra'\\]"):
        build_imagefolder_datasets(extra)


def test_split_aliases_and_class_indices(tmp_path):
    root = _tree(tmp_path / "r", splits=("training", "validation"))
    train, val = build_imagefolder_datasets(root)
    assert train.classes == ["a", "b", "c2", "c10"]  # natural sort, as timm
    assert len(train) == 12 and len(val) == 12
    assert sorted(set(val.targets)) == [0, 1, 2, 3]
    assert val.samples[0][0].endswith("a/0.png") and val.targets[0] == 0


def test_val_with_fewer_classes_keeps_train_indices(tmp_path):
    root = _tree(tmp_path / "r", splits=("train",))
    _tree(tmp_path / "v", splits=("val",), classes=("c10",))
    (tmp_path / "v" / "val").rename(root / "val")
    train, val = build_imagefolder_datasets(root)
    assert set(val.targets) == {train.class_to_idx["c10"]} == {3}


def test_unreadable_image_names_the_file(tmp_path):
    root = _tree(tmp_path / "r")
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolderDataset(root / "train")
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("b/1.png")][0]
    with pytest.raises(UnreadableImageError, match=r"cannot read image file .*train/b/1\.png"):
        ds[idx]


class _RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_seeded_dataset_is_a_function_of_seed_epoch_index_and_keeps_the_callers_rng():
    ds = SeededDataset(_RandomItems(), seed=3)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected_next = (torch.rand(()).item(), random.random(), float(np.random.rand()))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    first = [ds[i] for i in range(10)]
    assert (torch.rand(()).item(), random.random(), float(np.random.rand())) == expected_next
    assert [ds[i] for i in reversed(range(10))] == first[::-1]  # order does not matter
    ds.set_epoch(1)
    assert ds[0] != first[0]
    ds.set_epoch(0)
    assert ds[4] == first[4]
    assert SeededDataset(_RandomItems(), seed=4)[0] != first[0]


def test_resumable_sampler_skips_exactly_the_seen_prefix():
    data = list(range(23))
    s = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, skip=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    s.set_epoch(4)
    assert list(s) != full
    other = ResumableSampler(data, num_replicas=2, rank=0, shuffle=True, seed=5, drop_last=True)
    other.set_epoch(3)
    assert not set(other) & set(full)  # ranks see disjoint samples


def test_shard_sampler_partitions_exactly():
    shards = [list(ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_train_loader_is_identical_with_and_without_workers(tmp_path):
    root = _tree(tmp_path / "r", n=4, size=12)
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(8), T.ToTensor()])
    train, _ = build_imagefolder_datasets(root, train_transform=tf)

    def epoch(workers, skip_batches=0):
        loader = build_train_loader(train, batch_size=4, seed=7, workers=workers)
        loader.dataset.set_epoch(2)
        loader.sampler.set_epoch(2, skip=skip_batches * 4)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b, c = epoch(0), epoch(2), epoch(0, skip_batches=2)
    assert len(a) == 4 and len(c) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xc, yc) in zip(a[2:], c):
        assert torch.equal(xa, xc) and torch.equal(ya, yc)


def test_digits_cache(tmp_path):
    root = prepare_digits(tmp_path / "digits")
    train = ImageFolderDataset(root / "train")
    val = ImageFolderDataset(root / "val", class_to_idx=train.class_to_idx)
    assert train.classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 10
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # stratified
    img = train.load(0)
    assert img.size == (32, 32) and img.mode == "RGB"
    from sklearn.datasets import load_digits

    first = int(train.samples[0][0].split("/")[-1].split(".")[0])
    raw = load_digits().images[first]
    small = np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64)
    assert np.corrcoef(small.ravel(), raw.ravel())[0, 1] > 0.9  # the real digit, upsampled
    stamp = (root / ".complete").stat().st_mtime_ns
    assert prepare_digits(root) == root and (root / ".complete").stat().st_mtime_ns == stamp  # written once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_digits_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete digits cache"):
        prepare_digits(tmp_path / "d")
