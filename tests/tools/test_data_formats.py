"""The same digits as an ImageFolder, a Hugging Face dataset and WebDataset shards train the same weights bitwise
through train_cls; eval_cls reads each format, and under torchrun counts every sample of an uneven split once."""
import json
import subprocess
import sys

import pytest
import torch

from mdeq.engine.checkpoint import load_checkpoint

from ..data.formats import imagefolder_samples, write_hf_saved, write_wds_shards
from .conftest import ROOT, fast_overrides, run_tool, tool_env


@pytest.fixture(scope="module")
def formats(digits_small, tmp_path_factory):
    """digits_small written as a save_to_disk DatasetDict and as shards (4 + 3 train shards of 10 and 6 images per
    the natural order; 29 of the 30 val images in 3 shards, so two ranks get 15 and 14)."""
    root = tmp_path_factory.mktemp("formats")
    classes, train = imagefolder_samples(digits_small / "train")
    _, val = imagefolder_samples(digits_small / "val")
    write_hf_saved(root / "hf", {"train": train, "validation": val}, classes)
    write_wds_shards(root / "wds", "train", train, per_shard=10)
    write_wds_shards(root / "wds", "val", val[:29], per_shard=10)
    (root / "wds" / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _train(digits_small, data_args, run_dir, cwd):
    overrides = [o for o in fast_overrides(digits_small, "train.epochs=1") if not o.startswith(("data=", "data.root="))]
    run_tool("train_cls.py", [*data_args, *overrides, f"hydra.run.dir={run_dir}"], cwd=cwd)
    return json.loads((run_dir / "metrics.json").read_text()), load_checkpoint(run_dir / "checkpoints" / "last.pth")


@pytest.fixture(scope="module")
def runs(digits_small, formats, tmp_path_factory):
    """{format: (run folder, metrics, last checkpoint)} of the same fast run on each format."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, args in (("imagefolder", ["data=imagefolder", f"data.root={digits_small}"]),
                       ("hfds", ["data=hfds", f"data.root={formats / 'hf'}"]),
                       ("wds", ["data=wds", f"data.root={formats / 'wds'}"])):
        out[name] = (root / name, *_train(digits_small, args, root / name, root))
    return out


def test_every_format_trains_the_same_weights_and_eval_cls_reads_each(runs, formats, tmp_path):
    _, ref_metrics, ref = runs["imagefolder"]
    for name, val_count in (("hfds", 30), ("wds", 29)):
        _, metrics, ck = runs[name]
        assert ck["classes"] == ref["classes"], name
        assert ck["model"].keys() == ref["model"].keys()
        assert all(torch.equal(ck["model"][k], ref["model"][k]) for k in ref["model"]), name
        assert metrics["val_count"] == val_count, name
        if name == "hfds":  # the same val images: the same predictions
            assert metrics["val_top1"] == ref_metrics["val_top1"] and metrics["val_loss"] == ref_metrics["val_loss"]
    # eval_cls on a format other than the run's: the run's classes, the split's images
    ckpt = str(runs["imagefolder"][0] / "checkpoints" / "last.pth")
    proc = run_tool("eval_cls.py", [ckpt, "--data", "hfds", "--data-root", str(formats / "hf"), "--output",
                                    str(tmp_path / "eval_hf"), "--no-progress"], cwd=tmp_path)
    hf = json.loads((tmp_path / "eval_hf" / "eval.json").read_text())
    assert hf["images"] == 30 and hf["top1"] == pytest.approx(ref_metrics["val_top1"]), proc.stdout
    assert hf["data_root"] == str(formats / "hf")
    wds = run_tool("eval_cls.py", [ckpt, "--data", "wds", "--data-root", str(formats / "wds"), "--label-key", "nope",
                                   "--output", str(tmp_path / "eval_bad"), "--no-progress"], cwd=tmp_path, check=False)
    assert wds.returncode != 0 and "has no label .nope" in wds.stderr and "val-000000.tar" in wds.stderr


def test_torchrun_evaluation_counts_every_sample_of_an_uneven_split_once(runs, tmp_path):
    ckpt = str(runs["wds"][0] / "checkpoints" / "last.pth")  # trained on the shards: evaluates on their val split
    single = run_tool("eval_cls.py", [ckpt, "--output", str(tmp_path / "one"), "--no-progress"], cwd=tmp_path)
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "eval_cls.py"), ckpt, "--output", str(tmp_path / "two"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert one["images"] == two["images"] == 29, single.stdout
    assert two["top1"] == pytest.approx(one["top1"]) and two["top5"] == pytest.approx(one["top5"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_finetune_reads_a_hugging_face_dataset_through_its_own_columns(runs, digits_small, tmp_path):
    """A new labelling (parity as strings) in columns named img / parity: two classes, sorted by name."""
    classes, train = imagefolder_samples(digits_small / "train")
    _, val = imagefolder_samples(digits_small / "val")
    parity = lambda samples: [(img, int(classes[t]) % 2) for img, t in samples]  # noqa: E731
    root = write_hf_saved(tmp_path / "parity", {"train": parity(train), "validation": parity(val)}, ["even", "odd"],
                          image_key="img", label_key="parity", names_as_strings=True)
    source = runs["imagefolder"][0] / "checkpoints" / "last.pth"
    out = tmp_path / "ft"
    run_tool("finetune.py", [f"model.weights={source}", "data=hfds", f"data.root={root}", "data.image_key=img",
                             "data.label_key=parity", "data.aug.hflip=0.0", "data.batch_size=20", "data.workers=0",
                             "deq.max_iter=3", "deq.b_max_iter=3", "train.epochs=1", "train.precise_bn_batches=1",
                             "train.progress=false", f"hydra.run.dir={out}"], cwd=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_classes"] == 2 and m["val_count"] == 30
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["classes"] == ["even", "odd"] and ck["model"]["classifier.weight"].shape[0] == 2
