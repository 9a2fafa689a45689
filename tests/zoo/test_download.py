"""Verified downloads from a real HTTP server on 127.0.0.1, through timm.create_model(..., pretrained=True)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import mdeq  # noqa: F401
from zoo.catalog import load_catalog
from zoo.download import DownloadError, cache_dir, fetch, sha256_of

from .server import FileServer, cached_files as _cached_files

NAME = "mdeq_tiny.digits"


@pytest.fixture
def shipped():
    entry = load_catalog(overlay="")[NAME]
    from zoo.download import PACKAGE_ROOT

    data = (PACKAGE_ROOT / entry["sources"][0]["path"]).read_bytes()
    return entry, data


@pytest.fixture
def served(shipped, tmp_path, monkeypatch):
    """The shipped weights served over HTTP, a catalog overlay that only lists that URL, an empty cache."""
    entry, data = shipped
    server = FileServer({"/w/mdeq_tiny_digits.safetensors": data})
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({NAME: dict(entry, sources=[
        {"type": "url", "url": server.url("/w/mdeq_tiny_digits.safetensors")}])}))
    monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(overlay))
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield server, entry, data
    server.stop()


def _weights_equal(model, path):
    ref = load_file(str(path))
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_create_model_downloads_verifies_caches_and_then_works_offline(served, tmp_path, monkeypatch):
    server, entry, data = served
    model = timm.create_model(NAME, pretrained=True)
    cached = cache_dir() / entry["file"]
    assert cached.is_file() and sha256_of(cached) == entry["sha256"]
    assert _weights_equal(model, cached) and len(server.requests) == 1
    assert model.deq.options["solver"] == entry["solver"]["solver"]  # the solver its metrics were measured with
    assert model.pretrained_cfg["input_size"] == tuple(entry["pretrained_cfg"]["input_size"])
    server.stop()  # the second load needs no server
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = timm.create_model(NAME, pretrained=True, num_classes=4)
    assert again.classifier.weight.shape == (4, 200)  # timm dropped the head
    assert torch.equal(again.downsample[0].weight, model.downsample[0].weight)
    gray = timm.create_model(NAME, pretrained=True, in_chans=1)  # timm folds the RGB filters of the stem
    assert torch.allclose(gray.downsample[0].weight, model.downsample[0].weight.sum(1, keepdim=True))
    overlaid = timm.create_model("mdeq_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(cached)))
    assert _weights_equal(overlaid, cached)


def test_a_corrupt_byte_is_an_error_and_nothing_is_cached(served):
    server, entry, _ = served
    server.corrupt = True
    with pytest.raises(DownloadError, match=r"sha256 mismatch.*discarded"):
        fetch(NAME, progress=False)
    assert not _cached_files()  # neither the file nor a .part
    assert len(server.requests) == 1  # a source serving wrong bytes is not retried


def test_a_transfer_cut_off_mid_way_resumes_on_the_next_call(served):
    server, entry, data = served
    server.die_after = len(data) // 3
    with pytest.raises(DownloadError, match="URL http://127.0.0.1"):
        fetch(NAME, progress=False, retries=0)
    part = cache_dir() / (entry["file"] + ".part")
    assert part.is_file() and 0 < part.stat().st_size < len(data)
    assert not (cache_dir() / entry["file"]).exists()
    server.die_after = None
    path = fetch(NAME, progress=False)
    assert sha256_of(path) == entry["sha256"] and not part.exists()
    assert server.requests[-1]["range"] == f"bytes={len(data) // 3}-"  # resumed, not restarted


def test_the_server_killed_mid_transfer_then_back(served):
    server, entry, data = served
    server.kill_after = len(data) // 2
    with pytest.raises(DownloadError, match=r"URL http://127.0.0.1:\d+/w/mdeq_tiny_digits.safetensors: URLError"):
        fetch(NAME, progress=False, retries=2)  # the retries find the server gone
    assert not (cache_dir() / entry["file"]).exists()
    back = FileServer(server.files, port=server.port)
    try:
        path = fetch(NAME, progress=False)
        assert sha256_of(path) == entry["sha256"]
        assert back.requests[0]["range"] == f"bytes={len(data) // 2}-"
    finally:
        back.stop()


def test_errors_name_every_source_tried(served, tmp_path, monkeypatch):
    server, entry, _ = served
    overlay = tmp_path / "two.json"
    overlay.write_text(json.dumps({NAME: dict(entry, sources=[
        {"type": "package", "path": "weights/missing.safetensors"},
        {"type": "url", "url": server.url("/nope")}])}))
    monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(overlay))
    with pytest.raises(DownloadError) as err:
        fetch(NAME, progress=False, retries=1)
    msg = str(err.value)
    assert "package file weights/missing.safetensors: FileNotFoundError" in msg
    assert "/nope: HTTPError: HTTP Error 404" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="skipped, HF_HUB_OFFLINE=1"):
        fetch(NAME, progress=False)


def test_a_cached_file_that_no_longer_matches_is_replaced(served):
    server, entry, data = served
    path = fetch(NAME, progress=False)
    path.write_bytes(b"tampered")
    assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]
    assert len(server.requests) == 2


def test_packaged_weights_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MDEQ_ZOO_CATALOG", raising=False)
    catalog = load_catalog(overlay="")
    assert timm.list_pretrained("mdeq*") == sorted(n for n, e in catalog.items()
                                                   if e.get("task", "classification") == "classification")
    assert "mdeq_tiny.untrained" not in timm.list_models("mdeq*", pretrained=True)  # no weights, not listed
    model = timm.create_model("mdeq_tiny.digits", pretrained=True)  # a 16x16 toy weight: by its tag, not default
    assert _weights_equal(model, tmp_path / "mdeq_tiny_digits.safetensors")
