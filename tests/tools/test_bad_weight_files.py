"""A file that is not weights or a checkpoint: every tool that takes one ends with a short message naming the file,
what it is and the formats accepted, never a traceback or torch's advice to load unsafely (issue 14, item 5)."""
import importlib
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mdeq.engine.checkpoint import CheckpointError, load_checkpoint
from mdeq.engine.weight_files import CHECKPOINT_FORMATS, WEIGHTS_FORMATS, WeightsFileError
from mdeq.engine.weights import read_state_dict

from . import test_train_seg
from .conftest import run_tool

street = test_train_seg.street  # the generated Cityscapes-layout scenes (a fixture)

UNSAFE = "weights_only=False"
CHECKPOINT_ONLY = "a training checkpoint of mdeq-zoo"

# the faulty files every tool is run on, and what the message must say each one is
FAULTS = {
    "text.pth": "it is a text file (it begins 'hello, this is not a checkpoint')",
    "random.safetensors": "it is binary data of no known format",
    "empty.pth": "it is empty (0 bytes)",
    "truncated.pth": "it is a truncated torch checkpoint",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """The files of ``FAULTS`` (the truncated one: the first half of a real training-checkpoint-like file)."""
    root = tmp_path_factory.mktemp("bad weights")
    (root / "text.pth").write_text("hello, this is not a checkpoint\nsecond line\n")
    (root / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.pth").write_bytes(b"")
    torch.save({"identity": {"arch": "mdeq_tiny"}, "model": {"w": torch.randn(64, 256)}}, root / "whole.pth")
    data = (root / "whole.pth").read_bytes()
    (root / "truncated.pth").write_bytes(data[:len(data) // 2])
    return root


def _main(module: str):
    return importlib.import_module(f"mdeq.cli.{module}").main


def _hydra(module: str, overrides, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *overrides])
    return _main(module)()


# tool -> (how to run it on file f with scratch folder t, formats the message must list)
TOOLS = {
    "eval_cls": (lambda f, t, mp: _main("eval_cls")([str(f), "--data-root", str(t), "--device", "cpu",
                                                    "--no-progress", "--output", str(t / "out")]), WEIGHTS_FORMATS),
    "eval_seg": (lambda f, t, mp: _main("eval_seg")([str(f), "--data-root", str(t), "--device", "cpu",
                                                    "--no-progress", "--output", str(t / "out")]), WEIGHTS_FORMATS),
    "export": (lambda f, t, mp: _main("export")([str(f), "--output", str(t / "m.onnx")]), WEIGHTS_FORMATS),
    "convert_official": (lambda f, t, mp: _main("convert_official")([str(f), str(t / "c.safetensors")]),
                         WEIGHTS_FORMATS),
    "publish_weights": (lambda f, t, mp: _main("publish_weights")([
        str(f), "--name", "mdeq_tiny.bad", "--ship", "--catalog", str(t / "catalog.json"), "--cards",
        str(t / "cards.md"), "--out", str(t / "pub")]), CHECKPOINT_ONLY),
    "distill": (lambda f, t, mp: _main("distill")([str(f), "--device", "cpu", "--no-progress", "--output",
                                                  str(t / "d")]), CHECKPOINT_ONLY),
    "benchmark models": (lambda f, t, mp: _main("benchmark")(["models", "--model", "mdeq_tiny:32", "--checkpoint",
                                                              str(f), "--out", str(t / "b")]), WEIGHTS_FORMATS),
    "benchmark seg": (lambda f, t, mp: _main("benchmark")(["seg", "--sizes", "64x64", "--checkpoint", str(f),
                                                           "--out", str(t / "b")]), WEIGHTS_FORMATS),
}
HYDRA_TOOLS = {
    "finetune model.weights": ("finetune", "model.weights"),
    "train_seg model.weights": ("train_seg", "model.weights"),
    "train_seg model.backbone": ("train_seg", "model.backbone"),
}


def _check(message: str, output: str, path: Path, fault: str, accepted: str) -> None:
    """The message's last two lines: the file and what it is, then the formats accepted; nothing unsafe anywhere."""
    first, last = message.strip().splitlines()[-2:]
    assert f" {path}: " in first and FAULTS[fault] in first, message
    assert last.startswith("accepted: ") and accepted in last, message
    assert UNSAFE not in message + output


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("tool", TOOLS)
def test_tool_names_the_file_what_it_is_and_the_formats(tool, fault, bad, tmp_path, capsys, monkeypatch):
    run, accepted = TOOLS[tool]
    with pytest.raises(SystemExit) as exit_:
        run(bad / fault, tmp_path, monkeypatch)
    out = capsys.readouterr()
    _check(str(exit_.value.code), out.out + out.err, bad / fault, fault, accepted)
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "pub").exists()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("tool", HYDRA_TOOLS)
def test_training_tool_names_the_file_what_it_is_and_the_formats(tool, fault, bad, digits_small, street,
                                                                 tmp_path, capsys, monkeypatch):
    module, key = HYDRA_TOOLS[tool]
    base = ([f"data.root={digits_small}", "data.workers=0", "train.progress=false"] if module == "finetune"
            else test_train_seg.seg_overrides(street))
    with pytest.raises(SystemExit) as exit_:
        _hydra(module, [*base, f"{key}={bad / fault}", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    out = capsys.readouterr()
    accepted = f"classification weights: {WEIGHTS_FORMATS}" if key == "model.backbone" else WEIGHTS_FORMATS
    _check(str(exit_.value.code), out.out + out.err, bad / fault, fault, accepted)


@pytest.mark.slow
def test_the_console_shows_only_the_message(bad, street, tmp_path):
    """What a user sees: the two lines last, no traceback, no Hydra notes after them (a plain and a Hydra tool)."""
    seg = test_train_seg.seg_overrides(street, f"model.weights={bad / 'text.pth'}", f"hydra.run.dir={tmp_path / 'r'}")
    for tool, args in (("eval_cls.py", [str(bad / "text.pth"), "--data-root", str(tmp_path)]), ("train_seg.py", seg)):
        proc = run_tool(tool, args, cwd=tmp_path, check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert lines[-2] == f"error: cannot read weights file {bad / 'text.pth'}: {FAULTS['text.pth']}", proc.stderr
        assert lines[-1].startswith(f"accepted: {WEIGHTS_FORMATS}")
        assert "Traceback" not in proc.stderr and UNSAFE not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------- more faults, one reader
def _write(path: Path, content) -> Path:
    if callable(content):
        content(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _zip_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "x")


def _numpy_object(path: Path) -> None:
    torch.save({"w": torch.ones(2), "epoch": np.float64(3.0)}, path)


def _truncated_safetensors(path: Path) -> None:
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


MORE = {
    "missing.pth": (None, "it does not exist"),
    "folder.pth": (lambda p: p.mkdir(), "it is a folder, not a file"),
    "page.pth": ("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", "it is an HTML page"),
    "pointer.pth": ("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "it is a Git LFS pointer"),
    "archive.pth": (_zip_not_torch, "it is a zip archive that is not a torch checkpoint (it holds notes.txt)"),
    "header.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "a safetensors file with a corrupt "
                                                                                 "header"),
    "cut.safetensors": (_truncated_safetensors, "it is a truncated safetensors file"),
    "optimizer.pth": (lambda p: torch.save({"optimizer": {"state": {}, "param_groups": []}}, p),
                      "it is a torch checkpoint without model weights (keys: optimizer)"),
    "objects.pth": (_numpy_object, "holding Python objects (numpy."),
    "pickle.pkl": (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", "a Python pickle that is not a torch "
                                                                          "checkpoint"),
}


@pytest.mark.parametrize("name", MORE)
def test_reader_says_what_a_file_is(name, tmp_path):
    content, says = MORE[name]
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    with pytest.raises(WeightsFileError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert message.startswith(f"cannot read weights file {path}: ") and says in message.splitlines()[0], message
    assert message.splitlines()[-1] == f"accepted: {WEIGHTS_FORMATS}" and UNSAFE not in message


def test_checkpoint_tools_say_what_a_weights_file_holds(tmp_path):
    """A state dict given where a training checkpoint is needed (distill, publish, resume) is named as such."""
    path = tmp_path / "weights.pth"
    torch.save({"a.weight": torch.ones(2), "a.bias": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as exit_:
        _main("distill")([str(path), "--device", "cpu", "--no-progress", "--output", str(tmp_path / "d")])
    first, last = str(exit_.value.code).splitlines()
    assert first == (f"error: cannot read checkpoint {path}: it is a state dict of 2 tensors (weights alone, without a "
                     f"run's identity and config), not a training checkpoint of this package (it has no identity and "
                     f"model entries)")
    assert last == f"accepted: {CHECKPOINT_FORMATS}"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="does not hold a checkpoint dict: it is a torch file holding a list"):
        load_checkpoint(path)


def test_format_is_told_by_content_not_name(tmp_path):
    """Real weights load whatever their suffix: safetensors named .pth, a torch file named .safetensors."""
    sd = {"w": torch.randn(3, 4)}
    save_file(sd, str(tmp_path / "st.pth"))
    torch.save(sd, tmp_path / "torch.safetensors")
    torch.save(sd, tmp_path / "old.pkl", _use_new_zipfile_serialization=False)
    for name in ("st.pth", "torch.safetensors", "old.pkl"):
        torch.testing.assert_close(read_state_dict(tmp_path / name)["w"], sd["w"])
