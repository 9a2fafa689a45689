"""Data-aware training defaults (mdeq/data/auto.py) and the CIFAR pad-and-crop training transform."""
import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.data.auto import MIN_CROP_SIDE, resolve_data_choices
from mdeq.data.classification import build_transform

AUTO = {"overrides": {"input_size": "auto", "crop_pct": "auto"},
        "aug": {"policy": "auto", "scale": None, "ratio": None, "padding": None, "hflip": 0.5}}


def _with(**changes):
    cfg = {"overrides": dict(AUTO["overrides"]), "aug": dict(AUTO["aug"])}
    for key, value in changes.items():
        group, name = key.split("__")
        cfg[group][name] = value
    return cfg


def test_small_images_train_at_their_size_with_the_cifar_crop_and_evaluate_whole():
    c = resolve_data_choices(AUTO, cfg_side=32, image_side=32, divisor=2)
    assert c.overrides["input_size"] == 32 and c.overrides["crop_pct"] == 1.0
    assert c.aug == {"policy": "pad_crop", "padding": 4, "hflip": 0.5}
    assert any("pad_crop" in r for r in c.reasons) and any("input size 32x32" in r for r in c.reasons)
    # 25-px crops on an MDEQ taking multiples of 2: 24; an explicit network (divisor 1) keeps 25
    assert resolve_data_choices(AUTO, 32, 25, divisor=2).overrides["input_size"] == 24
    assert resolve_data_choices(AUTO, 224, 25).overrides["input_size"] == 25
    assert resolve_data_choices(AUTO, 224, 8).overrides["input_size"] == 16  # 8x8 scans: at least 16


def test_large_images_keep_the_model_size_and_imagenet_crops():
    c = resolve_data_choices(AUTO, cfg_side=224, image_side=375, divisor=32)
    assert c.overrides["input_size"] == 224 and c.overrides["crop_pct"] is None  # the model's crop_pct
    assert c.aug["policy"] == "rrc" and c.aug["scale"] == [0.08, 1.0]
    assert c.aug["ratio"] == pytest.approx([3 / 4, 4 / 3])
    # mid-sized images: the smallest crop keeps ImageNet's ~63 px a side, not 8% of the area
    mid = resolve_data_choices(AUTO, cfg_side=224, image_side=96)
    assert mid.overrides["input_size"] == 96 and mid.aug["policy"] == "rrc"
    assert mid.aug["scale"][0] == pytest.approx((MIN_CROP_SIDE / 96) ** 2, abs=1e-3)
    # a ViT takes only its own size
    assert resolve_data_choices(AUTO, 224, 32, fixed_input_size=True).overrides["input_size"] == 224
    # unknown image size: the model's cfg
    assert resolve_data_choices(AUTO, 32, None).overrides["input_size"] == 32


def test_every_choice_can_be_set_instead():
    c = resolve_data_choices(_with(overrides__input_size=48, aug__policy="rrc"), cfg_side=32, image_side=32)
    assert c.overrides["input_size"] == 48 and c.aug["policy"] == "rrc" and c.overrides["crop_pct"] is None
    c = resolve_data_choices(_with(aug__scale=[0.5, 1.0]), cfg_side=32, image_side=32)  # scale: a random-resized crop
    assert c.aug["policy"] == "rrc" and c.aug["scale"] == [0.5, 1.0]
    c = resolve_data_choices(_with(aug__padding=2, overrides__crop_pct=0.9), cfg_side=224, image_side=300)
    assert c.aug == {"policy": "pad_crop", "padding": 2, "hflip": 0.5} and c.overrides["crop_pct"] == 0.9
    c = resolve_data_choices(_with(overrides__input_size=None), cfg_side=224, image_side=32)  # null: the model's cfg
    assert c.overrides["input_size"] is None and c.aug["policy"] == "rrc"  # 224 input: random-resized crops
    assert not any("input size" in r for r in c.reasons)


def test_crops_down_to_a_few_pixels_are_refused():
    with pytest.raises(ValueError, match=r"crops images of about 32 px .* down to 2\.\d px.*pad_crop"):
        resolve_data_choices(_with(aug__scale=[0.01, 1.0]), cfg_side=32, image_side=32)
    with pytest.raises(ValueError, match="data.aug.padding=20 on a 32-px input"):
        resolve_data_choices(_with(aug__padding=20), cfg_side=32, image_side=32)
    with pytest.raises(ValueError, match="data.aug.policy must be auto or one of"):
        resolve_data_choices(_with(aug__policy="cutout"), cfg_side=32, image_side=32)
    # ImageNet's scale on ImageNet-sized images is fine
    resolve_data_choices(_with(aug__scale=[0.08, 1.0]), cfg_side=224, image_side=375)


def test_pad_crop_is_a_zero_padded_shift_of_the_resized_image():
    cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=1.0)
    t = build_transform(cfg, True, dict(policy="pad_crop", padding=2, hflip=0.0, color_jitter=0.0))
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([pixels] * 3, axis=-1))
    src = torch.from_numpy(pixels).float() / 255.0
    padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = t(img)
        assert out.shape == (3, 16, 16)
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.allclose(out[0], padded[dy:dy + 16, dx:dx + 16])]
        assert len(hits) == 1, "each training crop is one shift of the zero-padded image"
        seen.add(hits[0])
    assert len(seen) > 5  # the shift is random
    flip = build_transform(cfg, True, dict(policy="pad_crop", padding=0, hflip=1.0, color_jitter=0.0))
    assert torch.allclose(flip(img)[0], src.flip(-1))
    with pytest.raises(ValueError, match="data.aug.scale is an option of another crop policy"):
        build_transform(cfg, True, dict(policy="pad_crop", scale=[0.5, 1.0]))
