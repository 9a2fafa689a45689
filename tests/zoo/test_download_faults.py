"""The weights cache failing: read-only (shared clusters mount model caches read-only), a file instead of a
folder, a full disk, locks held or owned by someone else. A verified file is used without writing anything;
only a download needs a writable cache, and its error names the folder and MDEQ_ZOO_CACHE."""
import errno
import fcntl
import importlib
import json
import logging
import shutil
import threading

import pytest
import timm
from safetensors import SafetensorError

from zoo import download
from zoo.catalog import load_catalog
from zoo.download import PACKAGE_ROOT, DownloadError, fetch, sha256_of

from .disk import Disk
from .server import FileServer

importlib.import_module("mdeq")  # registers the mdeq_* models with timm
NAME = "mdeq_tiny.digits"
READ_ONLY = [pytest.param(errno.EROFS, id="read-only-mount"), pytest.param(errno.EACCES, id="no-permission")]


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """An empty cache folder with a ``Disk`` over it, the shipped weights served over HTTP, and ``use(source)`` to
    make the entry's only source 'url' or 'package'."""
    entry = load_catalog(overlay="")[NAME]
    package = PACKAGE_ROOT / entry["sources"][0]["path"]
    server = FileServer({"/w.safetensors": package.read_bytes()})
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def use(source, **extra):
        src = {"type": "url", "url": server.url("/w.safetensors")} if source == "url" else entry["sources"][0]
        path = tmp_path / "overlay.json"
        path.write_text(json.dumps({NAME: dict(entry, sources=[src], **extra)}))
        monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(path))

    use("url")
    yield Disk(monkeypatch, cache), cache, server, entry, package, use
    server.stop()


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("code", READ_ONLY)
def test_a_verified_cached_file_in_a_read_only_cache_is_used_without_writing(zoo, code):
    disk, cache, server, entry, package, _ = zoo
    shutil.copyfile(package, cache / entry["file"])
    (cache / (entry["file"] + ".lock")).touch()  # left by whoever filled the cache
    disk.readonly = code
    model = timm.create_model(NAME, pretrained=True)
    assert model.pretrained_cfg["file"] == str(cache / entry["file"])
    assert _listing(cache) == [entry["file"], entry["file"] + ".lock"] and not server.requests


@pytest.mark.parametrize("code", READ_ONLY)
def test_packaged_weights_are_used_in_place_when_the_cache_is_read_only(zoo, code):
    disk, cache, _, _, package, use = zoo
    use("package")
    disk.readonly = code
    model = timm.create_model(NAME, pretrained=True)
    assert model.pretrained_cfg["file"] == str(package)
    assert _listing(cache) == []


@pytest.mark.parametrize("code", READ_ONLY)
def test_a_download_into_a_read_only_cache_names_the_folder_and_the_variable(zoo, code):
    disk, cache, server, _, _, _ = zoo
    disk.readonly = code
    expected = (rf"could not get {NAME}: it has to be downloaded, but the weights cache {cache} is not writable "
                rf"\(\w+: \[Errno {code}\].*\); set MDEQ_ZOO_CACHE to a writable folder$")
    with pytest.raises(DownloadError, match=expected):
        timm.create_model(NAME, pretrained=True)
    assert _listing(cache) == [] and not server.requests


def test_converted_official_weights_load_from_a_read_only_cache(zoo, monkeypatch):
    disk, cache, server, _, _, _ = zoo
    official = dict(load_catalog(overlay="")["mdeq_small.in1k_official"], file="up.safetensors",
                    sources=[{"type": "url", "url": server.url("/w.safetensors")}])
    monkeypatch.setattr(download, "load_catalog", lambda: {"mdeq_small.up": official})
    first = fetch("mdeq_small.up", progress=False, convert=shutil.copyfile)
    before = _listing(cache)
    server.stop()
    disk.readonly = errno.EROFS
    assert fetch("mdeq_small.up", progress=False, convert=shutil.copyfile) == first
    assert _listing(cache) == before


def test_a_cache_path_that_is_a_file(zoo, tmp_path, monkeypatch):
    _, _, server, _, package, use = zoo
    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("not a folder")
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(not_a_folder))
    with pytest.raises(DownloadError, match=rf"the weights cache {not_a_folder} is a file, not a folder; "
                                            "set MDEQ_ZOO_CACHE to a writable folder"):
        fetch(NAME, progress=False)
    assert not server.requests
    use("package")
    assert timm.create_model(NAME, pretrained=True).pretrained_cfg["file"] == str(package)


