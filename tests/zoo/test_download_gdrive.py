"""Google Drive sources through gdown, against a real HTTP server on 127.0.0.1 that answers like Drive.

Drive answers ``drive.google.com/uc?id=...`` with a redirect to ``drive.usercontent.google.com/download``, which
serves large files only after its "can't scan this file for viruses" page (a form with a ``uuid`` token). The
catalog keeps the real Drive URL; requests sessions send the Drive hosts to the local server instead (no other
host is resolved), so gdown parses the page and follows the form exactly as it would against Drive."""
import hashlib
import io
import json
import socket
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import timm
import torch

from mdeq.models.convert import to_official_state_dict  # (importing mdeq registers its timm models)
from zoo.catalog import load_catalog
from zoo.download import PACKAGE_ROOT, DownloadError, cache_dir, fetch, sha256_of

from .disk import Disk
from .server import cached_files

NAME = "mdeq_tiny.digits"
DRIVE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
DRIVE_URL = f"https://drive.google.com/uc?export=download&id={DRIVE_ID}"
HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")

PAGE = ('<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title><meta http-equiv="content-type" '
        'content="text/html; charset=utf-8"/></head><body><div class="uc-main"><div id="uc-text"><p class="uc-warning-'
        'caption">Google Drive can\'t scan this file for viruses.</p><p class="uc-warning-subcaption"><span class="uc-'
        'name-size"><a href="/open?id={id}">{name}</a> ({size})</span> is too large for Google to scan for viruses. '
        'Would you still like to download this file?</p><form id="download-form" action="https://drive.usercontent.'
        'google.com/download" method="get"><input type="submit" id="uc-download-link" class="goog-inline-block jfk-'
        'button jfk-button-action" value="Download anyway"/><input type="hidden" name="id" value="{id}"><input type='
        '"hidden" name="export" value="download"><input type="hidden" name="confirm" value="t"><input type="hidden" '
        'name="uuid" value="{uuid}"></form></div></div><div class="uc-footer"><hr class="uc-footer-divider"></div>'
        '</body></html>')
QUOTA = ('<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body><div class="uc-main">'
         '<div id="uc-text"><p class="uc-error-caption">Sorry, you can\'t view or download this file at this time.'
         '</p><p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try '
         'accessing the file again later.</p></div></div></body></html>')


