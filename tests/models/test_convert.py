import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from mdeq.models import (StateDictMismatch, convert_official_state_dict, create_segmentation_model, infer_preset,
                         is_official_state_dict, load_converted, to_official_state_dict)

ROOT = Path(__file__).resolve().parents[2]
KEYS = Path(__file__).resolve().parent / "official_keys"
FILES = {"cifar_tiny": ("mdeq_tiny", "cls"), "cifar_large": ("mdeq_cifar_large", "cls"),
         "imagenet_small": ("mdeq_small", "cls"), "imagenet_large": ("mdeq_large", "cls"),
         "imagenet_xl": ("mdeq_xl", "cls"), "cityscapes_small": ("mdeq_small", "seg"),
         "cityscapes_large": ("mdeq_large", "seg"), "cityscapes_xl": ("mdeq_xl", "seg")}


def _random_official(stem):
    spec = json.loads((KEYS / f"keys_{stem}.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in spec["keys"]:
        sd[k] = torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    return sd, spec


def _model(name, task, num_classes):
    if task == "seg":
        return create_segmentation_model(name, num_classes=num_classes)
    return timm.create_model(name, num_classes=num_classes)


@pytest.mark.parametrize("stem", sorted(FILES))
def test_every_released_architecture_converts_and_loads_strictly(stem):
    sd, spec = _random_official(stem)
    name, task = FILES[stem]
    assert is_official_state_dict(sd)
    assert infer_preset(sd) == (name, task, spec["config"]["num_classes"])
    model = _model(name, task, spec["config"]["num_classes"])
    load_converted(model, sd)
    back = to_official_state_dict(model.state_dict())
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_v1_duplicates_segmentation_prefix_and_module_prefix_are_handled():
    sd, _ = _random_official("cifar_tiny")
    v1 = dict(sd)
    for k, v in sd.items():
        if k.startswith("fullstage."):
            v1["deq.func." + k[len("fullstage."):]] = v
            v1["fullstage_copy." + k[len("fullstage."):].replace("weight_g", "weight")] = v
    assert convert_official_state_dict(v1).keys() == convert_official_state_dict(sd).keys()
    ddp = {"module." + k: v for k, v in sd.items()}
    assert convert_official_state_dict(ddp).keys() == convert_official_state_dict(sd).keys()
    seg, _ = _random_official("cityscapes_small")
    full = {"model." + k: v for k, v in seg.items()}
    full["loss.criterion.weight"] = torch.ones(19)
    model = create_segmentation_model("mdeq_small")
    load_converted(model, {"state_dict": full})
    torch.testing.assert_close(model.last_layer[3].weight, seg["last_layer.3.weight"])


def test_mismatch_lists_the_missing_unexpected_and_misshaped_keys():
    sd, _ = _random_official("imagenet_small")
    sd.pop("stage0.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["classifier.bias"] = torch.zeros(3)
    with pytest.raises(StateDictMismatch) as err:
        load_converted(timm.create_model("mdeq_small"), sd)
    msg = str(err.value)
    assert "missing [stage0.0.weight]" in msg and "unexpected [extra.weight]" in msg
    assert "classifier.bias (3,) vs (1000,)" in msg
    with pytest.raises(StateDictMismatch, match="no preset matches"):
        infer_preset(sd)


def test_timm_loads_an_official_checkpoint_through_the_pretrained_machinery(tmp_path):
    sd, _ = _random_official("cifar_tiny")
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    model = timm.create_model("mdeq_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.classifier.weight, sd["classifier.weight"])


def _tool():
    spec = importlib.util.spec_from_file_location("convert_official", ROOT / "tools" / "convert_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_tool_writes_safetensors_that_load_back(tmp_path, capsys):
    sd, _ = _random_official("cityscapes_small")
    src = tmp_path / "MDEQ_Small_Seg.pkl"
    torch.save({"model." + k: v for k, v in sd.items()}, src)
    out = tmp_path / "out" / "mdeq_small_seg.safetensors"
    assert _tool().main([str(src), str(out)]) == 0
    assert "mdeq_small (seg, 19 classes" in capsys.readouterr().out
    model = create_segmentation_model("mdeq_small")
    model.load_state_dict(load_file(out), strict=True)
    torch.testing.assert_close(model.downsample[0].weight, sd["downsample.0.weight"])


def test_convert_tool_fails_clearly_and_writes_nothing(tmp_path, capsys):
    sd, _ = _random_official("imagenet_small")
    src = tmp_path / "ckpt.pth"
    torch.save(sd, src)
    out = tmp_path / "x.safetensors"
    assert _tool().main([str(src), str(out), "--model", "mdeq_xl"]) == 1
    assert "with other shapes" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
