"""Verified, cached, resumable downloads of catalog weights.

``fetch(name)`` returns the path of the entry's file in the cache after checking its sha256, trying the
entry's sources in order (a file shipped inside the package, a Hugging Face Hub repo, an HTTPS URL).
A download goes to ``<file>.part`` and is renamed to ``<file>`` only after its sha256 matched, so an
interrupted or corrupt transfer never leaves a usable-looking file; an interrupted ``.part`` is resumed
with an HTTP range request on the next call (or restarted when the server cannot resume). A mismatch is
an error, never a warning. With ``HF_HUB_OFFLINE=1`` only the cache and packaged files are used.

Cache: ``$MDEQ_ZOO_CACHE``, else ``$TORCH_HOME/hub/mdeq_zoo`` (``TORCH_HOME`` defaults to
``~/.cache/torch``); Hub downloads also use huggingface_hub's own cache (``HF_HOME``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from .catalog import load_catalog

__all__ = ["DownloadError", "cache_dir", "fetch", "sha256_of", "offline"]

_CHUNK = 1 << 20
PACKAGE_ROOT = Path(__file__).resolve().parent


class DownloadError(RuntimeError):
    """No source produced a verified file; the message lists every source tried and why it failed."""


def cache_dir() -> Path:
    if os.environ.get("MDEQ_ZOO_CACHE"):
        return Path(os.environ["MDEQ_ZOO_CACHE"])
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(torch_home) / "hub" / "mdeq_zoo"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def sha256_of(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def fetch(name: str, catalog: Optional[Mapping[str, Mapping]] = None, progress: bool = True,
          retries: int = 2, timeout: float = 30.0, convert: Optional[Callable[[Path, Path], None]] = None) -> Path:
    """Path of entry ``name``'s verified file (downloaded into the cache if needed).

    For an ``official`` entry, ``convert(upstream_file, out_file)`` turns the downloaded original checkpoint
    into safetensors (and must check that it loads strictly); the result is cached with its sha256 pinned
    next to it (``<file>.sha256``), so later loads are verified against the first conversion.
    """
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise KeyError(f"{name!r} is not in the weights catalog; known: {sorted(catalog)}")
    entry = catalog[name]
    target = cache_dir() / entry["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):  # DDP ranks / parallel jobs share one download
        if entry["format"] == "official":
            return _fetch_official(name, entry, target, convert, progress, retries, timeout)
        sha = entry["sha256"]
        if _verified(target, sha):
            return target
        if target.exists():  # a cached file that no longer matches (edited or corrupted): never use it
            target.unlink()
        _download(name, entry, target, sha, progress, retries, timeout)
        return target


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` while the block runs (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_official(name: str, entry: Mapping, target: Path, convert, progress: bool, retries: int,
                    timeout: float) -> Path:
    pin = target.with_name(target.name + ".sha256")
    want = entry.get("sha256")
    if target.is_file() and pin.is_file():
        got = sha256_of(target)
        if got == pin.read_text().strip() and (want is None or got == want):
            return target
    for stale in (target, pin):
        if stale.exists():
            stale.unlink()
    if convert is None:
        raise DownloadError(f"{name} is an upstream checkpoint that needs conversion; load it through mdeq "
                            f"(timm.create_model('{name}', pretrained=True) after `import mdeq`)")
    raw = target.with_name(target.name + ".upstream")  # a manually downloaded original may be put here
    if not raw.is_file():
        try:
            _download(name, entry, raw, entry.get("upstream_sha256"), progress, retries, timeout)
        except DownloadError as e:
            raise DownloadError(f"{e}\n(you can also download the original checkpoint yourself, e.g. with gdown, "
                                f"and save it as {raw})") from None
    out = target.with_name(target.name + ".converting")
    try:
        convert(raw, out)
    except Exception as e:
        raw.unlink()  # e.g. an HTML page instead of the checkpoint: fetch it again next time
        if out.exists():
            out.unlink()
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DownloadError(f"{name}: the downloaded upstream file could not be converted ({type(e).__name__}: "
                            f"{first_line}); it was discarded. If the source served a web page (Google Drive asks to confirm "
                            f"large downloads), download the original yourself and save it as {raw}") from e
    got = sha256_of(out)
    if want is not None and got != want:
        out.unlink()
        raise DownloadError(f"{name}: the converted weights have sha256 {got[:12]}..., the catalog expects "
                            f"{want[:12]}...; they were discarded")
    pin.write_text(got + "\n")
    os.replace(out, target)
    raw.unlink()
    return target


def _download(name: str, entry: Mapping, target: Path, sha: Optional[str], progress: bool, retries: int,
              timeout: float) -> None:
    """Try the entry's sources in order until one yields ``target`` with sha256 ``sha`` (None: any bytes)."""
    failures: List[str] = []
    for src in entry["sources"]:
        label = _label(src)
        if offline() and src["type"] != "package":
            failures.append(f"{label}: skipped, HF_HUB_OFFLINE=1")
            continue
        for attempt in range(retries + 1 if src["type"] == "url" else 1):
            try:
                size = entry.get("size") if entry["format"] != "official" else None
                _SOURCES[src["type"]](src, target, sha, size, progress, timeout)
                return
            except _Mismatch as e:
                failures.append(f"{label}: {e}")
                break  # the source serves other bytes: retrying will not help
            except Exception as e:  # network errors, missing files, HTTP errors
                if attempt == retries or src["type"] != "url":
                    failures.append(f"{label}: {type(e).__name__}: {e}")
                else:
                    time.sleep(0.5 * (attempt + 1))
    pinned = f"sha256 {sha[:12]}..." if sha else "no pinned sha256"
    raise DownloadError(f"could not get verified weights for {name} ({pinned}). Tried:\n  " + "\n  ".join(failures))


