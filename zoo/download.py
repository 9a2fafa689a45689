"""Verified, cached, resumable downloads of catalog weights.

``fetch(name)`` returns the path of the entry's file in the cache after checking its sha256, trying the
entry's sources in order (a file shipped inside the package, a Hugging Face Hub repo, an HTTPS URL).
A download goes to ``<file>.part`` and is renamed to ``<file>`` only after its sha256 matched, so an
interrupted or corrupt transfer never leaves a usable-looking file; an interrupted ``.part`` is resumed
with an HTTP range request on the next call (or restarted when the server cannot resume). A mismatch is
an error, never a warning. With ``HF_HUB_OFFLINE=1`` only the cache and packaged files are used.

Google Drive URLs (``drive.google.com``) are fetched with ``gdown`` (``pip install 'mdeq-zoo[gdrive]'``), which
answers Drive's "can't scan this file for viruses" confirmation page; its partial file is resumed the same way.

Cache: ``$MDEQ_ZOO_CACHE``, else ``$TORCH_HOME/hub/mdeq_zoo`` (``TORCH_HOME`` defaults to
``~/.cache/torch``); Hub downloads also use huggingface_hub's own cache (``HF_HOME``). A verified file already
in the cache, or shipped in the package, is used without writing anything, so the cache may be read-only;
only a download needs a writable cache (and takes the ``<file>.lock`` that parallel jobs share).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import inspect
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from .catalog import load_catalog

__all__ = ["DownloadError", "cache_dir", "fetch", "sha256_of", "offline"]

_CHUNK = 1 << 20
_LOCK_NOTICE_S = 5.0  # a lock held longer than this is reported (another process is downloading)
PACKAGE_ROOT = Path(__file__).resolve().parent
_DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
# what a write into the cache fails with when the cache is unusable (not a network error)
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR}
_FULL = {errno.ENOSPC, errno.EDQUOT}
_log = logging.getLogger(__name__)


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
    try:
        return path.is_file() and sha256_of(path) == sha256
    except OSError:  # unreadable: not usable
        return False


def fetch(name: str, catalog: Optional[Mapping[str, Mapping]] = None, progress: bool = True,
          retries: int = 2, timeout: float = 30.0, convert: Optional[Callable[[Path, Path], None]] = None) -> Path:
    """Path of entry ``name``'s verified file (downloaded into the cache if needed).

    For an ``official`` entry, ``convert(upstream_file, out_file)`` turns the downloaded original checkpoint
    into safetensors (and must check that it loads strictly); the result is cached with its sha256 pinned
    next to it (``<file>.sha256``), so later loads are verified against the first conversion.
    A verified packaged file is returned in place when the cache cannot be written (read-only, full).
    """
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise KeyError(f"{name!r} is not in the weights catalog; known: {sorted(catalog)}")
    entry = catalog[name]
    target = cache_dir() / entry["file"]
    if _cached(entry, target):  # reads only: a read-only cache needs no lock
        return target
    try:
        with _locked(target, name):  # DDP ranks / parallel jobs share one download
            if _cached(entry, target):  # another process finished it while we waited
                return target
            if entry["format"] == "official":
                return _fetch_official(name, entry, target, convert, progress, retries, timeout)
            with _storing(target.parent):
                if target.exists():  # a cached file that no longer matches (edited or corrupted): never use it
                    target.unlink()
            _download(name, entry, target, entry["sha256"], progress, retries, timeout)
            return target
    except _CacheError as e:
        packaged = _packaged(entry)
        if packaged is not None:
            return packaged
        stale = " (its copy there does not match the catalog's sha256)" if target.exists() else ""
        raw = target.with_name(target.name + ".upstream")
        kept = f"; the downloaded original stays as {raw} for the next call" if raw.is_file() else ""
        raise DownloadError(f"could not get {name}{stale}: {e.describe(entry.get('size'))}{kept}") from e.__cause__


def _cached(entry: Mapping, target: Path) -> bool:
    if entry["format"] != "official":
        return _verified(target, entry["sha256"])
    pin = target.with_name(target.name + ".sha256")
    try:
        if not (target.is_file() and pin.is_file()):
            return False
        got = sha256_of(target)
        return got == pin.read_text().strip() and entry.get("sha256") in (None, got)
    except OSError:
        return False


def _packaged(entry: Mapping) -> Optional[Path]:
    """The entry's verified file shipped in the package, used in place (None if there is none)."""
    if entry["format"] == "official":
        return None
    for src in entry["sources"]:
        if src["type"] == "package" and _verified(PACKAGE_ROOT / src["path"], entry["sha256"]):
            return PACKAGE_ROOT / src["path"]
    return None


