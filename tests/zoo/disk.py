"""A folder that fails writes the way a read-only mount, another user's file or a full disk does.

Tests run as root, for whom permissions do not stop writes, so ``Disk`` wraps the operating system calls that
write (``open``/``io.open`` for writing, ``os.open`` with write flags, ``mkdir``, ``replace``, ``unlink``, ...):
for paths inside its folder they fail with the errno the kernel would give, or stop once ``room`` bytes have
been written. Reads and paths elsewhere are untouched."""
import builtins
import errno
import io
import os
import shutil

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Disk:
    def __init__(self, monkeypatch, folder):
        self.folder = os.path.abspath(folder)
        self.readonly = None  # an errno (EROFS, EACCES) every write inside the folder fails with
        self.room = None  # bytes that may still be written inside the folder (None: no limit)
        self.foreign = set()  # files inside the folder that belong to another user: not writable
        real_open, real_os_open = io.open, os.open

        def open_(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and set(mode) & set("wax+") and self.inside(file):
                self.check(file)
                f = real_open(file, mode, *args, **kwargs)
                return _Limited(f, self) if self.room is not None else f
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS and self.inside(path):
                self.check(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if self.inside(path) and os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            self.check(path)
            return real_mkdir(path, *args, **kwargs)

        def guarded(real):
            def call(*paths, **kwargs):
                for p in paths[:2]:
                    self.check(p)
                return real(*paths, **kwargs)
            return call

        real_mkdir = os.mkdir
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        for name in ("replace", "rename", "unlink", "remove", "rmdir", "utime", "truncate"):
            monkeypatch.setattr(os, name, guarded(getattr(os, name)))
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False, raising=False)  # copies go through write()

    def inside(self, path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == self.folder or path.startswith(self.folder + os.sep)

    def check(self, path) -> None:
        if not self.inside(path):
            return
        if self.readonly is not None:
            raise OSError(self.readonly, os.strerror(self.readonly), os.fspath(path))
        if os.path.abspath(os.fsdecode(path)) in self.foreign:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def written(self, n: int) -> int:
        """Bytes of ``n`` that fit (and take them from the room left)."""
        fit = min(n, self.room) if self.room is not None else n
        if self.room is not None:
            self.room -= fit
        return fit


class _Limited:
    """A file opened for writing on a disk with ``room`` bytes left: a larger write stores what fits and fails."""

    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        fit = self._disk.written(len(data))
        if fit < len(data):
            self._f.write(data[:fit])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
