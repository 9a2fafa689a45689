"""Hugging Face datasets and WebDataset shards as classification data: the pixels, classes and labels read back
equal what was written, in every layout the data configs accept; a missing column, a corrupt or cut shard, a sample
without a label are errors naming the column or file; the samplers split them exactly over ranks."""
import tarfile

import numpy as np
import pytest
from PIL import Image

from mdeq.data.errors import DatasetLayoutError, UnreadableImageError
from mdeq.data.factory import build_classification_datasets, build_classification_split
from mdeq.data.flip_check import flip_retention
from mdeq.data.hf_images import HuggingFaceImages
from mdeq.data.inspect import typical_image_size, verify_datasets
from mdeq.data.loaders import ShardSampler, build_train_loader
from mdeq.data.wds_shards import WebDatasetShards, find_shards, split_key

from .formats import write_hf_parquet, write_hf_saved, write_wds_shards

CLASSES = ["cat", "dog", "fox"]


def _samples(n, seed, size=(12, 10)):
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)), int(t))
            for t in rng.integers(0, len(CLASSES), n)]


@pytest.fixture(scope="module")
def splits():
    return {"train": _samples(11, 0), "validation": _samples(5, 1)}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """load_dataset's cache in the test's folder, not the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _same(dataset, samples):
    assert len(dataset) == len(samples)
    assert dataset.targets == [t for _, t in samples]
    for i, (img, target) in enumerate(samples):
        image, label = dataset[i]
        assert label == target and np.array_equal(np.asarray(image), np.asarray(img)), dataset.describe(i)


# ------------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("layout", ["save_to_disk", "split_folders", "parquet"])
def test_hf_layouts_read_back_the_written_pixels_labels_and_class_names(tmp_path, splits, layout):
    if layout == "save_to_disk":
        root = write_hf_saved(tmp_path / "hf", splits, CLASSES)
    elif layout == "split_folders":  # one Dataset.save_to_disk folder per split
        from .formats import hf_dataset_dict

        for split, ds in hf_dataset_dict(splits, CLASSES).items():
            ds.save_to_disk(str(tmp_path / "hf" / split))
        root = tmp_path / "hf"
    else:  # what load_dataset opens: a Hub dataset's layout (a Hub name takes the same path)
        root = write_hf_parquet(tmp_path / "hf", splits, CLASSES)
    train, val = build_classification_datasets({"name": "hfds", "root": str(root)})  # val finds "validation"
    assert train.classes == val.classes == CLASSES and val.split == "validation"
    _same(train, splits["train"])
    _same(val, splits["validation"])
    assert typical_image_size(train) == 10 and verify_datasets({"train": train, "val": val}) == 16


def test_hf_columns_are_configurable_and_string_labels_are_sorted_into_classes(tmp_path, splits):
    root = write_hf_saved(tmp_path / "hf", splits, CLASSES, image_key="img", label_key="species",
                          names_as_strings=True)
    cfg = {"name": "hfds", "root": str(root), "image_key": "img", "label_key": "species"}
    train, val = build_classification_datasets(cfg)
    assert train.classes == sorted({CLASSES[t] for _, t in splits["train"]})
    _same(train, [(img, train.class_to_idx[CLASSES[t]]) for img, t in splits["train"]])
    # another split with the run's classes (what eval_cls passes): indices follow them
    flipped = build_classification_split(cfg, "validation", classes=list(reversed(train.classes)))
    assert flipped.targets == [len(train.classes) - 1 - train.class_to_idx[CLASSES[t]]
                               for _, t in splits["validation"]]


def test_hf_missing_column_split_or_labels_are_errors_naming_them(tmp_path, splits):
    root = str(write_hf_saved(tmp_path / "hf", splits, CLASSES))
    with pytest.raises(DatasetLayoutError, match=r"no image column 'picture' \(columns: \['image', 'label', 'note'\]"
                                                 r"\); set data.image_key"):
        HuggingFaceImages(root, "train", image_key="picture")
    with pytest.raises(DatasetLayoutError, match=r"no label column 'target' .*set data.label_key"):
        HuggingFaceImages(root, "train", label_key="target")
    with pytest.raises(DatasetLayoutError, match=r"column 'label' does not hold images \(ClassLabel"):
        HuggingFaceImages(root, "train", image_key="label")
    with pytest.raises(DatasetLayoutError, match=r"has no split 'test' \(splits: \['train', 'validation'\]\)"):
        HuggingFaceImages(root, "test")
    with pytest.raises(DatasetLayoutError, match=r"cannot open '.*nowhere' as a Hugging Face dataset"):
        HuggingFaceImages(str(tmp_path / "nowhere"), "train")
    import datasets

    from .formats import hf_dataset_dict

    ds = hf_dataset_dict(splits, CLASSES)  # a test split without labels: -1, as on the Hub
    ds["test"] = ds["validation"].cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
    ds.save_to_disk(str(tmp_path / "with_test"))
    with pytest.raises(DatasetLayoutError, match=r"\[test\] column 'label' has samples without a label \(row 0"):
        HuggingFaceImages(str(tmp_path / "with_test"), "test")


def test_hf_a_broken_image_names_its_row(tmp_path, splits):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a png", "path": None}], "label": [0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}))})
    ds.save_to_disk(str(tmp_path / "bad"))
    train = HuggingFaceImages(str(tmp_path / "bad"), "train")
    with pytest.raises(UnreadableImageError, match=r"bad \[train row 0, column 'image'\]"):
        train[0]
    with pytest.raises(UnreadableImageError, match=r"1 of 1 files cannot be read:\n  \[train\] .*bad \[train row 0"):
        verify_datasets({"train": train})


# ------------------------------------------------------------------------------------------------ WebDataset
@pytest.mark.parametrize("layout", ["named", "folders", "brace"])
def test_wds_layouts_read_back_the_written_pixels_and_labels(tmp_path, splits, layout):
    root = tmp_path / "shards"
    sub = layout == "folders"
    write_wds_shards(root / "train" if sub else root, "train", splits["train"], per_shard=4)
    write_wds_shards(root / "val" if sub else root, "imagenet-val", splits["validation"], per_shard=2)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    cfg = {"name": "wds", "root": str(root)}
    if layout == "brace":
        cfg.update(train_split="train-{000000..000002}.tar", val_split="imagenet-val-{000000..000002}.tar")
    train, val = build_classification_datasets(cfg)
    assert len(train.shards) == 3 and len(val.shards) == 3
    assert train.classes == val.classes == CLASSES
    _same(train, splits["train"])
    _same(val, splits["validation"])
    assert train.describe(5) == f"{train.shards[1]}:train_00005"
    assert verify_datasets({"train": train}) == 11 and typical_image_size(val) == 10


def test_wds_label_from_a_json_field_other_image_extension_and_indices_as_classes(tmp_path, splits):
    write_wds_shards(tmp_path / "s", "train", splits["train"], 5, image_ext="jpeg", label="json:label")
    train = WebDatasetShards(tmp_path / "s", "train", label_key="label")
    assert train.targets == [t for _, t in splits["train"]]
    assert train.classes == [str(i) for i in range(max(train.targets) + 1)]  # no classes.txt: the indices
    assert train.load(0).size == (10, 12)
    with pytest.raises(DatasetLayoutError, match=r"its .json no 'cls' field \(fields: \['label', 'source'\]\)"):
        WebDatasetShards(tmp_path / "s", "train")
    with pytest.raises(DatasetLayoutError, match=r"has no image \(png; it has \['jpeg', 'json'\]\); set "
                                                 r"data.image_key"):
        WebDatasetShards(tmp_path / "s", "train", image_key="png", label_key="label")


def test_wds_corrupt_cut_or_compressed_shards_and_bad_samples_name_the_file(tmp_path, splits):
    shards = write_wds_shards(tmp_path / "s", "train", splits["train"], 4)
    shards[1].write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DatasetLayoutError, match=rf"shard {shards[1]} is not a readable uncompressed tar"):
        WebDatasetShards(tmp_path / "s", "train")

    cut = write_wds_shards(tmp_path / "c", "train", splits["train"], 11)[0]
    with tarfile.open(cut) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".png")][-1]
    cut.write_bytes(cut.read_bytes()[:last.offset_data + last.size // 2])
    with pytest.raises(DatasetLayoutError, match=rf"shard {cut} is cut short: train_00010.png"):
        WebDatasetShards(tmp_path / "c", "train")

    import gzip
    gz = tmp_path / "g" / "train-000000.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(shards[0].read_bytes()))
    with pytest.raises(DatasetLayoutError, match=rf"shard {gz} is not a readable uncompressed tar"):
        WebDatasetShards(tmp_path / "g", "train")

    nolabel = tmp_path / "n" / "train-000000.tar"
    nolabel.parent.mkdir()
    with tarfile.open(nolabel, "w") as tar:
        (tmp_path / "x.png").write_bytes(b"")
        tar.add(tmp_path / "x.png", arcname="a.png")
    with pytest.raises(DatasetLayoutError, match=rf"sample 'a' in shard {nolabel} has no label .cls"):
        WebDatasetShards(tmp_path / "n", "train")

    bad_image = write_wds_shards(tmp_path / "b", "train", splits["train"][:1], 1)[0]
    with tarfile.open(bad_image) as tar:
        png = [m for m in tar.getmembers() if m.name.endswith(".png")][0]
    data = bytearray(bad_image.read_bytes())
    data[png.offset_data:png.offset_data + png.size] = b"\x00" * png.size
    bad_image.write_bytes(bytes(data))
    with pytest.raises(UnreadableImageError, match=rf"cannot read image file {bad_image}:train_00000"):
        WebDatasetShards(tmp_path / "b", "train")[0]


def test_wds_missing_shards_and_unknown_classes_are_errors(tmp_path, splits):
    write_wds_shards(tmp_path / "s", "train", splits["train"], 4)
    with pytest.raises(DatasetLayoutError, match=r"no shards of split 'val' in .*found: \['train-000000.tar'"):
        find_shards(tmp_path / "s", "val")
    with pytest.raises(DatasetLayoutError, match=r"1 of the 4 shards of 'train-\{000000..000003\}.tar' are not in"):
        find_shards(tmp_path / "s", "train-{000000..000003}.tar")
    with pytest.raises(DatasetLayoutError, match=r"class index 2, but there are 2 classes"):
        WebDatasetShards(tmp_path / "s", "train", class_to_idx={"a": 0, "b": 1})
    assert split_key("dir/n0144.seg.png") == ("dir/n0144", "seg.png") and split_key("README") is None


def test_keys_are_refused_for_an_imagefolder_and_root_is_required():
    with pytest.raises(ValueError, match=r"data.label_key name fields of data=hfds\|wds sources, not of "
                                         r"data.name='imagefolder'"):
        build_classification_datasets({"name": "imagefolder", "root": "/x", "label_key": "y"})
    with pytest.raises(ValueError, match=r"data.root \(a tool's --data-root\) is required for data.name=wds"):
        build_classification_datasets({"name": "wds", "root": None})


# ------------------------------------------------------------------------------------------------ ranks, workers
def test_each_rank_reads_a_distinct_part_and_evaluation_covers_every_sample_once(tmp_path, splits):
    write_wds_shards(tmp_path / "s", "train", splits["train"], 4)
    root = write_hf_saved(tmp_path / "hf", splits, CLASSES)
    for ds in (WebDatasetShards(tmp_path / "s", "train"), HuggingFaceImages(str(root), "train")):
        eval_parts = [list(ShardSampler(len(ds), 2, rank)) for rank in range(2)]
        assert sorted(eval_parts[0] + eval_parts[1]) == list(range(len(ds))) and not set(eval_parts[0]) & set(
            eval_parts[1])
        seen = []
        for rank in range(2):  # the training loader's samples (seed, epoch): disjoint, through 2 worker processes
            ds.transform = lambda img: np.asarray(img).astype(np.float32).sum()
            loader = build_train_loader(ds, batch_size=2, seed=0, num_replicas=2, rank=rank, workers=2)
            loader.sampler.set_epoch(1)
            seen.append([(float(x), int(y)) for xb, yb in loader for x, y in zip(xb, yb)])
        pixels = {float(np.asarray(img).astype(np.float32).sum()): t for img, t in splits["train"]}
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
        assert all(pixels[x] == y for x, y in seen[0] + seen[1])


def test_flip_check_reads_any_source(tmp_path):
    """The digits-like check behind data.aug.hflip=auto: classes told apart by a left/right shape."""
    bars = []
    for i in range(40):  # class 1: a bar on the left, class 0: on the right
        img = np.zeros((16, 16, 3), dtype=np.uint8)
        (img[:, :4] if i % 2 else img[:, 12:])[...] = 255
        bars.append((Image.fromarray(img), i % 2))
    write_wds_shards(tmp_path / "s", "train", bars, 10)
    assert flip_retention(WebDatasetShards(tmp_path / "s", "train")) == 0.0