class _Mismatch(Exception):
    pass


def _label(src: Mapping) -> str:
    if src["type"] == "package":
        return f"package file {src['path']}"
    if src["type"] == "hf":
        return f"Hugging Face Hub {src['repo_id']}/{src['filename']}@{src.get('revision') or 'main'}"
    return f"URL {src['url']}"


def _install(tmp: Path, target: Path, sha: Optional[str]) -> None:
    got = sha256_of(tmp)
    if sha is not None and got != sha:
        tmp.unlink()
        raise _Mismatch(f"sha256 mismatch (got {got[:12]}..., expected {sha[:12]}...); the file was discarded")
    os.replace(tmp, target)


def _copy_in(path: os.PathLike, target: Path, sha: Optional[str]) -> None:
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(path, tmp)
    _install(tmp, target, sha)


def _from_package(src: Mapping, target: Path, sha: str, size, progress: bool, timeout: float) -> None:
    path = PACKAGE_ROOT / src["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in this installation")
    _copy_in(path, target, sha)


def _from_hf(src: Mapping, target: Path, sha: str, size, progress: bool, timeout: float) -> None:
    from huggingface_hub import hf_hub_download

    _copy_in(hf_hub_download(repo_id=src["repo_id"], filename=src["filename"], revision=src.get("revision")),
             target, sha)


def _from_url(src: Mapping, target: Path, sha: str, size, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the file can be: start again
        part.unlink()
        have = 0
    req = urllib.request.Request(src["url"], headers={"User-Agent": "mdeq-zoo"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the .part is complete
            _install(part, target, sha)
            return
        raise
    with resp:
        resumed = have and resp.status == 206
        mode = "ab" if resumed else "wb"
        total = resp.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else size
        with open(part, mode) as f, tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                                          desc=target.name, disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"the transfer stopped after {part.stat().st_size} of {total} bytes; "
                              f"the next call resumes it")
    _install(part, target, sha)


_SOURCES: Dict[str, Callable] = {"package": _from_package, "hf": _from_hf, "url": _from_url}
