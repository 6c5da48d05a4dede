"""``file://`` and plain paths: a local or NFS directory tree, or one file.

The snapshot pins each file's size, mtime (ns) and inode; a read re-checks
them on the open descriptor before it starts and after every piece it reads,
before handing the piece on, so a file rewritten or replaced under a pinned
snapshot is reported (SourceChanged), never mixed into it. Files are opened
without blocking: a path that has become a FIFO or a device since the listing
is refused, not waited on (a thread blocked in open() cannot be cancelled).
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
        if not path:  # "file://" would otherwise list the agent's working directory
            raise MalformedURI(f"file URI without a path: {uri!r} (use file:///path)")
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
        except NotADirectoryError:
            raise SourceNotFound(f"no such file or directory: {self.root} (a part of the path is a file)") from None
        except OSError as e:
            raise _source_error(f"cannot stat {self.root}", e) from None
        files: list[FileEntry] = []
        if stat.S_ISREG(st.st_mode):
            files.append(self._entry(self.root.name, self.root, st))
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, filenames in _walk(str(self.root)):
                for name in filenames:
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
    def _entry(rel: str, full: Path, st: os.stat_result) -> FileEntry:
        real = os.path.realpath(full)
        validator = _validator(st)
        return FileEntry(
            path=rel, size=st.st_size, locator=real, validator=validator,
            file_object=_file_object(real, st.st_ino, validator),
            mode=0o555 if st.st_mode & 0o111 else 0o444, mtime=st.st_mtime,
        )

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        try:
            fd = await trio.to_thread.run_sync(_open_pinned, entry, limiter=_IO)
        except FileNotFoundError:
            raise SourceChanged(f"{entry.locator} disappeared from the source since the snapshot") from None
        except PermissionError:
            raise AccessDenied(f"permission denied: {entry.locator}") from None
        except OSError as e:
            if isinstance(e, SourceError):
                raise
            raise TemporarySourceError(f"opening {entry.locator}: {e.strerror or e}") from e
        try:
            pos, end = offset, offset + length
            piece = chunk_size(sink, _CHUNK)
            while pos < end:
                chunk = await trio.to_thread.run_sync(_read_pinned, fd, entry, min(piece, end - pos), pos,
                                                      limiter=_IO)
                await sink(chunk)
                pos += len(chunk)
        except OSError as e:
            if isinstance(e, SourceError):
                raise
            # NFS hiccups (EIO, ESTALE, ETIMEDOUT) are worth a retry.
            raise TemporarySourceError(f"reading {entry.locator}: {e.strerror or e}") from e
        finally:
            os.close(fd)


def _file_object(real: str, ino: int, validator: str) -> str:
    return short_hash("file", real, str(ino), validator)


def _check(fd: int, entry: FileEntry) -> None:
    """The file behind ``fd`` is still the one the snapshot pinned: same size, mtime and inode."""
    st = os.fstat(fd)
    now = _validator(st)
    if now != entry.validator:
        raise SourceChanged(f"{entry.locator} changed since the snapshot was pinned ({entry.validator} -> {now})")
    if _file_object(entry.locator, st.st_ino, now) != entry.file_object:
        # Same size and mtime, another file (`cp -p` or `rsync -a` of new
        # content, then a rename over the old name).
        raise SourceChanged(f"{entry.locator} was replaced by another file (inode {st.st_ino}) since the snapshot")


def _open_pinned(entry: FileEntry) -> int:
    """Open the snapshot's file without blocking, and check it is still that file."""
    fd = os.open(entry.locator, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SourceChanged(f"{entry.locator} is no longer a regular file")
        os.set_blocking(fd, True)
        _check(fd, entry)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_pinned(fd: int, entry: FileEntry, n: int, pos: int) -> bytes:
    """``n`` bytes at ``pos``, handed on only if the file is still the pinned one after reading them."""
    chunk = os.pread(fd, n, pos)
    if not chunk:
        raise SourceChanged(f"{entry.locator} is shorter than the snapshot says")
    _check(fd, entry)  # a write before or during this pread shows as a new mtime now
    return chunk


def _walk(root: str):
    """(directory, sorted regular-looking names) for ``root`` and every directory under it, in sorted order.

    Iterative (``os.walk`` recurses in Python 3.11: a tree a thousand levels
    deep raised RecursionError); symlinked directories are not entered.
    """
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError as e:
            raise _source_error(f"cannot list {top}", e) from None
        dirs, names = [], []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            (dirs if is_dir else names).append(e.name)
        yield top, sorted(names)
        stack.extend(os.path.join(top, d) for d in sorted(dirs, reverse=True))


def _source_error(what: str, e: OSError) -> SourceError:
    if e.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"{what}: {e.strerror}")
    if e.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN):
        return TemporarySourceError(f"{what}: {e.strerror}")  # NFS: worth a retry
    return SourceError(f"{what}: {e.strerror or e}")
