"""Unit tests for syncbit.fetch.fetcher.Fetcher with an in-memory source (no network, no kernel)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from syncbit.cache import BlockCache
from syncbit.errors import FetchFailed, SourceChanged, SourceNotFound, TemporarySourceError
from syncbit.fetch.fetcher import Fetcher
from syncbit.model import FileEntry, Snapshot, block_span, content_id
from syncbit.sources.base import Source

BS = 1024
DATA = bytes((i * 7 + i // 1024) % 251 for i in range(5 * BS + 500))  # five full blocks and a 500-byte tail
NBLOCKS = 6


def blk(data: bytes, idx: int) -> bytes:
    off, n = block_span(len(data), BS, idx)
    return data[off:off + n]


class MemSource(Source):
    """A source serving files from memory that counts requests and misbehaves on demand."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__("mem://test/")
        self.files = dict(files)
        self.requests: list[tuple[str, int, int]] = []
        self.temporary_failures = 0                   # fail this many requests with a 503
        self.permanent_error: BaseException | None = None
        self.short_by = 0                             # deliver this many bytes too few
        self.chunk = 0                                # sink call size (0: the whole body at once)
        self.gate: trio.Event | None = None           # requests wait for it while it is set

    async def resolve(self) -> Snapshot:
        return Snapshot(uri=self.uri, revision="r1", files=tuple(
            FileEntry(path=p, size=len(d), locator=p, validator="v1", file_object=f"fo-{p}")
            for p, d in self.files.items()))

    async def read_range(self, entry, offset, length, sink):
        self.requests.append((entry.locator, offset, length))
        await trio.sleep(0)  # a real source awaits the network here
        if self.gate is not None:
            await self.gate.wait()
        if self.temporary_failures > 0:
            self.temporary_failures -= 1
            raise TemporarySourceError("503 Service Unavailable from origin")
        if self.permanent_error is not None:
            raise self.permanent_error
        body = self.files[entry.locator][offset:offset + length]
        if self.short_by:
            body = body[:max(0, len(body) - self.short_by)]
        step = self.chunk or max(1, len(body))
        for i in range(0, len(body), step):
            await sink(body[i:i + step])


def make_entry(data: bytes = DATA, path: str = "w.bin", fo: str = "fo-w") -> FileEntry:
    return FileEntry(path=f"data/{path}", size=len(data), locator=path, validator="etag-1", file_object=fo)


@pytest.fixture
def cache(tmp_path):
    c = BlockCache(tmp_path / "cache", quota=10**9)
    c.open()
    yield c
    c.index.close()


@pytest.fixture
def source():
    return MemSource({"w.bin": DATA, "empty.bin": b""})


@pytest.fixture
async def fetcher(cache, nursery):
    # The nursery fixture is cancelled when the test ends, which stops Fetcher.run.
    f = Fetcher(cache, block_size=BS, deadline=30.0)
    await nursery.start(f.run)
    return f


def stored(cache: BlockCache, bid: str) -> bytes:
    return Path(cache.store.path(bid)).read_bytes()


async def wait_present(cache: BlockCache, fo: str, idxs) -> None:
    with trio.fail_after(10):
        while any(cache.present_block(fo, i) is None for i in idxs):
            await trio.sleep(0.005)


# -- single flight ---------------------------------------------------------------


async def test_concurrent_reads_of_one_block_make_one_request(fetcher, source, cache):
    entry = make_entry()
    results = []

    async def reader():
        results.append(await fetcher.read_block(source, entry, 2))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(reader)
    want = content_id(blk(DATA, 2))
    assert results == [want] * 10
    assert source.requests == [("w.bin", 2 * BS, BS)]
    assert stored(cache, want) == blk(DATA, 2)
    # Later reads are served from the cache.
    assert await fetcher.read_block(source, entry, 2) == want
    assert len(source.requests) == 1


