"""Single-flight block fetches.

A *run* is a contiguous range of blocks of one file fetched with one source
request and cut into blocks as the bytes stream in; each block is hashed,
checked against the id recorded for it (if one is known), written to the
cache and announced to its waiters as soon as it is complete, so a reader
waiting for the first block of a run does not wait for the rest.

Concurrent misses of one block share one fetch: ``_flights`` maps
(file object, block index) to a ``_Flight`` whose event fires when the block
is in the cache or the run failed. Claiming blocks happens without an
``await`` between the check and the insert, so two tasks cannot claim the
same block.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import partial

import trio

from ..cache import BlockCache
from ..errors import BlockCorrupt, DigestMismatch, FetchFailed, SourceChanged, SyncbitError, collapse_groups
from ..metrics import BYTES, FETCH_SECONDS
from ..model import FileEntry, block_count, block_span
from ..sources.base import Source, Spool
from ..sources.retry import Retrier
from .partial import PartialBlock

log = logging.getLogger(__name__)
_FROM_SOURCE = BYTES.labels(origin="source")
_SOURCE_LATENCY = FETCH_SECONDS.labels(origin="source")
_PEER_LATENCY = FETCH_SECONDS.labels(origin="peer")

# Blocks received and not yet stored, across all runs: bounds the memory of
# fetching (16 x 4 MiB) whatever the number of runs.
BLOCKS_IN_MEMORY = 16
# With peers, source bodies are read in pieces this big, so that the blocks
# they fill can be relayed to other nodes while they arrive.
RELAY_CHUNK = 256 * 1024


@dataclass
class _Flight:
    event: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Fetcher:
    def __init__(
        self,
        cache: BlockCache,
        *,
        block_size: int,
        deadline: float,
        read_concurrency: int = 8,
        prefetch_concurrency: int = 4,
    ) -> None:
        self.cache = cache
        self.block_size = block_size
        self.deadline = deadline
        self.read_limiter = trio.CapacityLimiter(read_concurrency)
        self.prefetch_limiter = trio.CapacityLimiter(prefetch_concurrency)
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._memory = trio.Semaphore(BLOCKS_IN_MEMORY)
        self._verifying: dict[str, _Flight] = {}
        self._digest_failures: dict[str, DigestMismatch] = {}  # file object -> its last failed check
        self._hash_limiter = trio.CapacityLimiter(1)  # whole-file digests: one file at a time
        self.bytes_from_source = 0
        self.runs = 0
        self.peers = None  # a peer.swarm.Swarm when the agent has peers
        self.on_stored = None  # called with (file object, index, block id) for every block stored
        # Blocks being received from the source, readable as they arrive (with
        # peers: ``relaying``), until they are stored.
        self.relaying = False
        self.partials: dict[tuple[str, int], PartialBlock] = {}
        self._stored = trio.Event()  # set and replaced at every block stored

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service: hosts the background runs that readers start."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- entry points --------------------------------------------------------

    async def read_block(self, source: Source, entry: FileEntry, idx: int, readahead_blocks: int = 0) -> str:
        """Return the id of block ``idx`` of ``entry``, fetching it if needed."""
        key = (entry.file_object, idx)
        while True:
            bid = self.cache.present_block(entry.file_object, idx)
            if bid is not None:
                return bid
            flight = self._flights.get(key)
            if flight is None:
                end = self._run_end(source, entry, idx, 1 + readahead_blocks)
                self.start_run(source, entry, idx, end, self.read_limiter)
                flight = self._flights[key]
            await flight.event.wait()
            if flight.error is not None:
                raise flight.error

    def readahead(self, source: Source, entry: FileEntry, idx: int, nblocks: int) -> None:
        """Keep ``nblocks`` ahead of a sequential reader at ``idx`` in flight (no await).

        When less than half the window is covered, one run of half a window
        starts at the first block not yet covered: long runs, few requests.
        """
        total = block_count(entry.size, self.block_size)
        j = idx
        while j < min(total, idx + nblocks) and (
            self.in_flight(entry, j) or self.cache.present_block(entry.file_object, j) is not None
        ):
            j += 1
        if j < total and j - idx <= nblocks // 2:
            self.start_run(source, entry, j, self._run_end(source, entry, j, max(1, nblocks // 2)),
                           self.read_limiter)

    async def prefetch_run(self, source: Source, entry: FileEntry, idx: int, max_blocks: int) -> None:
        """Fetch the missing blocks from ``idx`` on (up to ``max_blocks``) in this task.

        The caller holds ``prefetch_limiter`` around choosing ``idx`` and this
        call, so that runs are claimed in order and stay long (trio schedules
        tasks in random order). With peers, blocks that cannot be had now
        (another node is fetching them) are left for a later pass.
        """
        claimed = self._claim(entry, idx, self._run_end(source, entry, idx, max_blocks))
        if claimed:
            await self._fetch(source, entry, claimed, prefetch=True)

    async def fetch_from_source(self, source: Source, entry: FileEntry, idxs: list[int]) -> None:
        """Fetch blocks ``idxs`` of ``entry`` from the source (prefetch of blocks the tracker granted us).

        Blocks already cached or in flight are left alone; contiguous ones
        come in one request.
        """
        claimed = [i for i in sorted(set(idxs)) if self._claim(entry, i, i + 1)]
        try:
            for segment in _contiguous(claimed):
                await self._fetch_source(source, entry, segment)
        except BaseException as e:
            self._fail(entry, claimed, e)
            raise

    async def fetch_from_peers(self, entry: FileEntry, idx: int, block_id: str, addresses: list[str]) -> str:
        """Fetch block ``idx`` from the holders the tracker named (prefetch).

        Returns "done" (stored, or already cached or in flight: someone has it
        in hand), "busy" (a holder had no free upload slot: try again later)
        or "failed" (no holder gave it: dead, refusing or wrong).
        """
        busy = False

        async def get() -> bytes | None:
            nonlocal busy
            data, busy = await self.peers.from_holders(entry, idx, block_id, addresses)
            return data

        if await self._store_from_peer(entry, idx, get):
            return "done"
        return "busy" if busy else "failed"

    async def fetch_from_relay(self, entry: FileEntry, idx: int, address: str) -> bool:
        """Fetch block ``idx`` from the node at ``address`` while it arrives there from the source (prefetch).

        Returns False when that node could not give it; the block is then
        left for a later pass (from its holders by then), not the source.
        """
        async def get() -> bytes | None:
            recorded = self.cache.known_blocks(entry.file_object).get(idx)
            return await self.peers.from_relay(entry, idx, address, recorded)

        return await self._store_from_peer(entry, idx, get)

    async def _store_from_peer(self, entry: FileEntry, idx: int, get) -> bool:
        """Claim block ``idx``, ``await get()`` its verified bytes from a peer and store them.

        True when stored (or someone else has the block in hand); False when
        ``get`` gave nothing: the claim is released without an error, for a
        later pass or a reader.
        """
        if not self._claim(entry, idx, idx + 1):
            return True
        try:
            data = await get()
            if data is None:
                self._flights.pop((entry.file_object, idx)).event.set()
                return False
            await self._memory.acquire()
            await self._complete(entry, idx, data, self._memory, trio.current_time(), origin="peer")
            return True
        except BaseException as e:
            self._fail(entry, [idx], e)
            raise

    async def verify_file(self, entry: FileEntry) -> bool:
        """Check a complete file against the whole-file digest its source gave (single flight).

        Returns True when the file is verified (or has no digest), False when
        some of its blocks are not in the cache. Raises DigestMismatch, after
        forgetting the file's blocks, when the bytes do not match.
        """
        if not entry.digest:
            return True
        while True:
            if self.cache.is_verified(entry.file_object, entry.digest):
                return True
            flight = self._verifying.get(entry.file_object)
            if flight is None:
                break
            await flight.event.wait()
            if flight.error is not None:
                raise flight.error
        flight = self._verifying[entry.file_object] = _Flight()
        try:
            return await self._verify(entry)
        except BaseException as e:
            flight.error = e if isinstance(e, Exception) else None
            raise
        finally:
            del self._verifying[entry.file_object]
            flight.event.set()

    async def _verify(self, entry: FileEntry) -> bool:
        ids = [self.cache.present_block(entry.file_object, i) for i in range(block_count(entry.size, self.block_size))]
        if None in ids:
            failure = self._digest_failures.get(entry.file_object)
            if failure is not None:
                raise failure  # incomplete because its blocks were just dropped: say why
            return False
        algo, _, want = entry.digest.partition(":")
        for bid in ids:
            self.cache.hold(bid)  # not evicted while being read
        fds: list[int] = []
        try:
            for bid in ids:  # one by one: those opened before a missing one are closed below
                fds.append(self.cache.store.open(bid))
            got = await trio.to_thread.run_sync(_digest_of, algo, fds, limiter=self._hash_limiter)
        finally:
            for fd in fds:
                os.close(fd)
            for bid in ids:
                self.cache.release(bid)
        if got != want:
            self.cache.forget_file_object(entry.file_object)
            failure = self._digest_failures[entry.file_object] = DigestMismatch(
                f"{entry.path}: whole-file {algo} of the fetched bytes is {got}, the source's metadata says "
                f"{want}; the file's cached blocks were dropped and will be fetched again"
            )
            raise failure
        self._digest_failures.pop(entry.file_object, None)
        self.cache.mark_verified(entry.file_object, entry.digest)
        log.debug("verified %s (%s)", entry.path, entry.digest)
        return True

    async def _verify_in_background(self, entry: FileEntry) -> None:
        try:
            await self.verify_file(entry)
        except DigestMismatch as e:
            log.error("file failed verification: %s", e)
        except (SyncbitError, OSError) as e:
            log.warning("could not verify %s: %s", entry.path, e)

    @property
    def busy(self) -> bool:
        """Some block is being fetched."""
        return bool(self._flights)

    async def block_stored(self) -> None:
        """Wait until the next block is stored."""
        await self._stored.wait()

    def in_flight(self, entry: FileEntry, idx: int) -> bool:
        return (entry.file_object, idx) in self._flights

    def start_run(self, source: Source, entry: FileEntry, idx: int, end: int, limiter: trio.CapacityLimiter) -> None:
        assert self._nursery is not None, "Fetcher.run must be started first"
        claimed = self._claim(entry, idx, end)
        if claimed:
            self._nursery.start_soon(self._limited_fetch, source, entry, claimed, limiter)

    # -- internals ---------------------------------------------------------

    def _run_end(self, source: Source, entry: FileEntry, idx: int, nblocks: int) -> int:
        total = block_count(entry.size, self.block_size)
        if source.prefers_whole_file(entry):
            return total  # each request restarts at byte 0: take the rest in one go
        return min(total, idx + max(1, nblocks))

    def _claim(self, entry: FileEntry, idx: int, end: int) -> list[int]:
        # No await in here: check-and-insert must be atomic for single flight.
        claimed = []
        for i in range(idx, end):
            key = (entry.file_object, i)
            if key in self._flights or self.cache.present_block(entry.file_object, i) is not None:
                break
            self._flights[key] = _Flight()
            claimed.append(i)
        return claimed

    async def _limited_fetch(self, source, entry, claimed, limiter) -> None:
        try:
            async with limiter:
                await self._fetch(source, entry, claimed)
        except Exception:
            pass  # already logged and delivered to the waiters; the service goes on

    async def _fetch(self, source: Source, entry: FileEntry, claimed: list[int], prefetch: bool = False) -> None:
        """Fetch the contiguous blocks ``claimed`` (from peers, then the source) and settle their flights.

        A source stream is cut into blocks by ``_fetch_once``; each block is
        stored (hash, write, rename: in a thread) by its own task so that
        storing overlaps receiving, with at most ``BLOCKS_IN_MEMORY`` blocks
        waiting to be stored across all runs.
        """
        self.runs += 1
        released: set[int] = set()  # flights given up early: another run may own them now
        try:
            remaining = list(claimed)
            if self.peers is not None:
                # Peers first: blocks other nodes hold cost the source nothing;
                # blocks the tracker grants us come from the source meanwhile.
                async def from_source(idxs: list[int]) -> None:
                    for segment in _contiguous(idxs):
                        await self._fetch_source(source, entry, segment)

                async def from_peer(idx: int, data: bytes) -> None:
                    if (entry.file_object, idx) in self._flights:
                        await self._memory.acquire()
                        await self._complete(entry, idx, data, self._memory, trio.current_time(), origin="peer")

                def release(idxs: list[int]) -> None:
                    for idx in idxs:
                        if idx in released:
                            continue
                        released.add(idx)
                        # Left for a later prefetch pass: released without an
                        # error, so a reader waiting on it claims it again itself.
                        flight = self._flights.pop((entry.file_object, idx), None)
                        if flight is not None:
                            flight.event.set()

                _, deferred = await self.peers.fetch_blocks(entry, remaining, from_source, from_peer, release,
                                                            prefetch=prefetch)
                release(deferred)
                remaining = [i for i in remaining if i not in released and (entry.file_object, i) in self._flights]
            for segment in _contiguous(remaining):
                await self._fetch_source(source, entry, segment)
        except BaseException as e:
            self._fail(entry, [i for i in claimed if i not in released], e)
            raise

    def _end_partial(self, fo: str, idx: int, block_id: str | None = None) -> None:
        """Block ``idx`` of ``fo`` is stored as ``block_id``, or (None) will not be: its relays end."""
        partial = self.partials.pop((fo, idx), None)
        if partial is None:
            return
        if block_id is None:
            partial.fail()
        else:
            partial.stored(block_id)

    def _fail(self, entry: FileEntry, claimed: list[int], e: BaseException) -> None:
        """Settle the flights of ``claimed`` blocks that did not arrive, with the error (none if cancelled)."""
        err = e if isinstance(e, SyncbitError) else FetchFailed(f"{entry.path}: {type(e).__name__}: {e}")
        if isinstance(e, Exception) and claimed:
            log.error("fetch failed: file %s blocks %d-%d: %s", entry.path, claimed[0], claimed[-1], err)
        for i in claimed:
            self._end_partial(entry.file_object, i)
            flight = self._flights.pop((entry.file_object, i), None)
            if flight is not None:
                # A cancelled run leaves no error: waiters simply claim again.
                flight.error = err if isinstance(e, Exception) else None
                flight.event.set()

    async def _fetch_source(self, source: Source, entry: FileEntry, claimed: list[int]) -> None:
        """One source run for the contiguous blocks ``claimed`` (retried until the deadline)."""
        todo = list(claimed)  # blocks not yet received; a retry resumes at todo[0]
        retrier = Retrier(source.is_temporary, what=f"fetching {entry.path}")
        slots = self._memory
        stream_error: Exception | None = None
        with collapse_groups():
            async with trio.open_nursery() as stores:
                # A failed stream must not cancel the stores of blocks that
                # arrived whole before it: keep its error until they finish.
                try:
                    with trio.move_on_after(self.deadline) as scope:
                        await retrier.run(lambda: self._fetch_once(source, entry, todo, stores, slots))
                    if scope.cancelled_caught:
                        raise FetchFailed(
                            f"{entry.path}: block {todo[0]} not fetched within {self.deadline:.0f}s: "
                            f"{retrier.last_error}"
                        )
                except Exception as e:
                    stream_error = e
        if stream_error is not None:
            raise stream_error

    async def _fetch_once(self, source: Source, entry: FileEntry, todo: list[int], stores: trio.Nursery,
                          slots: trio.Semaphore) -> None:
        """One source request for the blocks in ``todo`` (received blocks leave it)."""
        if entry.size == 0 or not todo:
            return
        start, _ = block_span(entry.size, self.block_size, todo[0])
        last_start, last_len = block_span(entry.size, self.block_size, todo[-1])
        buf = bytearray()

        def want() -> int:
            return block_span(entry.size, self.block_size, todo[0])[1]

        started = trio.current_time()

        async def hand_off(data: bytes) -> None:
            await slots.acquire()  # backpressure: bounded blocks in memory
            stores.start_soon(self._complete, entry, todo.pop(0), data, slots, started)

        def count(n: int) -> None:
            self.bytes_from_source += n
            _FROM_SOURCE.inc(n)

        async def sink(chunk: bytes) -> None:
            count(len(chunk))
            if not buf and todo and len(chunk) == want():
                await hand_off(chunk)  # a chunk that is exactly a block: no copy
                return
            buf.extend(chunk)
            while todo and len(buf) >= want():
                n = want()
                data = bytes(buf[:n])
                del buf[:n]
                await hand_off(data)

        async def relay_sink(chunk: bytes) -> None:
            # Each block fills its PartialBlock, which peers read as it fills;
            # the full buffer itself is what gets stored (no copy).
            count(len(chunk))
            view = memoryview(chunk)
            while view and todo:
                partial = self.partials[(entry.file_object, todo[0])]
                view = view[partial.write(view):]
                if partial.full:
                    await hand_off(partial.buf)

        async def spooled(block) -> None:
            # A block the source wrote into the cache itself (plain HTTP: os.splice).
            block.handed = True
            count(len(block))
            try:
                await hand_off(block)
            except BaseException:  # cancelled while waiting for a slot: nobody stores it
                block.discard()
                raise

        if self.relaying:
            for i in todo:
                old = self.partials.get((entry.file_object, i))
                if old is None or old.filled:
                    # A retry starts again at the first missing block: its relays so far end unfinished.
                    self._end_partial(entry.file_object, i)
                    self.partials[(entry.file_object, i)] = PartialBlock(block_span(entry.size, self.block_size, i)[1])
            sink = relay_sink
            sink.chunk_size = RELAY_CHUNK
        else:
            # Relays read blocks from memory as they arrive; without peers a
            # source may write blocks into the cache itself.
            sink.spool = Spool(self.block_size, partial(self.cache.spool, self.block_size), spooled)
        await source.read_range(entry, start, last_start + last_len - start, sink)
        if todo:
            raise SourceChanged(f"{entry.locator}: source delivered fewer bytes than the snapshot says")

    async def _complete(self, entry: FileEntry, idx: int, data: bytes, slots: trio.Semaphore,
                        started: float, origin: str = "source") -> None:
        expected = self.cache.known_blocks(entry.file_object).get(idx)
        try:
            bid = await self.cache.put(entry.file_object, idx, data, expected)
        except BlockCorrupt as e:
            raise SourceChanged(f"{entry.locator} block {idx}: bytes differ from the ones recorded earlier ({e})") \
                from None
        except BaseException:
            self._end_partial(entry.file_object, idx)
            raise
        finally:
            slots.release()
        self._end_partial(entry.file_object, idx, bid)
        flight = self._flights.pop((entry.file_object, idx))
        flight.event.set()
        self._stored.set()
        self._stored = trio.Event()
        if self.on_stored is not None:
            self.on_stored(entry.file_object, idx, bid)
        (_SOURCE_LATENCY if origin == "source" else _PEER_LATENCY).observe(trio.current_time() - started)
        if (entry.digest and self._nursery is not None
                and len(self.cache.known_blocks(entry.file_object)) == block_count(entry.size, self.block_size)
                and entry.file_object not in self._verifying):
            # Possibly the file's last block: check the whole file now, also
            # for files only ever read through the mount.
            self._nursery.start_soon(self._verify_in_background, entry)


def _contiguous(idxs: list[int]) -> list[list[int]]:
    """[3, 4, 5, 8, 9] -> [[3, 4, 5], [8, 9]]: one source request per contiguous range."""
    out: list[list[int]] = []
    for i in idxs:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _digest_of(algo: str, fds: list[int]) -> str:
    """Hash the concatenation of the files ``fds`` (worker thread; hashlib releases the GIL).

    ``git-sha1`` is git's blob id: SHA-1 over a ``blob <size>\\0`` header and the content.
    """
    if algo == "git-sha1":
        h = hashlib.sha1(b"blob %d\0" % sum(os.fstat(fd).st_size for fd in fds))
    else:
        try:
            h = hashlib.new(algo)
        except ValueError:
            raise DigestMismatch(f"unknown digest algorithm {algo!r} in the source's metadata") from None
    buf = bytearray(4 * 2**20)
    view = memoryview(buf)
    for fd in fds:
        pos = 0
        while n := os.preadv(fd, [view], pos):
            h.update(view[:n])
            pos += n
    return h.hexdigest()
