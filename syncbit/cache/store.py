"""Block files on disk: ``blocks/ab/<id>``, written temp -> fsync -> rename.

All methods are blocking; callers run them in a worker thread. A block file
exists under its final name only once its bytes are on disk, so a crash never
leaves a torn block where a reader would find it.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import xxhash

from ..errors import BlockCorrupt, CacheFull
from ..model import content_id

TMP_PREFIX = ".tmp-"


def at_rest_checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, block_id: str) -> str:
        return f"{self.root}/{block_id[:2]}/{block_id}"

    def write(self, data: bytes, expected: str | None) -> tuple[str, str]:
        """Hash, check, and store ``data``. Returns (block id, at-rest checksum)."""
        block_id = content_id(data)
        if expected is not None and block_id != expected:
            raise BlockCorrupt(f"bytes hash to {block_id[:16]}…, expected {expected[:16]}…")
        final = self.path(block_id)
        checksum = at_rest_checksum(data)
        if os.path.exists(final):
            return block_id, checksum  # same id, same bytes: dedup
        d = os.path.dirname(final)
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"no space left in the cache directory {self.root}") from e
            raise
        return block_id, checksum

    def open(self, block_id: str) -> int:
        return os.open(self.path(block_id), os.O_RDONLY | os.O_CLOEXEC)

    def remove(self, block_id: str) -> None:
        try:
            os.unlink(self.path(block_id))
        except FileNotFoundError:
            pass

    def verify(self, block_id: str, checksum: str) -> bool:
        try:
            with open(self.path(block_id), "rb") as f:
                return at_rest_checksum(f.read()) == checksum
        except OSError:
            return False

    def scan(self) -> Iterator[tuple[str, int, float]]:
        """Yield (id, size, mtime) of every block file; delete leftover temp files."""
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(TMP_PREFIX):
                    os.unlink(entry.path)  # an interrupted write
                    continue
                st = entry.stat()
                yield entry.name, st.st_size, st.st_mtime
