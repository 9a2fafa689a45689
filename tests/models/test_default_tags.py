"""An architecture's default cfg is its native one unless a weight of general use at that size exists; other
weights (the 16x16 digits) are reached by their tag only."""
import pytest
import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

import mdeq  # noqa: F401


@pytest.mark.parametrize("arch,tag,size", [
    ("mdeq_tiny", "untrained", 32), ("mdeq_cifar_large", "untrained", 32),
    ("mdeq_small", "in1k_official", 224), ("mdeq_large", "untrained", 224), ("mdeq_xl", "in1k_official", 224),
])
def test_default_tag_is_native(arch, tag, size):
    cfg = get_pretrained_cfg(arch)
    assert cfg.tag == tag and cfg.input_size == (3, size, size)
    assert resolve_data_config({}, model=timm.create_model(arch, device="meta"))["input_size"] == (3, size, size)


def test_digits_weights_by_their_tag():
    for tag in ("digits", "digits_fast"):
        model = timm.create_model(f"mdeq_tiny.{tag}", pretrained=True)
        assert resolve_data_config({}, model=model)["input_size"] == (3, 16, 16)
    assert {"mdeq_tiny.digits", "mdeq_tiny.digits_fast"} <= set(timm.list_pretrained("mdeq_tiny*"))


def test_pretrained_without_tag_names_the_published_tags():
    with pytest.raises(RuntimeError, match=r"mdeq_tiny has no default pretrained weights: none published at its "
                                           r"native input size 32x32 .* mdeq_tiny.digits \(16x16\)"):
        timm.create_model("mdeq_tiny", pretrained=True)