async def test_readers_of_blocks_in_one_run_share_its_request(fetcher, source, cache):
    entry = make_entry()
    source.chunk = 300  # the body arrives in pieces that straddle block boundaries
    results = {}

    async def reader(i):
        results[i] = await fetcher.read_block(source, entry, i, readahead_blocks=NBLOCKS)

    async with trio.open_nursery() as n:
        n.start_soon(reader, 0)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, NBLOCKS):
            n.start_soon(reader, i)
    assert source.requests == [("w.bin", 0, len(DATA))]
    assert results == {i: content_id(blk(DATA, i)) for i in range(NBLOCKS)}
    assert fetcher.bytes_from_source == len(DATA)
    assert len(stored(cache, results[5])) == 500  # the short last block


async def test_readahead_fetches_in_the_background(fetcher, source, cache):
    entry = make_entry()
    fetcher.readahead(source, entry, 1, 4)  # no await; nothing ahead: one run of half the window
    await wait_present(cache, entry.file_object, [1, 2])
    assert source.requests == [("w.bin", BS, 2 * BS)]
    assert cache.present_block(entry.file_object, 0) is None
    fetcher.readahead(source, entry, 1, 4)  # half the window covered: the next half-window run
    await wait_present(cache, entry.file_object, [3, 4])
    assert source.requests[-1] == ("w.bin", 3 * BS, 2 * BS)
    fetcher.readahead(source, entry, 1, 4)  # the whole window is covered: nothing to do
    await trio.testing.wait_all_tasks_blocked()
    assert len(source.requests) == 2
    assert cache.present_block(entry.file_object, 5) is None


async def test_a_cancelled_reader_does_not_cancel_the_fetch_for_others(fetcher, source):
    entry = make_entry()
    source.gate = trio.Event()
    got = []

    async def patient():
        got.append(await fetcher.read_block(source, entry, 0))

    async with trio.open_nursery() as n:
        with trio.CancelScope() as impatient:
            n.start_soon(patient)
            await trio.testing.wait_all_tasks_blocked()
            impatient.cancel()
            await fetcher.read_block(source, entry, 0)  # cancelled at once
        source.gate.set()
    assert got == [content_id(blk(DATA, 0))]
    assert len(source.requests) == 1


# -- retries and errors ------------------------------------------------------------


async def test_temporary_errors_are_retried(fetcher, source):
    entry = make_entry()
    source.temporary_failures = 2
    assert await fetcher.read_block(source, entry, 1) == content_id(blk(DATA, 1))
    assert source.requests == [("w.bin", BS, BS)] * 3


async def test_a_run_that_keeps_failing_ends_at_the_deadline(fetcher, source, autojump_clock):
    # The origin answers 503 forever; every waiter gets FetchFailed naming the last error.
    entry = make_entry()
    source.temporary_failures = 10**9
    errors = []

    async def reader():
        try:
            await fetcher.read_block(source, entry, 0)
        except FetchFailed as e:
            errors.append(e)

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(reader)
    assert len(errors) == 3
    assert "503" in str(errors[0]) and entry.path in str(errors[0])
    assert trio.current_time() - t0 == pytest.approx(fetcher.deadline)
    assert len(source.requests) > 5
    # The failure is not remembered: once the origin is back, a read fetches again.
    autojump_clock.autojump_threshold = math.inf  # threads store blocks from here on
    source.temporary_failures = 0
    n_before = len(source.requests)
    assert await fetcher.read_block(source, entry, 0) == content_id(blk(DATA, 0))
    assert len(source.requests) == n_before + 1


async def test_a_permanent_error_reaches_every_waiter(fetcher, source):
    entry = make_entry()
    source.permanent_error = SourceNotFound("w.bin: 404 Not Found")
    errors = []

    async def reader():
        try:
            await fetcher.read_block(source, entry, 3)
        except SourceNotFound as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(reader)
    assert len(errors) == 10
    assert len(source.requests) == 1  # not retried
    source.permanent_error = None
    assert await fetcher.read_block(source, entry, 3) == content_id(blk(DATA, 3))


