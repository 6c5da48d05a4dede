"""``BlockCache``: block files + index + eviction, as one object for the agent.

It knows block ids and file objects, never sources. The in-memory maps
(``_present``, ``_fo_blocks``) answer the FUSE read fast path without SQLite
and without an ``await``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import sqlite3
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from ..errors import AgentAlreadyRunning, CacheFull
from .eviction import select_victims
from .index import Index
from .store import BlockStore, SpooledBlock

log = logging.getLogger(__name__)
MAX_LEARNED = 200_000  # unreported block ids kept while the control plane is away (~40 MB)

# Open block files kept for readers (random readers touch many blocks; reopening
# a block file per read cost ~15-20% of the read path in the benchmark).
OPEN_BLOCK_FILES = 1024

_CLEAN_MARK = "clean-shutdown"
_STARTED_MARK = "last-start"


@dataclass(frozen=True)
class CacheStats:
    bytes: int
    blocks: int
    quota: int
    high_watermark: int
    low_watermark: int
    evicted_blocks: int
    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class BlockCache:
    def __init__(
        self,
        cache_dir: Path,
        *,
        quota: int | float,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        min_free_disk: int = 0,
        commit_interval: float = 5.0,
    ) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_cache_dir(self.dir)
        self.store = BlockStore(self.dir)
        self.index = Index(self.dir / "index.sqlite")
        self._quota_setting = quota
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.min_free_disk = min_free_disk
        # Group commit: blocks become durable (syncfs) at most this long after being written.
        self.commit_interval = commit_interval
        self._present: dict[str, int] = {}
        self._fo_blocks: dict[str, dict[int, str]] = {}
        self._in_use: Counter[str] = Counter()
        self._fds: OrderedDict[str, int] = OrderedDict()
        # Half the process's descriptors at most: sockets, the mount and SQLite need the rest.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_open_files = OPEN_BLOCK_FILES if soft == resource.RLIM_INFINITY else \
            max(16, min(OPEN_BLOCK_FILES, soft // 2))
        self._access: dict[str, tuple[float, int]] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted_blocks = 0
        self._pressure = trio.Event()
        self._io = trio.CapacityLimiter(4)  # threads hashing, writing and syncing blocks
        self._uncommitted = False
        # (file object, index, block id) learnt by hashing here, not yet
        # reported; collected only when there is a control plane to tell.
        self.report_learned = False
        self.learned: list[tuple[str, int, str]] = []

    # -- start and stop ----------------------------------------------------

    def open(self) -> None:
        """Reconcile the index with the block files (blocking; run before serving)."""
        started = self.dir / _STARTED_MARK
        clean = (self.dir / _CLEAN_MARK).exists() or not started.exists()  # or a new cache
        durable_before = float(self.index.get_meta("durable_before", "0"))
        (self.dir / _CLEAN_MARK).unlink(missing_ok=True)
        started.touch()
        indexed = self.index.block_sizes()
        on_disk = {bid: (size, mtime) for bid, size, mtime in self.store.scan()}
        missing = [b for b in indexed if b not in on_disk]
        if missing:
            log.warning("index lists %d blocks whose files are gone; forgetting them", len(missing))
            self.index.remove_blocks(missing)
        adopted = 0
        for bid, (size, mtime) in on_disk.items():
            if bid not in indexed:
                # Renamed into place but the index row was lost in a crash:
                # the name is its content hash, so re-hash before adopting it.
                checksum = self.store.checksum_if_intact(bid)
                if checksum is not None and self._adopt_row(bid, size, checksum, mtime):
                    adopted += 1
                else:
                    self.store.remove(bid)
        if not clean:
            # After a crash, blocks written since the last group commit may be
            # torn if the machine went down: check them before serving any.
            bad = [b for b, c in self.index.checksums_since(durable_before) if not self.store.verify(b, c)]
            if bad:
                log.error("dropping %d cached blocks that fail their at-rest checksum", len(bad))
                for b in bad:
                    self.store.remove(b)
                self.index.remove_blocks(bad)
        self._present = self.index.block_sizes()
        self.bytes = sum(self._present.values())
        if adopted:
            log.info("adopted %d block files missing from the index", adopted)
        log.info("cache %s: %d blocks, %d bytes (%s start)", self.dir, len(self._present), self.bytes,
                 "clean" if clean else "unclean")

    def _adopt_row(self, bid: str, size: int, checksum: str, mtime: float) -> bool:
        try:
            self.index.add_block(bid, size, checksum, mtime)
            return True
        except sqlite3.OperationalError as e:  # "database or disk is full": the file goes, which frees space
            log.warning("cannot adopt block file %s into the index (%s): removing it", bid, e)
            return False

    def close(self) -> None:
        for bid in list(self._fds):
            self._close_fd(bid)
        try:
            self.flush_access()
            self.store.sync()
            self.index.set_meta("durable_before", str(time.time()))
            self.index.close()
            (self.dir / _CLEAN_MARK).touch()
        except (OSError, sqlite3.Error) as e:
            # No clean mark: the next start verifies what this run wrote.
            log.error("cannot close the cache in %s cleanly: %s", self.dir, e)
        finally:
            if self._lock >= 0:
                os.close(self._lock)  # releases the directory for the next agent
                self._lock = -1

    async def commit(self) -> None:
        """Group commit: make the blocks written so far durable and record up to when."""
        if not self._uncommitted:
            return
        self._uncommitted = False
        t0 = time.time()
        await trio.to_thread.run_sync(self.store.sync, limiter=self._io)
        # Rows created before t0 were renamed before syncfs started: durable.
        self.index.set_meta("durable_before", str(t0))

    # -- sizes -----------------------------------------------------------

    @property
    def quota(self) -> int:
        if isinstance(self._quota_setting, float):
            st = os.statvfs(self.dir)
            return int(st.f_blocks * st.f_frsize * self._quota_setting)
        return int(self._quota_setting)

    def statistics(self) -> CacheStats:
        q = self.quota
        return CacheStats(
            bytes=self.bytes, blocks=len(self._present), quota=q,
            high_watermark=int(q * self.high_watermark), low_watermark=int(q * self.low_watermark),
            evicted_blocks=self.evicted_blocks, hits=self.hits, misses=self.misses,
        )

    # -- lookups (synchronous, used by the FUSE fast path) ---------------------

    def known_blocks(self, fo: str) -> dict[int, str]:
        """Block ids known for a file object (present or not)."""
        blocks = self._fo_blocks.get(fo)
        if blocks is None:
            blocks = self._fo_blocks[fo] = self.index.fo_blocks(fo)
        return blocks

    def present_block(self, fo: str, idx: int) -> str | None:
        bid = self.known_blocks(fo).get(idx)
        return bid if bid is not None and bid in self._present else None

    def has_block(self, block_id: str) -> bool:
        return block_id in self._present

    def block_size_of(self, block_id: str) -> int:
        return self._present[block_id]

    def block_fd(self, block_id: str) -> int:
        """A read-only descriptor of a present block, from an LRU of open block files.

        Callers ``os.pread`` it before their next ``await``: the descriptor may
        be closed (LRU, eviction) at any checkpoint. Raises FileNotFoundError
        if the block file is gone.
        """
        fd = self._fds.get(block_id)
        if fd is not None:
            self._fds.move_to_end(block_id)
            return fd
        try:
            fd = self.store.open(block_id)
        except FileNotFoundError:
            self.lose(block_id)
            raise
        self._fds[block_id] = fd
        if len(self._fds) > self.max_open_files:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def lose(self, block_id: str) -> None:
        """Forget a block whose file is gone or damaged (deleted, truncated under us).

        It is no longer present, whoever holds it, so the next read of it
        fetches it again instead of finding the same broken file.
        """
        if block_id in self._present:
            log.error("block %s… is missing or damaged in %s; it will be fetched again", block_id[:16], self.dir)
            self._remove([block_id])

    def _close_fd(self, block_id: str) -> None:
        fd = self._fds.pop(block_id, None)
        if fd is not None:
            os.close(fd)

    def touch(self, block_id: str) -> None:
        """Count one use of a block (once per open file handle, not per read)."""
        _, n = self._access.get(block_id, (0.0, 0))
        self._access[block_id] = (time.time(), n + 1)

    def hold(self, block_id: str) -> None:
        """Protect a block from eviction while a reader or a fetch uses it."""
        self._in_use[block_id] += 1

    def release(self, block_id: str) -> None:
        self._in_use[block_id] -= 1
        if self._in_use[block_id] <= 0:
            del self._in_use[block_id]

    def flush_access(self) -> None:
        if self._access:
            updates, self._access = self._access, {}
            self.index.record_access(updates)

    # -- writes --------------------------------------------------------

    def spool(self, size: int) -> SpooledBlock:
        """A temp file for a block of ``size`` bytes that a source writes itself; for ``put``.

        Called from the source's worker thread. The space is checked first,
        as ``put`` does for bytes, since the bytes reach the disk before ``put``;
        in that thread, as it is a system call: the trio thread is only asked
        to wake the evictor when space is short.
        """
        short = self._space_short(size)
        if short:
            trio.from_thread.run_sync(self._pressure.set)
            raise CacheFull(short)
        return self.store.spool()

    async def put(self, fo: str, idx: int, data: bytes | SpooledBlock, expected: str | None) -> str:
        """Verify and store one block of a file object; returns its id.

        Raises BlockCorrupt if ``expected`` is given and the bytes differ.
        ``data`` may be a block spooled by the source (see ``spool``); it is
        discarded if it cannot be stored.
        """
        if isinstance(data, SpooledBlock):
            try:
                return await self._put(fo, idx, data, expected, self.store.adopt)
            finally:
                data.discard()
        self._check_space(len(data))
        return await self._put(fo, idx, data, expected, self.store.write)

    async def _put(self, fo: str, idx: int, data, expected: str | None, store) -> str:
        held: list[str] = []

        def known_and_held(block_id: str) -> None:
            self._record_known(fo, idx, block_id)
            # Held until it is recorded as present: a block already stored
            # (dedup) must not be evicted between the store's "the file
            # exists" and the lines below, or it would count as present
            # without a file.
            self.hold(block_id)
            held.append(block_id)

        def known(block_id: str) -> None:
            # Runs in the worker thread between hashing and renaming: the
            # (file object, index) -> id row exists before the block file does,
            # so a block renamed just before a crash is adopted at the next
            # start *and* found again, not downloaded twice.
            trio.from_thread.run_sync(known_and_held, block_id)

        try:
            bid, checksum = await trio.to_thread.run_sync(store, data, expected, known, limiter=self._io)
            if bid in self._present:
                # Dedup; or the file was damaged and the store replaced it:
                # the next read opens the file now under that name.
                self._close_fd(bid)
            else:
                self._uncommitted = True
                try:
                    self.index.add_block(bid, len(data), checksum, time.time())
                except sqlite3.OperationalError as e:  # "database or disk is full"
                    raise CacheFull(f"cache index in {self.dir}: {e}") from None
                self._present[bid] = len(data)
                self.bytes += len(data)
                if self.bytes > self.quota * self.high_watermark:
                    self._pressure.set()
        finally:
            for b in held:
                self.release(b)
        return bid

    def forget_file_object(self, fo: str) -> None:
        """Forget which blocks make up ``fo`` (after its whole-file digest failed).

        The block files stay until eviction: other file objects may share them.
        The next read of the file fetches it again and learns new ids.
        """
        self._fo_blocks.pop(fo, None)
        self.index.forget_fo(fo)

    def is_verified(self, fo: str, digest: str) -> bool:
        return self.index.verified_digest(fo) == digest

    def mark_verified(self, fo: str, digest: str) -> None:
        try:
            self.index.set_verified(fo, digest, time.time())
        except sqlite3.OperationalError as e:  # a full disk: verified again next time, no harm
            log.warning("cannot record the verification of %s: %s", fo, e)

    def _record_known(self, fo: str, idx: int, block_id: str) -> None:
        known = self.known_blocks(fo)
        first = idx not in known
        try:
            self.index.set_fo_block(fo, idx, block_id)
        except sqlite3.OperationalError as e:
            raise CacheFull(f"cache index in {self.dir}: {e}") from None
        known[idx] = block_id
        if first and self.report_learned and len(self.learned) < MAX_LEARNED:
            self.learned.append((fo, idx, block_id))  # reported to the control plane's manifest

    def learn_block(self, fo: str, idx: int, block_id: str) -> None:
        """Take a block id from the cluster's manifest: later fetches are verified against it."""
        known = self.known_blocks(fo)
        if known.get(idx) != block_id:
            self.index.set_fo_block(fo, idx, block_id)
            known[idx] = block_id

    def _check_space(self, size: int) -> None:
        short = self._space_short(size)
        if short:
            self._pressure.set()
            raise CacheFull(short)

    def _space_short(self, size: int) -> str | None:
        """Why ``size`` more bytes would break the free-disk reserve, or None (any thread)."""
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if free - size < self.min_free_disk:
            return (f"cache filesystem of {self.dir} has {free} bytes free, "
                    f"below the reserve of {self.min_free_disk} bytes")
        return None

    # -- eviction ------------------------------------------------------

    def evict(self, target_bytes: int) -> int:
        """Evict unpinned, unused blocks until at most ``target_bytes`` are cached."""
        if self.bytes <= target_bytes:
            return 0
        self.flush_access()
        candidates = [s for s in self.index.eviction_candidates() if s.id not in self._in_use]
        victims = select_victims(candidates, self.bytes - target_bytes, time.time())
        self.drop_blocks(victims)
        if self.bytes > target_bytes:
            log.warning("cache holds %d bytes over its target of %d: the rest is pinned or in use",
                        self.bytes - target_bytes, target_bytes)
        return len(victims)

    def drop_blocks(self, ids: list[str]) -> None:
        ids = [i for i in ids if i in self._present and i not in self._in_use]
        self._remove(ids)
        self.evicted_blocks += len(ids)

    def _remove(self, ids: list[str]) -> None:
        """Remove present blocks: counts, descriptors, files, index rows."""
        # Readers pread a descriptor without an await in between, so closing
        # it here never cuts a read short; the next read refetches.
        for i in ids:
            self.bytes -= self._present.pop(i)
            self._close_fd(i)
            self.store.remove(i)
        self.index.remove_blocks(ids)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service: group commits, access statistics, eviction down to the low watermark under pressure."""
        task_status.started()
        while True:
            with trio.move_on_after(self.commit_interval):
                await self._pressure.wait()
            self._pressure = trio.Event()
            try:
                await self._housekeeping()
            except (OSError, sqlite3.Error) as e:
                # A full or failing cache disk must not take the agent down:
                # reads of cached blocks keep working; this is retried.
                log.error("cache housekeeping failed: %s", e)

    async def _housekeeping(self) -> None:
        await self.commit()
        self.flush_access()
        q = self.quota
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        target = int(q * self.low_watermark)
        if free < self.min_free_disk:
            target = min(target, max(0, self.bytes - (self.min_free_disk - free)))
        if self.bytes > q * self.high_watermark or free < self.min_free_disk:
            n = self.evict(target)
            if n:
                log.info("evicted %d blocks; cache now %d bytes (quota %d)", n, self.bytes, q)


def _lock_cache_dir(path: Path) -> int:
    """Hold ``path/lock`` (flock) for the life of the cache: one agent per cache directory.

    A second agent would delete the first one's temp files in its start-up
    scan and evict under it. The kernel drops the lock when the process
    dies, so a crashed agent never leaves it behind.
    """
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentAlreadyRunning(f"an agent is already running on the cache directory {path}") from None
    return fd