class DriveServer:
    """Serves ``files`` ({id: (name, bytes)}) the way Google Drive serves large files, honouring ranges."""

    def __init__(self, files):
        self.files = dict(files)
        self.tokens = set()
        self.requests = []
        self.die_after = None  # bytes of a file to send before dropping the connection
        self.ignore_range = False
        self.corrupt = False
        self.quota = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                server.requests.append(dict(path=url.path, query=query, range=self.headers.get("Range")))
                if query.get("id") not in server.files:
                    return self.send_error(404)
                if url.path == "/uc":
                    self.send_response(303)
                    self.send_header("Location", "https://drive.usercontent.google.com/download?id="
                                     f"{query['id']}&export=download")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if url.path != "/download":
                    return self.send_error(404)
                name, data = server.files[query["id"]]
                if server.quota:
                    return self.page(QUOTA)
                if query.get("confirm") != "t" or query.get("uuid") not in server.tokens:
                    token = str(uuid.uuid4())
                    server.tokens.add(token)
                    return self.page(PAGE.format(id=query["id"], name=name, size=f"{len(data) // 1000}K", uuid=token))
                self.file(name, data)

            def page(self, html):
                body = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def file(self, name, data):
                etag = '"' + hashlib.md5(data).hexdigest() + '"'
                if server.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if rng and not server.ignore_range and if_range in (None, etag):
                    start, status = int(rng[len("bytes="):].split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Disposition", f'attachment; filename="{name}"')
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.die_after is not None:
                    self.wfile.write(body[:server.die_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
        self.thread.start()

    def file_requests(self):
        return [r for r in self.requests if r["query"].get("confirm")]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class ToLocal(requests.adapters.HTTPAdapter):
    """A transport that sends requests for Drive's hosts to the local server (path and query unchanged)."""

    def __init__(self, port):
        super().__init__()
        self.port = port

    def send(self, request, **kwargs):
        parts = urllib.parse.urlsplit(request.url)
        request = request.copy()
        request.url = urllib.parse.urlunsplit(("http", f"127.0.0.1:{self.port}", parts.path, parts.query, ""))
        return super().send(request, **dict(kwargs, proxies={}))


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """A Drive-like server holding the shipped digits weights, sessions routed to it, an empty cache, and a
    ``use(entries)`` that overlays catalog entries."""
    entry = load_catalog(overlay="")[NAME]
    data = (PACKAGE_ROOT / entry["sources"][0]["path"]).read_bytes()
    server = DriveServer({DRIVE_ID: ("mdeq_tiny_digits.safetensors", data)})
    real_session, real_getaddrinfo = requests.session, socket.getaddrinfo

    def session():
        s = real_session()
        for host in HOSTS:
            s.mount(f"https://{host}/", ToLocal(server.port))
        return s

    def getaddrinfo(host, *args, **kwargs):  # the test never reaches the real network
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: not resolved in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(requests, "session", session)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("MDEQ_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def use(entries):
        path = tmp_path / "overlay.json"
        path.write_text(json.dumps(entries))
        monkeypatch.setenv("MDEQ_ZOO_CATALOG", str(path))

    use({NAME: dict(entry, sources=[{"type": "url", "url": DRIVE_URL}])})
    yield server, entry, data, use
    server.stop()


def test_the_confirmation_page_is_answered_and_the_weights_verified_and_cached(drive, monkeypatch):
    server, entry, data, _ = drive
    path = fetch(NAME, progress=False)
    assert path == cache_dir() / entry["file"] and sha256_of(path) == entry["sha256"]
    steps = [(r["path"], r["query"].get("confirm"), r["query"].get("uuid")) for r in server.requests]
    assert steps[:2] == [("/uc", None, None), ("/download", None, None)]  # the redirect, then the warning page
    assert steps[2][:2] == ("/download", "t") and steps[2][2] in server.tokens  # the form's token
    assert cached_files() == [entry["file"]]  # no gdown leftovers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch(NAME, progress=False) == path and len(server.requests) == 3


def test_an_official_checkpoint_on_drive_is_converted_on_first_use(drive):
    server, _, _, use = drive
    source = timm.create_model("mdeq_tiny", num_classes=10)
    buf = io.BytesIO()
    torch.save(to_official_state_dict(source.state_dict()), buf)
    server.files[DRIVE_ID] = ("cls_mdeq_TINY.pkl", buf.getvalue())
    official = dict(load_catalog(overlay="")["mdeq_small.in1k_official"], file="mdeq_tiny_drive.safetensors",
                    sources=[{"type": "url", "url": DRIVE_URL}],
                    upstream_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
                    pretrained_cfg=dict(input_size=[3, 32, 32], num_classes=10, crop_pct=1.0))
    use({"mdeq_tiny.drive": official})
    model = timm.create_model("mdeq_tiny.drive", pretrained=True)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert cached_files() == ["mdeq_tiny_drive.safetensors", "mdeq_tiny_drive.safetensors.sha256"]


def test_wrong_bytes_from_drive_are_an_error_and_nothing_is_cached(drive):
    server, _, _, _ = drive
    server.corrupt = True
    with pytest.raises(DownloadError, match=r"URL https://drive\.google\.com/.*sha256 mismatch.*discarded"):
        fetch(NAME, progress=False)
    assert not cached_files() and len(server.file_requests()) == 1  # not retried


def test_an_interrupted_drive_transfer_resumes_on_the_next_call(drive):
    server, entry, data, _ = drive
    server.die_after = len(data) - 50_000  # past gdown's first 512 KiB chunk, which reaches the disk
    with pytest.raises(DownloadError, match=r"URL https://drive\.google\.com/uc\?export=download&id=1AbC"):
        fetch(NAME, progress=False, retries=0)
    partial = [p.stat().st_size for p in cache_dir().iterdir() if p.name.endswith(".part")]
    assert len(partial) == 1 and 0 < partial[0] < len(data)
    assert not (cache_dir() / entry["file"]).exists()
    server.die_after = None
    assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]
    assert server.file_requests()[-1]["range"] == f"bytes={partial[0]}-"  # resumed, not restarted
    assert cached_files() == [entry["file"]]


def test_a_drive_transfer_that_cannot_resume_starts_over(drive):
    server, entry, data, _ = drive
    server.die_after = len(data) - 50_000
    with pytest.raises(DownloadError):
        fetch(NAME, progress=False, retries=0)
    server.die_after, server.ignore_range = None, True  # the server answers a range request with the whole file
    assert sha256_of(fetch(NAME, progress=False, retries=1)) == entry["sha256"]
    ranges = [r["range"] for r in server.file_requests()[-2:]]
    assert ranges[0] is not None and ranges[1] is None  # a resume refused, then a fresh transfer
    assert cached_files() == [entry["file"]]


def test_drive_refusing_the_file_is_reported_once(drive):
    server, _, _, _ = drive
    server.quota = True
    with pytest.raises(DownloadError, match=r"did not hand out the file: .*Too many users have viewed or downloaded"):
        fetch(NAME, progress=False, retries=2)
    assert len([r for r in server.requests if r["path"] == "/uc"]) == 1  # not retried
    assert not cached_files()


def test_without_gdown_the_error_names_the_extra(drive, monkeypatch):
    server, _, _, use = drive
    monkeypatch.setitem(sys.modules, "gdown", None)  # `import gdown` raises ImportError
    with pytest.raises(DownloadError, match=r"URL https://drive\.google\.com/.*: .*pip install 'mdeq-zoo\[gdrive\]'"):
        fetch(NAME, progress=False)
    use({})  # the released catalog: its Drive entries need the extra too, and say where a manual download goes
    manual = r"(?s)mdeq-zoo\[gdrive\].*save it as .*mdeq_small_in1k_official\.safetensors\.upstream"
    with pytest.raises(DownloadError, match=manual):
        timm.create_model("mdeq_small", pretrained=True)
    assert not server.requests and not cached_files()


def test_a_full_disk_during_a_drive_download_leaves_no_partial_file(drive, monkeypatch):
    server, entry, _, _ = drive
    disk = Disk(monkeypatch, cache_dir())
    cache_dir().mkdir()
    disk.room = 600_000  # gdown's first 512 KiB chunk fits, the second does not
    with pytest.raises(DownloadError, match=rf"no space left in the weights cache {cache_dir()} .*MDEQ_ZOO_CACHE"):
        fetch(NAME, progress=False)
    assert not cached_files() and len(server.file_requests()) == 1
    disk.room = None
    assert sha256_of(fetch(NAME, progress=False)) == entry["sha256"]