def test_a_full_disk_during_a_download_leaves_no_partial_file_and_names_the_folder(zoo):
    disk, cache, server, entry, _, _ = zoo
    disk.room = 100_000
    with pytest.raises(DownloadError, match=rf"no space left in the weights cache {cache} \(.* MB free, the file is "
                                            r"0\.6 MB\); the partial file was removed\. .*set MDEQ_ZOO_CACHE"):
        fetch(NAME, progress=False)
    assert [n for n in _listing(cache) if not n.endswith(".lock")] == []
    assert len(server.requests) == 1  # a full disk is not retried
    disk.room = None  # space freed
    assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]


def test_a_full_disk_while_copying_packaged_weights_uses_them_in_place(zoo):
    disk, cache, _, _, package, use = zoo
    use("package")
    disk.room = 1000
    assert timm.create_model(NAME, pretrained=True).pretrained_cfg["file"] == str(package)
    assert [n for n in _listing(cache) if not n.endswith(".lock")] == []


def _fill_up(raw, out):
    with open(out, "wb") as f:
        f.write(b"x" * 200_000)


def _safetensors_full(raw, out):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("convert", [_fill_up, _safetensors_full], ids=["OSError", "SafetensorError"])
def test_a_full_disk_while_converting_keeps_the_downloaded_original(zoo, monkeypatch, convert):
    disk, cache, server, _, _, _ = zoo
    official = dict(load_catalog(overlay="")["mdeq_small.in1k_official"], file="up.safetensors",
                    sources=[{"type": "url", "url": server.url("/w.safetensors")}])
    monkeypatch.setattr(download, "load_catalog", lambda: {"mdeq_small.up": official})
    disk.room = 700_000  # the original fits, its conversion does not
    with pytest.raises(DownloadError, match=rf"mdeq_small.up: no space left in the weights cache {cache} .*; the "
                                            r"downloaded original stays as .*up\.safetensors\.upstream for the next"):
        fetch("mdeq_small.up", progress=False, convert=convert)
    assert [n for n in _listing(cache) if not n.endswith(".lock")] == ["up.safetensors.upstream"]
    disk.room = None
    path = fetch("mdeq_small.up", progress=False, convert=shutil.copyfile)
    assert path.read_bytes() == server.files["/w.safetensors"] and len(server.requests) == 1  # not fetched again


def test_a_lock_file_owned_by_another_user_does_not_stop_a_download(zoo):
    disk, cache, _, entry, _, _ = zoo
    lock = cache / (entry["file"] + ".lock")
    lock.touch()
    disk.foreign.add(str(lock))
    assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]


def _hold(lock):
    f = open(lock, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def test_a_lock_held_by_a_hung_process_does_not_delay_a_cached_file(zoo):
    _, cache, _, entry, package, _ = zoo
    shutil.copyfile(package, cache / entry["file"])
    held = _hold(cache / (entry["file"] + ".lock"))
    got = []
    worker = threading.Thread(target=lambda: got.append(fetch(NAME, progress=False)), daemon=True)
    try:
        worker.start()
        worker.join(10)
        assert got == [cache / entry["file"]]
    finally:
        held.close()
        worker.join()


def test_a_held_lock_is_waited_for_and_reported(zoo, monkeypatch, caplog):
    _, cache, _, entry, _, _ = zoo
    lock = cache / (entry["file"] + ".lock")
    lock.write_text("pid 4242 on node17\n")
    held = _hold(lock)
    monkeypatch.setattr(download, "_LOCK_NOTICE_S", 0.1)
    threading.Timer(1.0, held.close).start()
    with caplog.at_level(logging.WARNING, logger="zoo.download"):
        assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]
    assert f"waiting for pid 4242 on node17 to finish fetching {NAME} (lock file {lock})" in caplog.text


def test_a_file_system_without_locks_still_downloads(zoo, monkeypatch, caplog):
    _, cache, _, entry, _, _ = zoo

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    with caplog.at_level(logging.WARNING, logger="zoo.download"):
        assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]
    assert f"the file system of {cache} has no locks" in caplog.text