class _CacheError(Exception):
    """A write into the cache failed for a reason of the cache's (read-only, not a folder, full disk)."""

    def __init__(self, folder: Path, code: int, reason: str):
        super().__init__(reason)
        self.folder, self.errno, self.reason = folder, code, reason

    def describe(self, size: Optional[int] = None) -> str:
        folder = self.folder
        if self.errno in _FULL:
            try:
                free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
            except OSError:
                free = "full"
            need = f", the file is {size / 1e6:.1f} MB" if size else ""
            return (f"no space left in the weights cache {folder} ({free}{need}); the partial file was removed. "
                    f"Free some space there or set MDEQ_ZOO_CACHE to a folder with room")
        if folder.exists() and not folder.is_dir():
            return f"the weights cache {folder} is a file, not a folder; set MDEQ_ZOO_CACHE to a writable folder"
        return (f"it has to be downloaded, but the weights cache {folder} is not writable ({self.reason}); "
                f"set MDEQ_ZOO_CACHE to a writable folder")


def _os_errno(e: BaseException) -> Optional[int]:
    """errno of an OSError, or of an I/O error a library reports in its message ('... (os error 28)')."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def _storing(folder: Path, *partial: Path):
    """Writes into the cache: a failure of the cache's own (read-only, full) becomes ``_CacheError`` after the
    ``partial`` files are removed; other errors pass unchanged."""
    try:
        yield
    except _CacheError:
        raise
    except Exception as e:
        if not _cache_fault(e, folder):
            raise
        _remove(*partial)
        raise _CacheError(folder, _os_errno(e), f"{type(e).__name__}: {e}") from e


def _cache_fault(e: BaseException, folder: Path) -> bool:
    """Whether ``e`` is the cache folder failing a write (read-only, not a folder, full), not e.g. a network error."""
    if _os_errno(e) not in _NOT_WRITABLE | _FULL:
        return False
    names = [n for n in (getattr(e, "filename", None), getattr(e, "filename2", None)) if n is not None]
    return not names or any(_inside(n, folder) for n in names)


def _inside(path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _locked(target: Path, name: str):
    """An exclusive advisory lock on ``<target>.lock`` while the block runs (POSIX; elsewhere no lock)."""
    path = target.with_name(target.name + ".lock")
    with _storing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with _storing(target.parent):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file in a shared cache: locking needs only read access
            if not path.is_file():
                raise
            fd = os.open(path, os.O_RDONLY)
    try:
        locked = _acquire(fcntl, fd, path, name)
        if locked:
            with contextlib.suppress(OSError):  # who holds it, for anyone waiting
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fcntl, fd: int, path: Path, name: str) -> bool:
    """Take the lock (False: the file system has no locks), saying whom we wait for when it is held long."""
    deadline = time.monotonic() + _LOCK_NOTICE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        except OSError as e:  # e.g. some network file systems
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _log.warning("the file system of %s has no locks (%s); fetching %s without one", path.parent, e, name)
            return False
    try:
        holder = path.read_text().strip() or "another process"
    except OSError:
        holder = "another process"
    _log.warning("waiting for %s to finish fetching %s (lock file %s)", holder, name, path)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return True


def _fetch_official(name: str, entry: Mapping, target: Path, convert, progress: bool, retries: int,
                    timeout: float) -> Path:
    pin = target.with_name(target.name + ".sha256")
    want = entry.get("sha256")
    folder = target.parent
    with _storing(folder):
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
        with _storing(folder, out):  # a full disk: the complete original stays for the next call
            convert(raw, out)
    except _CacheError:
        raise
    except Exception as e:
        raw.unlink()  # e.g. an HTML page instead of the checkpoint: fetch it again next time
        _remove(out)
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DownloadError(f"{name}: the downloaded upstream file could not be converted ({type(e).__name__}: "
                            f"{first_line}); it was discarded. If the source served a web page (Google Drive asks "
                            f"to confirm large downloads), download the original yourself and save it as {raw}"
                            ) from e
    got = sha256_of(out)
    if want is not None and got != want:
        out.unlink()
        raise DownloadError(f"{name}: the converted weights have sha256 {got[:12]}..., the catalog expects "
                            f"{want[:12]}...; they were discarded")
    with _storing(folder, out, pin):
        pin.write_text(got + "\n")
        os.replace(out, target)
    _remove(raw)
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
                _source(src)(src, target, sha, size, progress, timeout)
                return
            except _CacheError:
                raise  # no other source can write there either
            except (_Mismatch, _Unavailable) as e:
                failures.append(f"{label}: {e}")
                break  # the source serves other bytes, or cannot be used here: retrying will not help
            except Exception as e:  # network errors, missing files, HTTP errors
                if attempt == retries or src["type"] != "url":
                    failures.append(f"{label}: {type(e).__name__}: {e}")
                else:
                    time.sleep(0.5 * (attempt + 1))
    pinned = f"sha256 {sha[:12]}..." if sha else "no pinned sha256"
    raise DownloadError(f"could not get verified weights for {name} ({pinned}). Tried:\n  " + "\n  ".join(failures))


class _Mismatch(Exception):
    pass


class _Unavailable(Exception):
    """The source cannot be used here (a missing optional package, a file Drive refuses to hand out)."""


def _label(src: Mapping) -> str:
    if src["type"] == "package":
        return f"package file {src['path']}"
    if src["type"] == "hf":
        return f"Hugging Face Hub {src['repo_id']}/{src['filename']}@{src.get('revision') or 'main'}"
    return f"URL {src['url']}"


def _is_drive_url(url: str) -> bool:
    """Whether ``url`` is a Google Drive file, fetched with gdown (Drive's confirmation page for large files)."""
    return urllib.parse.urlsplit(url).hostname in _DRIVE_HOSTS


def _source(src: Mapping) -> Callable:
    if src["type"] == "url" and _is_drive_url(src["url"]):
        return _from_drive
    return _SOURCES[src["type"]]


def _install(tmp: Path, target: Path, sha: Optional[str]) -> None:
    got = sha256_of(tmp)
    if sha is not None and got != sha:
        tmp.unlink()
        raise _Mismatch(f"sha256 mismatch (got {got[:12]}..., expected {sha[:12]}...); the file was discarded")
    with _storing(target.parent, tmp):
        os.replace(tmp, target)


def _copy_in(path: os.PathLike, target: Path, sha: Optional[str]) -> None:
    tmp = target.with_name(target.name + ".part")
    with _storing(target.parent, tmp):
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
        with _storing(target.parent):
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
    with resp, _storing(target.parent, part):  # a full disk: the partial file is removed
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


def _from_drive(src: Mapping, target: Path, sha: str, size, progress: bool, timeout: float) -> None:
    """A Google Drive file through gdown, which follows Drive's confirmation page; gdown keeps an interrupted
    transfer in ``<file>.gdown<8 characters>.part`` and resumes it (range request) on the next attempt."""
    try:
        import gdown
    except ImportError:
        raise _Unavailable("Google Drive answers large files with a confirmation page, which needs gdown: "
                           "pip install 'mdeq-zoo[gdrive]' (or pip install gdown)") from None
    out = target.with_name(target.name + ".gdown")

    def partial() -> Dict[Path, int]:
        return {p: p.stat().st_size for p in target.parent.glob(glob.escape(out.name) + "*.part")
                if len(p.name) == len(out.name) + 8 + len(".part")}

    # no cookies: gdown would write them to ~/.cache/gdown, and public files need none; older gdowns lack some options
    options = dict(quiet=not progress, resume=True, use_cookies=False, timeout=timeout, retries=0)
    accepted = inspect.signature(gdown.download).parameters
    refused = getattr(gdown.exceptions, "FileURLRetrievalError", ())
    before = partial()
    try:
        gdown.download(url=src["url"], output=str(out), **{k: v for k, v in options.items() if k in accepted})
    except refused as e:  # Drive refused (permissions, quota): retrying will not help
        raise _Unavailable(f"Google Drive did not hand out the file: {' '.join(str(e).split())}") from None
    except Exception as e:
        if _cache_fault(e, target.parent):
            _remove(out, *partial())
            raise _CacheError(target.parent, _os_errno(e), f"{type(e).__name__}: {e}") from e
        if before and partial() == before:  # a resume that made no progress (e.g. the server ignored the range)
            _remove(*before)  # the next attempt starts over
        raise
    _install(out, target, sha)


_SOURCES: Dict[str, Callable] = {"package": _from_package, "hf": _from_hf, "url": _from_url}
