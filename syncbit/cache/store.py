"""Block files on disk: ``blocks/ab/<id>``, written to a temp name, then renamed.

A source may also write a block into a temp file itself (``spool``, under
``blocks/spool/``), which ``adopt`` hashes in place and renames.

All methods are blocking; callers run them in a worker thread. A block file
appears under its final name only complete, so a crashed *process* never
leaves a torn block. Durability against a crashed *machine* is a group
commit: ``sync()`` (syncfs) every few seconds, and on an unclean start the
blocks newer than the last commit are verified (see cache.py and
docs/architecture.md for why this departs from fsync-per-block).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from ..errors import BlockCorrupt, cache_full_on_enospc
from ..model import content_id

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
SPOOL_DIR = "spool"  # under blocks/: temp files of spooled blocks (cleaned by scan like the others)
# Block files are written in pieces of this size, not in one 4 MiB write: the
# kernel sizes the page-cache folios of a buffered write by the write's length
# (one 4 MiB write gets 2 MiB folios), and on a VM whose free memory is handed
# back to the host (virtio-balloon free page reporting, as on Firecracker) the
# large blocks such folios are carved from are the ones the host has taken
# back, so every 4 KiB of them costs a host fault when the copy first touches
# it. Measured in the agent during a cold read: 7.5-8.8 ms of thread CPU per
# 4 MiB block in one write (1 MiB pieces: 7.5), 1.9-3.0 ms in 64 KiB pieces
# (order-4 folios come from smaller free blocks first, which are mostly still
# backed; once those run out a piecewise write is as slow as one write). The
# 64 syscalls per block cost ~0.1 ms.
WRITE_PIECE = 64 * 1024
_BLOCK_ID = re.compile(r"^[0-9a-f]{64}$")

try:
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - every Linux libc has syncfs
    _libc = None


class SpooledBlock:
    """A block that a source writes into a temp file of the cache itself.

    A source that can move bytes from its socket to a file in the kernel
    (``os.splice``, see sources/splice.py) fills one of these instead of
    handing over ``bytes``; ``BlockStore.adopt`` then hashes it and renames
    it into place. Whoever holds it last discards it if it is not adopted.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self.handed = False  # set by the sink that takes it over from the source

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and remove the temp file if it is still there (a no-op once adopted)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _accept(block_id: str, expected: str | None, before_write: Callable[[str], None] | None) -> None:
    """Refuse bytes that are not the block recorded earlier; else announce the id before the file appears."""
    if expected is not None and block_id != expected:
        raise BlockCorrupt(f"bytes hash to {block_id[:16]}…, expected {expected[:16]}…")
    if before_write is not None:
        before_write(block_id)


def at_rest_checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, block_id: str) -> str:
        # Ids come from hashes we computed, but a peer or a stray file may
        # hand us anything: never let one name a path outside blocks/.
        if not _BLOCK_ID.match(block_id):
            raise ValueError(f"not a block id: {block_id[:80]!r}")
        return f"{self.root}/{block_id[:2]}/{block_id}"

    def write(self, data: bytes, expected: str | None,
              before_write: Callable[[str], None] | None = None) -> tuple[str, str]:
        """Hash, check, and store ``data``. Returns (block id, at-rest checksum).

        ``before_write(block_id)`` is called once the id is known and checked,
        before the block file is written.
        """
        block_id = content_id(data)
        _accept(block_id, expected, before_write)
        final = self.path(block_id)
        checksum = at_rest_checksum(data)
        if self._intact_copy(block_id, checksum):
            return block_id, checksum  # same id, same bytes: dedup
        d = os.path.dirname(final)
        tmp = f"{d}/{TMP_PREFIX}{uuid.uuid4().hex}"
        with self._full():
            os.makedirs(d, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view[:WRITE_PIECE])
                        view = view[n:]
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        return block_id, checksum

    def spool(self) -> SpooledBlock:
        """A new, empty temp file for a block a source will write itself."""
        d = f"{self.root}/{SPOOL_DIR}"
        path = f"{d}/{TMP_PREFIX}{uuid.uuid4().hex}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        with self._full():
            try:
                return SpooledBlock(path, os.open(path, flags, 0o644))
            except FileNotFoundError:  # the first block of this cache
                os.makedirs(d, exist_ok=True)
                return SpooledBlock(path, os.open(path, flags, 0o644))

    def adopt(self, spooled: SpooledBlock, expected: str | None,
              before_write: Callable[[str], None] | None = None) -> tuple[str, str]:
        """``write`` for a block already in a temp file: hash it in place, check, rename.

        The caller discards ``spooled`` afterwards, whatever happened.
        """
        spooled.close()
        with open(spooled.path, "rb") as f:
            if spooled.size:
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                    block_id, checksum = content_id(mm), at_rest_checksum(mm)
            else:
                block_id, checksum = content_id(b""), at_rest_checksum(b"")
        _accept(block_id, expected, before_write)
        final = self.path(block_id)
        if not self._intact_copy(block_id, checksum):  # else: same id, same bytes (dedup); the temp file goes
            with self._full():
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(spooled.path, final)
        return block_id, checksum

    def _intact_copy(self, block_id: str, checksum: str) -> bool:
        """Is there a block file for ``block_id`` with the bytes just verified (dedup)?

        A file damaged at rest is not kept because a fresh, verified copy has
        the same name: the fresh bytes replace it (checked with the xxh3 of
        the fresh bytes, a read of the old file: dedup is the rare case).
        """
        if not os.path.exists(self.path(block_id)):
            return False
        if self.verify(block_id, checksum):
            return True
        log.error("block file %s does not hold the bytes of its name (damaged on disk): "
                  "replaced by a fresh verified copy", block_id)
        return False

    def _full(self):
        """Creating a directory, a file or a name on a full disk (or out of inodes) is CacheFull."""
        return cache_full_on_enospc(f"no space left in the cache directory {self.root}")

    def sync(self) -> None:
        """Make every block written so far durable (one syncfs for the cache filesystem)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc is None or _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def open(self, block_id: str) -> int:
        return os.open(self.path(block_id), os.O_RDONLY | os.O_CLOEXEC)

    def remove(self, block_id: str) -> None:
        try:
            os.unlink(self.path(block_id))
        except FileNotFoundError:
            pass

    def checksum_if_intact(self, block_id: str) -> str | None:
        """Re-hash a block file: its at-rest checksum if its bytes match its name, else None."""
        try:
            with open(self.path(block_id), "rb") as f:
                data = f.read()
        except OSError:
            return None
        return at_rest_checksum(data) if content_id(data) == block_id else None

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
                if not _BLOCK_ID.match(entry.name) or entry.name[:2] != sub.name:
                    continue  # not ours (an NFS .nfsXXXX file, a backup): leave it alone
                st = entry.stat()
                yield entry.name, st.st_size, st.st_mtime
