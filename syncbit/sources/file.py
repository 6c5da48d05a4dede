"""``file://`` and plain paths: a local or NFS directory tree, or one file.

The snapshot pins each file's size and mtime (ns); a read re-checks them on
the open descriptor before and after reading, so a file rewritten under a
pinned snapshot is reported (SourceChanged), never mixed into it.
Symlinks to regular files are followed; symlinked directories are not
descended into (loops, and trees that are not the dataset).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import trio

from ..errors import AccessDenied, MalformedURI, SourceChanged, SourceError, SourceNotFound, TemporarySourceError
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source, chunk_size

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_IO = trio.CapacityLimiter(16)  # threads doing file-source I/O


def path_of(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise MalformedURI(f"file URI with a host is not supported: {uri!r} (use file:///path)")
        path = unquote(parts.path)
    else:
        path = uri
    if not path.startswith("/"):
        path = os.path.abspath(path)
    if "\0" in path:
        raise MalformedURI(f"NUL byte in path {uri!r}")
    return Path(path)


def _validator(st: os.stat_result) -> str:
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"


class FileSource(Source):
    schemes = ("file",)

    def __init__(self, uri: str, options=None) -> None:
        super().__init__(uri, options)
        self.root = path_of(uri)

    async def resolve(self) -> Snapshot:
        return await trio.to_thread.run_sync(self._resolve_sync, limiter=_IO)

    def _resolve_sync(self) -> Snapshot:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise SourceNotFound(f"no such file or directory: {self.root}") from None
        except PermissionError:
            raise AccessDenied(f"permission denied: {self.root}") from None
        files: list[FileEntry] = []
        if stat.S_ISREG(st.st_mode):
            files.append(self._entry(self.root.name, self.root, st))
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath, name)
                    try:
                        fst = os.stat(full)  # follows symlinks to files
                    except OSError as e:
                        log.warning("skipping %s: %s", full, e.strerror)
                        continue
                    if not stat.S_ISREG(fst.st_mode):
                        continue
                    rel = safe_relpath(os.path.relpath(full, self.root).replace(os.sep, "/"))
                    files.append(self._entry(rel, full, fst))
        else:
            raise SourceError(f"{self.root} is neither a regular file nor a directory")
        revision = short_hash(*(f"{f.path}\0{f.validator}" for f in files))
        return Snapshot(uri=self.uri, revision=revision, files=tuple(files), created=time.time())

    @staticmethod
    def _walk_error(e: OSError) -> None:
        raise AccessDenied(f"cannot list {e.filename}: {e.strerror}") if e.errno in (errno.EACCES, errno.EPERM) \
            else SourceError(f"cannot list {e.filename}: {e.strerror}")

    @staticmethod
    def _entry(rel: str, full: Path, st: os.stat_result) -> FileEntry:
        real = os.path.realpath(full)
        validator = _validator(st)
        return FileEntry(
            path=rel, size=st.st_size, locator=real, validator=validator,
            file_object=short_hash("file", real, str(st.st_ino), validator),
            mode=0o555 if st.st_mode & 0o111 else 0o444, mtime=st.st_mtime,
        )

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        try:
            fd = await trio.to_thread.run_sync(os.open, entry.locator, os.O_RDONLY | os.O_CLOEXEC, limiter=_IO)
        except FileNotFoundError:
            raise SourceChanged(f"{entry.locator} disappeared from the source since the snapshot") from None
        except PermissionError:
            raise AccessDenied(f"permission denied: {entry.locator}") from None
        try:
            self._check(fd, entry)
            pos, end = offset, offset + length
            piece = chunk_size(sink, _CHUNK)
            while pos < end:
                chunk = await trio.to_thread.run_sync(os.pread, fd, min(piece, end - pos), pos, limiter=_IO)
                if not chunk:
                    raise SourceChanged(f"{entry.locator} is shorter than the snapshot says")
                await sink(chunk)
                pos += len(chunk)
            # A rewrite that raced our read shows up as a new mtime now.
            self._check(fd, entry)
        except OSError as e:
            if isinstance(e, SourceError):
                raise
            # NFS hiccups (EIO, ESTALE, ETIMEDOUT) are worth a retry.
            raise TemporarySourceError(f"reading {entry.locator}: {e.strerror or e}") from e
        finally:
            os.close(fd)

    @staticmethod
    def _check(fd: int, entry: FileEntry) -> None:
        now = _validator(os.fstat(fd))
        if now != entry.validator:
            raise SourceChanged(f"{entry.locator} changed since the snapshot was pinned ({entry.validator} -> {now})")