async def test_an_untranslated_source_error_does_not_kill_the_fetcher(fetcher, source):
    # A source bug: a builtin error instead of a SourceError.
    entry = make_entry()
    source.permanent_error = RuntimeError("boom")
    with pytest.raises(FetchFailed):
        await fetcher.read_block(source, entry, 0)
    source.permanent_error = None
    await trio.testing.wait_all_tasks_blocked()
    assert await fetcher.read_block(source, entry, 1) == content_id(blk(DATA, 1))


async def test_bytes_differing_from_a_recorded_block_id_raise_source_changed(fetcher, source, cache):
    entry = make_entry()
    old = await fetcher.read_block(source, entry, 1)
    cache.drop_blocks([old])  # evicted; its id stays recorded for the file object
    # The origin now serves other bytes under the same name and validator.
    changed = bytearray(DATA)
    changed[BS + 10] ^= 0xFF
    source.files["w.bin"] = bytes(changed)
    with pytest.raises(SourceChanged):
        await fetcher.read_block(source, entry, 1)
    assert len(source.requests) == 2  # a changed source is not retried
    new_id = content_id(blk(bytes(changed), 1))
    assert not cache.has_block(new_id) and not os.path.exists(cache.store.path(new_id))
    assert cache.known_blocks(entry.file_object)[1] == old  # the recorded id is not overwritten


async def test_a_short_body_raises_source_changed(fetcher, source, cache):
    # The origin's file is shorter than the snapshot says.
    entry = make_entry()
    source.short_by = 100
    with pytest.raises(SourceChanged, match="fewer bytes"):
        await fetcher.read_block(source, entry, 2)
    assert len(source.requests) == 1
    assert cache.present_block(entry.file_object, 2) is None


async def test_blocks_received_before_a_failure_are_kept(fetcher, source, cache):
    # The body stops 600 bytes early: blocks 0-3 arrive whole, block 4 half, block 5 never.
    entry = make_entry()
    source.short_by = 600
    with pytest.raises(SourceChanged):
        await fetcher.prefetch_run(source, entry, 0, NBLOCKS)
    for i in range(4):
        assert cache.present_block(entry.file_object, i) == content_id(blk(DATA, i)), i
    assert cache.present_block(entry.file_object, 4) is None


# -- prefetch -----------------------------------------------------------------------


def present(cache: BlockCache, entry: FileEntry) -> list[int]:
    return [i for i in range(NBLOCKS) if cache.present_block(entry.file_object, i) is not None]


async def test_prefetch_run_fetches_a_contiguous_run_with_one_request(fetcher, source, cache):
    entry = make_entry()
    source.chunk = 700
    await fetcher.prefetch_run(source, entry, 0, NBLOCKS)
    assert source.requests == [("w.bin", 0, len(DATA))]
    for i in range(NBLOCKS):
        bid = cache.present_block(entry.file_object, i)
        assert bid == content_id(blk(DATA, i)) and stored(cache, bid) == blk(DATA, i)
    assert fetcher.bytes_from_source == len(DATA)
    assert not any(fetcher.in_flight(entry, i) for i in range(NBLOCKS))
    # Everything is cached: nothing more is requested.
    await fetcher.prefetch_run(source, entry, 0, NBLOCKS)
    assert len(source.requests) == 1


async def test_prefetch_run_with_block_sized_chunks(fetcher, source, cache):
    # Chunks that are exactly one block each (the no-copy path) and a short last one.
    entry = make_entry()
    source.chunk = BS
    await fetcher.prefetch_run(source, entry, 0, NBLOCKS)
    for i in range(NBLOCKS):
        assert stored(cache, cache.present_block(entry.file_object, i)) == blk(DATA, i)


async def test_prefetch_run_stops_at_a_present_block(fetcher, source, cache):
    entry = make_entry()
    await fetcher.read_block(source, entry, 3)
    await fetcher.prefetch_run(source, entry, 0, NBLOCKS)   # 0..2 in one request, stops before 3
    assert present(cache, entry) == [0, 1, 2, 3]
    await fetcher.prefetch_run(source, entry, 3, NBLOCKS)   # present: no request
    await fetcher.prefetch_run(source, entry, 4, 10)        # 4..5, capped at the end of the file
    assert present(cache, entry) == list(range(NBLOCKS))
    assert source.requests == [("w.bin", 3 * BS, BS), ("w.bin", 0, 3 * BS), ("w.bin", 4 * BS, BS + 500)]


