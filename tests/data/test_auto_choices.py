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


MILD = {"policy": "rrc", "scale": [0.85, 1.0], "ratio": [0.9, 1.1], "hflip": 0.5}


def test_small_images_train_at_their_size_with_a_mild_crop_and_evaluate_whole():
    c = resolve_data_choices(AUTO, cfg_side=32, image_side=32, divisor=2)
    assert c.overrides["input_size"] == 32 and c.overrides["crop_pct"] == 1.0
    assert c.aug == MILD  # a random-resized crop keeping 85-100% of the area, not ImageNet's 8%
    assert any("keeping 85%-100%" in r for r in c.reasons) and any("input size 32x32" in r for r in c.reasons)
    # 25-px crops on an MDEQ taking multiples of 2: 24; an explicit network (divisor 1) keeps 25
    assert resolve_data_choices(AUTO, 32, 25, divisor=2).overrides["input_size"] == 24
    assert resolve_data_choices(AUTO, 224, 25).overrides["input_size"] == 25
    assert resolve_data_choices(AUTO, 224, 8).overrides["input_size"] == 16  # 8x8 scans: at least 16


def test_an_mdeq_trains_small_images_with_its_finest_branch_at_most_16():
    # mdeq_tiny (no stem stride): 32-px digits at 16x16, where 8 f-evaluations converge; 25-px crops too
    c = resolve_data_choices(AUTO, cfg_side=32, image_side=32, divisor=2, branch_stride=1)
    assert c.overrides["input_size"] == 16 and c.aug == MILD
    assert any("finest equilibrium branch at most 16x16" in r for r in c.reasons)
    assert resolve_data_choices(AUTO, 32, 25, divisor=2, branch_stride=1).overrides["input_size"] == 16
    # never below half the images' side, never above the cfg; a stem stride of 4 (mdeq_small) leaves 32-px images
    assert resolve_data_choices(AUTO, 64, 64, divisor=2, branch_stride=1).overrides["input_size"] == 32
    assert resolve_data_choices(AUTO, 224, 32, divisor=32, branch_stride=4).overrides["input_size"] == 32
    # large images: the cfg size whatever the branches
    assert resolve_data_choices(AUTO, 224, 375, divisor=32, branch_stride=4).overrides["input_size"] == 224


def test_large_images_keep_the_model_size_and_imagenet_crops():
    c = resolve_data_choices(AUTO, cfg_side=224, image_side=375, divisor=32)
    assert c.overrides["input_size"] == 224 and c.overrides["crop_pct"] is None  # the model's crop_pct
    assert c.aug["policy"] == "rrc" and c.aug["scale"] == [0.08, 1.0]
    assert c.aug["ratio"] == pytest.approx([3 / 4, 4 / 3], abs=1e-4)
    # mid-sized images: the smallest crop keeps ImageNet's ~63 px a side, not 8% of the area
    mid = resolve_data_choices(AUTO, cfg_side=224, image_side=96)
    assert mid.overrides["input_size"] == 96 and mid.aug["policy"] == "rrc"
    assert mid.aug["scale"][0] == pytest.approx((MIN_CROP_SIDE / 96) ** 2, abs=1e-3)
    # a ViT takes only its own size
    assert resolve_data_choices(AUTO, 224, 32, fixed_input_size=True).overrides["input_size"] == 224
    # unknown image size: the model's cfg
    assert resolve_data_choices(AUTO, 32, None).overrides["input_size"] == 32


def test_every_choice_can_be_set_instead():
    c = resolve_data_choices(_with(overrides__input_size=96, aug__policy="pad_crop"), cfg_side=32, image_side=32)
    assert c.overrides["input_size"] == 96 and c.aug == {"policy": "pad_crop", "padding": 12, "hflip": 0.5}
    assert c.overrides["crop_pct"] is None  # a 96-px input: the model's crop_pct
    c = resolve_data_choices(_with(aug__scale=[0.5, 1.0]), cfg_side=32, image_side=32)  # scale: a random-resized crop
    assert c.aug["policy"] == "rrc" and c.aug["scale"] == [0.5, 1.0]
    c = resolve_data_choices(_with(aug__padding=2, overrides__crop_pct=0.9), cfg_side=224, image_side=300)
    assert c.aug == {"policy": "pad_crop", "padding": 2, "hflip": 0.5} and c.overrides["crop_pct"] == 0.9
    c = resolve_data_choices(_with(overrides__input_size=None), cfg_side=224, image_side=32)  # null: the model's cfg
    assert c.overrides["input_size"] is None and c.aug["policy"] == "rrc"  # 224 input: random-resized crops
    assert not any("input size" in r for r in c.reasons)


