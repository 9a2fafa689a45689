"""Released upstream checkpoints: downloaded, converted on first use, checked by a strict load, cached.

The test serves checkpoints in the original format (weight_g/weight_v names, segmentation FullModel
prefix), made from freshly built models, from a real HTTP server on 127.0.0.1."""
import hashlib
import io
import json

import pytest
import timm
import torch

import mdeq
from mdeq.models.convert import to_official_state_dict
from zoo.catalog import load_catalog
from zoo.download import DownloadError, cache_dir

from .server import FileServer, cached_files as _cached_files


def _official_bytes(state_dict, prefix=""):
    buf = io.BytesIO()
    sd = {prefix + k: v for k, v in to_official_state_dict(state_dict).items()}
    if prefix:
        sd["loss.criterion.weight"] = torch.ones(19)
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    server = FileServer({})
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def overlay(entries):
        path = tmp_path / "overlay.json"
        path.write_text(json.dumps(entries))
        monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(path))

    yield server, overlay
    server.stop()


def _entry(name, url, upstream_sha=None, **extra):
    base = dict(load_catalog(overlay="")["mdeq_small.in1k_official"])
    base.update(file=f"{name.replace('.', '_')}.safetensors", sources=[{"type": "url", "url": url}],
                upstream_sha256=upstream_sha, pretrained_cfg=dict(input_size=[3, 32, 32], num_classes=10,
                                                                  crop_pct=1.0), **extra)
    base.pop("stats", None)
    return base


def test_fake_official_classifier_is_converted_verified_cached_and_loads(setup, monkeypatch):
    server, overlay = setup
    source = timm.create_model("mdeq_tiny", num_classes=10)
    data = _official_bytes(source.state_dict())
    server.files["/tiny.pkl"] = data
    overlay({"mdeq_tiny.fake_official": _entry("mdeq_tiny.fake_official", server.url("/tiny.pkl"),
                                               hashlib.sha256(data).hexdigest())})
    model = timm.create_model("mdeq_tiny.fake_official", pretrained=True)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    files = _cached_files()
    assert files == ["mdeq_tiny_fake_official.safetensors", "mdeq_tiny_fake_official.safetensors.sha256"]
    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = timm.create_model("mdeq_tiny.fake_official", pretrained=True)  # from the cache, no server
    assert torch.equal(again.classifier.weight, source.classifier.weight)
    converted = cache_dir() / "mdeq_tiny_fake_official.safetensors"
    converted.write_bytes(converted.read_bytes()[:-1] + b"\x00")  # corrupt the cache: detected, not used
    with pytest.raises(DownloadError, match="skipped, HF_HUB_OFFLINE=1"):
        timm.create_model("mdeq_tiny.fake_official", pretrained=True)


def test_a_web_page_or_another_architecture_is_refused_and_discarded(setup):
    server, overlay = setup
    server.files["/page"] = b"<html>Google Drive can't scan this file for viruses</html>"
    server.files["/large.pkl"] = _official_bytes(timm.create_model("mdeq_cifar_large", num_classes=10).state_dict())
    overlay({"mdeq_tiny.page": _entry("mdeq_tiny.page", server.url("/page")),
             "mdeq_tiny.wrong": _entry("mdeq_tiny.wrong", server.url("/large.pkl"))})
    with pytest.raises(DownloadError, match=r"could not be converted .*save it as .*mdeq_tiny_page.safetensors.upstream"):
        timm.create_model("mdeq_tiny.page", pretrained=True)
    with pytest.raises(DownloadError, match=r"holds mdeq_cifar_large \(cls\), the catalog entry is mdeq_tiny"):
        timm.create_model("mdeq_tiny.wrong", pretrained=True)
    assert not _cached_files()


def test_an_upstream_sha256_mismatch_is_an_error(setup):
    server, overlay = setup
    server.files["/tiny.pkl"] = _official_bytes(timm.create_model("mdeq_tiny", num_classes=10).state_dict())
    overlay({"mdeq_tiny.pinned": _entry("mdeq_tiny.pinned", server.url("/tiny.pkl"), "0" * 64)})
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        timm.create_model("mdeq_tiny.pinned", pretrained=True)
    assert not _cached_files()


def test_fake_official_cityscapes_checkpoint_loads_into_the_segmentation_model(setup):
    server, overlay = setup
    source = mdeq.create_segmentation_model("mdeq_small", num_classes=19)
    server.files["/seg.pkl"] = _official_bytes(source.state_dict(), prefix="model.")
    entry = dict(load_catalog(overlay="")["mdeq_small.cityscapes_official"],
                 sources=[{"type": "url", "url": server.url("/seg.pkl")}])
    overlay({"mdeq_small.cityscapes_official": entry})
    seg = mdeq.create_segmentation_model("mdeq_small", pretrained=True)
    for k, v in source.state_dict().items():
        assert torch.equal(seg.state_dict()[k], v), k
    # the catalog's solver: the original's Broyden with F_THRES 27, i.e. 28 f-evaluations
    assert seg.deq.options["solver"] == "broyden" and seg.deq.options["max_iter"] == 27 + 1
    other = mdeq.create_segmentation_model("mdeq_small", num_classes=5, pretrained="cityscapes_official")
    assert other.last_layer[3].weight.shape[0] == 5  # a new classifier; the rest is the checkpoint
    assert torch.equal(other.last_layer[0].weight, source.last_layer[0].weight)


def test_the_default_tag_is_the_classification_entry(tmp_path, monkeypatch):
    """mdeq_small has Cityscapes and ImageNet entries: pretrained=True means the ImageNet classifier."""
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MDEQ_ZOO_CATALOG", raising=False)
    with pytest.raises(DownloadError, match=r"mdeq_small\.in1k_official .*\n.*drive\.google\.com.*HF_HUB_OFFLINE"):
        timm.create_model("mdeq_small", pretrained=True)