async def test_prefetch_run_respects_max_blocks(fetcher, source, cache):
    entry = make_entry()
    await fetcher.prefetch_run(source, entry, 1, 2)
    assert source.requests == [("w.bin", BS, 2 * BS)]
    assert present(cache, entry) == [1, 2]


async def test_prefetch_run_does_not_refetch_blocks_in_flight(fetcher, source, cache):
    entry = make_entry()
    source.gate = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(fetcher.read_block, source, entry, 2)   # claims block 2 and waits at the source
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.in_flight(entry, 2)
        n.start_soon(fetcher.prefetch_run, source, entry, 2, NBLOCKS)  # must not claim block 2 again
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    assert source.requests == [("w.bin", 2 * BS, BS)]


async def test_a_cancelled_prefetch_lets_waiters_fetch_again(fetcher, source, cache):
    entry = make_entry()
    source.gate = trio.Event()  # the prefetch's request hangs
    got = []

    async def reader():
        got.append(await fetcher.read_block(source, entry, 1))

    scope = trio.CancelScope()

    async def prefetch():
        with scope:
            await fetcher.prefetch_run(source, entry, 0, NBLOCKS)

    async with trio.open_nursery() as n:
        n.start_soon(prefetch)               # claims blocks 0..5
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(reader)                 # waits on the prefetch's flight for block 1
        await trio.testing.wait_all_tasks_blocked()
        assert source.requests == [("w.bin", 0, len(DATA))]
        source.gate = None                   # later requests go through
        scope.cancel()                       # e.g. the dataset was unassigned mid-prefetch
    assert got == [content_id(blk(DATA, 1))]
    assert source.requests[1:] == [("w.bin", BS, BS)]
    assert not any(fetcher.in_flight(entry, i) for i in range(NBLOCKS))


async def test_empty_file_needs_no_request(fetcher, source, cache):
    entry = make_entry(b"", path="empty.bin", fo="fo-empty")
    await fetcher.prefetch_run(source, entry, 0, 4)
    assert source.requests == []
    assert cache.known_blocks("fo-empty") == {}


def test_git_sha1_digest_is_git_blob_id(tmp_path):
    """The digest hf:// small files carry is git's blob id, computed over the blocks in order."""
    import subprocess

    from syncbit.fetch.fetcher import _digest_of

    data = b"hello world\n" * 1000
    parts = [data[:5000], data[5000:9000], data[9000:]]
    fds = []
    for i, part in enumerate(parts):
        p = tmp_path / f"b{i}"
        p.write_bytes(part)
        fds.append(os.open(p, os.O_RDONLY))
    (tmp_path / "whole").write_bytes(data)
    try:
        want = subprocess.run(["git", "hash-object", str(tmp_path / "whole")], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert _digest_of("git-sha1", fds) == want
        assert _digest_of("sha256", fds) == hashlib.sha256(data).hexdigest()
    finally:
        for fd in fds:
            os.close(fd)


async def test_verify_closes_the_block_files_it_opened_when_one_is_missing(fetcher, source, cache):
    # The block files were opened in one list comprehension: when one was
    # missing, those opened before it were never closed (3 per attempt).
    data = DATA[:4 * BS]
    entry = make_entry(data, fo="fo-v")
    source.files["w.bin"] = data
    for i in range(4):
        await fetcher.read_block(source, entry, i)
    entry = FileEntry(path=entry.path, size=entry.size, locator=entry.locator, validator=entry.validator,
                      file_object=entry.file_object, digest="sha256:" + hashlib.sha256(data).hexdigest())
    os.unlink(cache.store.path(cache.present_block("fo-v", 3)))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(FileNotFoundError):
            await fetcher.verify_file(entry)
    assert len(os.listdir("/proc/self/fd")) == before