def test_crops_down_to_a_few_pixels_are_refused():
    with pytest.raises(ValueError, match=r"crops images of about 32 px .* down to 3\.0 px.*data.aug.scale=null"):
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
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.allclose(out[0], padded[dy:dy + 16, dx:dx + 16])]
        assert len(hits) == 1, "each training crop is one shift of the zero-padded image"
        seen.add(hits[0])
    assert len(seen) > 5  # the shift is random
    flip = build_transform(cfg, True, dict(policy="pad_crop", padding=0, hflip=1.0, color_jitter=0.0))
    assert torch.allclose(flip(img)[0], src.flip(-1))
    with pytest.raises(ValueError, match="data.aug.scale is an option of another crop policy"):
        build_transform(cfg, True, dict(policy="pad_crop", scale=[0.5, 1.0]))


def _two_class_set(tmp_path, draw, n=40):
    """An ImageFolder train split of two classes of 24x24 grayscale images drawn by ``draw(class, rng)``."""
    from mdeq.data.classification import ImageFolderDataset

    rng = np.random.default_rng(0)
    for c in (0, 1):
        folder = tmp_path / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            img = np.clip(draw(c, rng) + rng.normal(0, 20, (24, 24)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return ImageFolderDataset(tmp_path / "train")


def test_the_flip_check_tells_mirror_classes_from_flip_invariant_ones(tmp_path):
    from mdeq.data.flip_check import flip_retention

    def bars(c, rng):  # a vertical or a horizontal bar: a flip keeps the class
        img = np.full((24, 24), 40.0)
        if c == 0:
            img[:, 10:14] = 220
        else:
            img[10:14, :] = 220
        return img

    def halves(c, rng):  # the bright half on the left or on the right: a flip swaps the classes
        img = np.full((24, 24), 40.0)
        img[:, (slice(0, 12) if c == 0 else slice(12, 24))] = 220
        return img

    assert flip_retention(_two_class_set(tmp_path / "bars", bars)) == pytest.approx(1.0)
    assert flip_retention(_two_class_set(tmp_path / "halves", halves)) == 0.0
    noise = _two_class_set(tmp_path / "noise", lambda c, rng: np.full((24, 24), 128.0))
    assert flip_retention(noise) is None  # classes a nearest-class-mean classifier cannot tell apart: no verdict

    from mdeq.data.digits import prepare_digits
    from mdeq.data.classification import ImageFolderDataset

    digits = ImageFolderDataset(prepare_digits(tmp_path / "digits") / "train")
    assert flip_retention(digits) < 0.5  # mirrored digits look like other digits


def test_hflip_auto_follows_the_flip_check():
    cfg = _with(aug__hflip="auto")
    keep = resolve_data_choices(cfg, 32, 32, flip_retention=0.95)
    assert keep.aug["hflip"] == 0.5 and any("keep their classes" in r for r in keep.reasons)
    drop = resolve_data_choices(cfg, 32, 32, flip_retention=0.3)
    assert drop.aug["hflip"] == 0.0 and any("look like other classes" in r and "30%" in r for r in drop.reasons)
    unknown = resolve_data_choices(cfg, 32, 32, flip_retention=None)
    assert unknown.aug["hflip"] == 0.5 and any("could not tell" in r for r in unknown.reasons)
    assert resolve_data_choices(_with(aug__hflip=0.25), 32, 32, flip_retention=0.0).aug["hflip"] == 0.25  # set: kept


def test_batch_size_auto_keeps_twenty_steps_an_epoch_on_small_data():
    from mdeq.data.auto import choose_batch_size

    assert choose_batch_size("auto", 4000) == (32, "batch size 32 per process")
    batch, why = choose_batch_size("auto", 160)  # 160 images: 8 per batch, 20 steps an epoch (5 at 32)
    assert batch == 8 and "20 optimizer steps an epoch (at 32: 5)" in why
    assert choose_batch_size("auto", 400)[0] == 16 and choose_batch_size("auto", 50)[0] == 8
    assert choose_batch_size("auto", 1280, world_size=4)[0] == 16  # per process: 320 images
    assert choose_batch_size(12, 160) == (12, None)
    with pytest.raises(ValueError, match="data.batch_size must be a number of images >= 1 or auto"):
        choose_batch_size(0, 160)


def test_a_run_from_starting_weights_trains_at_their_size():
    c = resolve_data_choices(AUTO, cfg_side=224, image_side=32, divisor=32, branch_stride=4, from_weights=True)
    assert c.overrides["input_size"] == 224 and any("starting weights were trained at 224x224" in r for r in c.reasons)
    c = resolve_data_choices(AUTO, cfg_side=16, image_side=32, divisor=2, branch_stride=1, from_weights=True)
    assert c.overrides["input_size"] == 16  # mdeq_tiny.digits (16x16) fine-tuned on 32-px images
