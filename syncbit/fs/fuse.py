"""The pyfuse3 adapter: translates kernel requests to ``Vfs`` and the cache.

Thin on purpose. The read handler has a fast path that never awaits: when
every block it needs is in the cache it ``os.pread``s the block files through
descriptors kept on the open handle (measured: awaiting or offloading reads to
threads costs 30-40% throughput and 4-5x IOPS). Only a miss awaits the
fetcher. Errors become errno here and nowhere else.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable

import pyfuse3
import trio

from ..cache import BlockCache
from ..errors import SyncbitError
from ..fetch import Fetcher
from ..metrics import BYTES
from ..model import FileEntry, Snapshot
from ..sources.base import Source
from .vfs import ROOT_INODE, Node, Vfs

_SERVED = BYTES.labels(origin="cache")  # bound once: the read path stays cheap
log = logging.getLogger(__name__)

_FETCH_ATTEMPTS = 10  # a block gone again each time it is stored: EIO after this many fetches

# Snapshots are immutable, so the kernel may cache names and attributes long;
# the root changes when datasets come and go and is invalidated explicitly.
_LONG = 86400.0
_ROOT_TIMEOUT = 1.0


class OpenFile:
    __slots__ = ("entry", "source", "dataset", "touched", "next_offset")

    def __init__(self, entry: FileEntry, source: Source, dataset: str) -> None:
        self.entry = entry
        self.source = source
        self.dataset = dataset
        self.touched: set[int] = set()  # blocks this handle has read (counted once each)
        self.next_offset = 0


class SyncbitFS(pyfuse3.Operations):
    def __init__(
        self,
        vfs: Vfs,
        cache: BlockCache,
        fetcher: Fetcher,
        source_for: Callable[[Snapshot], Source],
        *,
        block_size: int,
        readahead: int,
    ) -> None:
        super().__init__()
        self.vfs = vfs
        self.cache = cache
        self.fetcher = fetcher
        self.source_for = source_for
        self.block_size = block_size
        self.readahead_blocks = max(0, readahead // block_size)
        self.handles: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._buf: memoryview | None = None  # see _reply_buffer

    # -- attributes ------------------------------------------------------

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        timeout = _ROOT_TIMEOUT if node.inode == ROOT_INODE else _LONG
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        a.st_mode = node.mode
        a.st_nlink = 2 + sum(1 for c in node.children.values() if c.is_dir) if node.is_dir else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_size = node.size
        a.st_blksize = 128 * 1024
        a.st_blocks = (node.size + 511) // 512
        ns = int(node.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            node = self.vfs.lookup(parent_inode, os.fsdecode(name))
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        self.vfs.ref(node)
        return self._attr(node)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.vfs.forget(inode, count)

    async def getattr(self, inode, ctx=None):
        try:
            return self._attr(self.vfs.node(inode))
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        stats = self.cache.statistics()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = stats.quota // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.vfs.node_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories -----------------------------------------------------

    async def opendir(self, inode, ctx):
        try:
            if not self.vfs.node(inode).is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        return inode

    async def readdir(self, fh, start_id, token):
        entries = self.vfs.readdir(fh)
        for i, (name, node) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node), i):
                break
            self.vfs.ref(node)  # an entry with attributes counts as a lookup

    async def releasedir(self, fh):
        pass

    # -- files -------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            node = self.vfs.node(inode)
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if node.is_dir or node.entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = OpenFile(node.entry, self.source_for(node.snapshot), node.dataset)
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = True
        info.direct_io = False
        return info

    async def read(self, fh, off, size):
        h = self.handles[fh]
        entry = h.entry
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        bs = self.block_size
        first, last = off // bs, (end - 1) // bs
        sequential = off == h.next_offset
        h.next_offset = end
        try:
            fds = [self._local_fd(h, idx, sequential) for idx in range(first, last + 1)]
            if None not in fds:
                # All present (the common case). From here to the return there is no await: the reply buffer is
                # shared by all requests, and pyfuse3 copies it to /dev/fuse as soon as this coroutine returns,
                # before any other task runs.
                buf = self._reply_buffer(end - off)
                pos = 0
                for idx, fd in zip(range(first, last + 1), fds):
                    base = idx * bs
                    lo = max(off, base) - base
                    n = min(end, base + bs) - base - lo
                    if os.preadv(fd, [buf[pos:pos + n]], lo) < n:
                        self._damaged(entry, idx)
                        break  # fetched again below
                    pos += n
                else:
                    _SERVED.inc(pos)
                    return buf[:pos]
            # A miss: fetch block by block and copy each one's bytes at once.
            # Waiting for all of them before copying could livelock under a
            # tiny quota (fetching the second block evicts the first), and a
            # descriptor taken before an await may be closed meanwhile.
            parts = []
            for idx in range(first, last + 1):
                base = idx * bs
                lo = max(off, base) - base
                parts.append(await self._block_bytes(h, idx, lo, min(end, base + bs) - base - lo, sequential))
        except OSError as e:  # EMFILE, EIO of the cache disk...: this read fails, the mount goes on
            log.error("read failed: dataset %s file %s offset %d: %s", h.dataset, entry.path, off, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        _SERVED.inc(len(data))
        return data

    async def _block_bytes(self, h: OpenFile, idx: int, lo: int, n: int, sequential: bool) -> bytes:
        """``n`` bytes of block ``idx`` from offset ``lo``, fetching the block if needed."""
        for _ in range(3):
            fd = self._local_fd(h, idx, sequential)
            if fd is None:
                fd = await self._fetch_fd(h, idx)
            data = os.pread(fd, n, lo)  # no await since the fd was taken
            if len(data) == n:
                return data
            self._damaged(h.entry, idx)
        log.error("read failed: dataset %s file %s block %d: its block file keeps coming out short",
                  h.dataset, h.entry.path, idx)
        raise pyfuse3.FUSEError(errno.EIO)

    def _damaged(self, entry: FileEntry, idx: int) -> None:
        """A block file shorter than its block (truncated on disk): forget it, so that it is fetched again."""
        bid = self.cache.present_block(entry.file_object, idx)
        if bid is not None:
            self.cache.lose(bid)

    def _reply_buffer(self, size: int) -> memoryview:
        """A page-aligned buffer of at least ``size`` bytes, reused by every read.

        Measured on this VM (AMD EPYC, kernel 6.18): the kernel's copies
        (rep movsb) run 3-9x slower when the destination is 8-24 bytes past
        the source modulo 4 KiB. A fresh ``bytes`` from ``os.pread`` lands
        wherever malloc puts it, so whether the pread into it and the reply's
        copy into the mount's page cache hit that case changed from one agent
        start to the next: the first read after a restart (bench row 2b) ran
        at 340-500 MB/s with 2.5 CPU-s per GiB in writev to /dev/fuse, the same
        agent after drop_caches at 1 GB/s with 1 CPU-s. An mmap'ed buffer is
        page-aligned like the page cache on the other side of both copies, and
        reusing it also saves a 1 MiB allocation (and its page faults) per read.
        """
        if self._buf is None or len(self._buf) < size:
            self._buf = memoryview(mmap.mmap(-1, max(size, 1 << 20)))
        return self._buf

    def _local_fd(self, h: OpenFile, idx: int, sequential: bool) -> int | None:
        """The fast path: a descriptor of block ``idx`` if it is cached; never awaits."""
        bid = self.cache.present_block(h.entry.file_object, idx)
        if bid is None:
            return None
        try:
            fd = self.cache.block_fd(bid)
        except FileNotFoundError:
            return None
        if idx not in h.touched:
            self._first_touch(h, idx, bid, hit=True, sequential=sequential)
        return fd

    async def _fetch_fd(self, h: OpenFile, idx: int) -> int:
        entry = h.entry
        # Each attempt awaits a real fetch (a block whose file is gone is no
        # longer present), so this is no spin; under a tiny quota a block may
        # be evicted between its arrival and this reader a few times.
        for _ in range(_FETCH_ATTEMPTS):
            try:
                bid = await self.fetcher.read_block(h.source, entry, idx, self.readahead_blocks)
            except SyncbitError as e:
                log.error("read failed: dataset %s file %s block %d: %s", h.dataset, entry.path, idx, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            try:
                fd = self.cache.block_fd(bid)
            except FileNotFoundError:
                # Evicted between its arrival and now, or its file deleted
                # under the agent (block_fd forgot it): fetch it again.
                await trio.lowlevel.checkpoint()
                continue
            if idx not in h.touched:
                self._first_touch(h, idx, bid, hit=False, sequential=True)
            return fd
        log.error("read failed: dataset %s file %s block %d: its block file disappears as soon as it is stored",
                  h.dataset, entry.path, idx)
        raise pyfuse3.FUSEError(errno.EIO)

    def _first_touch(self, h: OpenFile, idx: int, bid: str, *, hit: bool, sequential: bool) -> None:
        h.touched.add(idx)
        self.cache.touch(bid)
        if hit:
            self.cache.hits += 1
        else:
            self.cache.misses += 1
        if sequential and self.readahead_blocks:
            self.fetcher.readahead(h.source, h.entry, idx + 1, self.readahead_blocks)
            # Ask the kernel to read the next cached block file in now, so the
            # next read does not stall the trio thread on the disk.
            nxt = self.cache.present_block(h.entry.file_object, idx + 1)
            if nxt is not None:
                try:
                    os.posix_fadvise(self.cache.block_fd(nxt), 0, 0, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # Everything that would write is refused; the mount is also 'ro'.
    async def _erofs(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mkdir = mknod = symlink = link = unlink = rmdir = rename = write = setxattr = removexattr = _erofs

    def open_file_count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in self.handles.values():
            counts[h.dataset] = counts.get(h.dataset, 0) + 1
        return counts


def fuse_options() -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=syncbit", "subtype=syncbit", "ro", "allow_other"}
    return opts

