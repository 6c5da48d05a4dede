"""Unit tests for syncbit.cache.cache.BlockCache: dedup, quota eviction with pins and holds, crash recovery."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from syncbit.cache import BlockCache
from syncbit.cache.index import Index
from syncbit.cache.store import BlockStore
from syncbit.errors import BlockCorrupt, CacheFull
from syncbit.model import FileEntry, Snapshot, content_id

BLOCK = 100  # bytes per test block
QUOTA = 1000  # ten blocks; high watermark 950, low watermark 850


def block(n: int, size: int = BLOCK) -> bytes:
    """Distinct bytes for each n."""
    return (f"block-{n:06d}-".encode() * size)[:size]


@pytest.fixture(autouse=True)
def synced(monkeypatch):
    """syncfs makes no difference to what a unit test can observe and can take seconds on a busy
    disk: count the calls instead."""
    calls: list[BlockStore] = []
    monkeypatch.setattr(BlockStore, "sync", lambda self: calls.append(self))
    return calls


@pytest.fixture
def caches(tmp_path):
    """Factory for opened caches on one directory; closes their index connections at the end."""
    made: list[BlockCache] = []

    def make(path: Path | None = None, quota=QUOTA, **kw) -> BlockCache:
        c = BlockCache(path or tmp_path / "cache", quota=quota, **kw)
        c.open()
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.index.close()
        except Exception:
            pass


def crash(cache: BlockCache) -> None:
    """Stop like a killed process: no flush, no commit, no clean-shutdown mark (the kernel drops the lock)."""
    cache.index.close()
    os.close(cache._lock)


def reopen(cache: BlockCache, caches) -> BlockCache:
    return caches(cache.dir, quota=cache._quota_setting)


def pin_dataset(cache: BlockCache, name: str, fos: list[str], pinned: bool = True) -> Snapshot:
    files = tuple(FileEntry(path=f"f{i}", size=BLOCK * 10, locator=f"f{i}", validator="v", file_object=fo)
                  for i, fo in enumerate(fos))
    snap = Snapshot(uri=f"file:///{name}", revision="r1", files=files)
    cache.index.add_snapshot(snap)
    cache.index.put_dataset(name, snap.uri, snap.id, pinned, "ready", None, 0.0)
    return snap


def block_files(cache: BlockCache) -> set[str]:
    return {p.name for p in (cache.dir / "blocks").rglob("*") if p.is_file()}


# -- put and lookups ------------------------------------------------------------


async def test_put_present_block_and_known_blocks(caches):
    c = caches()
    assert c.present_block("fo", 0) is None and c.known_blocks("fo") == {}
    b0 = await c.put("fo", 0, block(0), None)
    b2 = await c.put("fo", 2, block(2), content_id(block(2)))
    assert b0 == content_id(block(0)) and b2 == content_id(block(2))
    assert c.present_block("fo", 0) == b0 and c.present_block("fo", 2) == b2
    assert c.present_block("fo", 1) is None
    assert c.known_blocks("fo") == {0: b0, 2: b2}
    assert c.has_block(b0) and not c.has_block(content_id(b"other"))
    fd = c.block_fd(b0)
    assert os.pread(fd, 1000, 0) == block(0)
    assert c.block_fd(b0) == fd  # kept open for the next reader
    st = c.statistics()
    assert (st.bytes, st.blocks, st.quota, st.high_watermark, st.low_watermark) == (200, 2, 1000, 950, 850)


async def test_put_with_wrong_expected_id_stores_nothing(caches):
    # Bytes from a source that changed since the id was recorded.
    c = caches()
    with pytest.raises(BlockCorrupt):
        await c.put("fo", 0, block(1), content_id(block(0)))
    assert c.bytes == 0 and c.present_block("fo", 0) is None and c.known_blocks("fo") == {}
    assert block_files(c) == set()


async def test_identical_blocks_of_two_file_objects_are_stored_once(caches):
    c = caches()
    data = block(7)
    b1 = await c.put("fo-a", 0, data, None)
    b2 = await c.put("fo-b", 5, data, None)
    assert b1 == b2
    assert c.bytes == BLOCK and c.statistics().blocks == 1
    assert block_files(c) == {b1}
    assert c.present_block("fo-a", 0) == b1 and c.present_block("fo-b", 5) == b1
    # The index agrees after a restart.
    c.close()
    c2 = reopen(c, caches)
    assert c2.bytes == BLOCK and c2.known_blocks("fo-b") == {5: b1}


async def test_known_ids_survive_eviction_and_restart(caches):
    c = caches()
    bid = await c.put("fo", 3, block(3), None)
    c.drop_blocks([bid])
    assert c.present_block("fo", 3) is None
    assert c.known_blocks("fo") == {3: bid}  # a refetch will be verified against it
    c.close()
    c2 = reopen(c, caches)
    assert c2.known_blocks("fo") == {3: bid} and c2.present_block("fo", 3) is None


async def test_put_refuses_to_eat_the_free_disk_reserve(caches):
    # A reserve larger than any disk: every write must be refused before it happens.
    c = caches(min_free_disk=2**62)
    with pytest.raises(CacheFull):
        await c.put("fo", 0, block(0), None)
    assert c.bytes == 0 and block_files(c) == set()


def test_fractional_quota_is_a_share_of_the_filesystem(caches):
    c = caches(quota=0.5)
    st = os.statvfs(c.dir)
    assert c.quota == int(st.f_blocks * st.f_frsize * 0.5)


# -- eviction -------------------------------------------------------------------


async def fill(c: BlockCache, fo: str, n: int, start: int = 0) -> list[str]:
    return [await c.put(fo, i, block(start + i), None) for i in range(n)]


async def test_evict_frees_down_to_the_target(caches):
    c = caches()
    ids = await fill(c, "fo", 10)
    assert c.bytes == 1000
    n = c.evict(int(QUOTA * c.low_watermark))
    assert n == 2 and c.bytes == 800 and c.evicted_blocks == 2
    gone = [b for b in ids if not c.has_block(b)]
    assert len(gone) == 2 and not (set(gone) & block_files(c))
    assert c.evict(10_000) == 0  # already under the target


async def test_evict_prefers_blocks_read_once(caches):
    c = caches()
    hot = await c.put("fo", 0, block(0), None)
    cold = await fill(c, "fo", 3, start=1)
    for _ in range(5):
        c.touch(hot)
    for b in cold:
        c.touch(b)
    c.evict(BLOCK)
    assert c.has_block(hot)
    assert not any(c.has_block(b) for b in cold)


async def test_evict_skips_pinned_datasets_and_held_blocks(caches):
    c = caches()
    pinned = await fill(c, "fo-pinned", 4)
    loose = await fill(c, "fo-loose", 4, start=100)
    unpinned_ds = await fill(c, "fo-unpinned", 2, start=200)
    pin_dataset(c, "assigned", ["fo-pinned"])
    pin_dataset(c, "casual", ["fo-unpinned"], pinned=False)
    c.hold(loose[0])  # a reader is about to serve it
    c.evict(0)
    assert all(c.has_block(b) for b in pinned)
    assert c.has_block(loose[0])
    assert not any(c.has_block(b) for b in loose[1:] + unpinned_ds)
    assert c.bytes == 5 * BLOCK
    assert block_files(c) == set(pinned) | {loose[0]}
    # Released, the held block can go; the pinned ones still cannot.
    c.release(loose[0])
    c.evict(0)
    assert not c.has_block(loose[0]) and all(c.has_block(b) for b in pinned)


async def test_holds_are_counted(caches):
    c = caches()
    b = await c.put("fo", 0, block(0), None)
    c.hold(b)
    c.hold(b)
    c.release(b)
    c.evict(0)
    assert c.has_block(b)  # still held once
    c.release(b)
    c.evict(0)
    assert not c.has_block(b)


async def test_a_block_shared_with_a_pinned_dataset_stays(caches):
    c = caches()
    b = await c.put("fo-loose", 0, block(1), None)
    await c.put("fo-pinned", 9, block(1), None)  # the same bytes in a pinned file object
    pin_dataset(c, "assigned", ["fo-pinned"])
    c.evict(0)
    assert c.has_block(b) and c.present_block("fo-loose", 0) == b


async def test_unpinning_makes_blocks_evictable(caches):
    c = caches()
    ids = await fill(c, "fo", 3)
    snap = pin_dataset(c, "ds", ["fo"])
    c.evict(0)
    assert all(c.has_block(b) for b in ids)
    c.index.put_dataset("ds", snap.uri, snap.id, False, "ready", None, 0.0)
    c.evict(0)
    assert c.bytes == 0


async def test_service_evicts_to_the_low_watermark_when_over_the_high_one(caches):
    c = caches(commit_interval=3600)
    pinned = await fill(c, "fo-pinned", 3)
    pin_dataset(c, "assigned", ["fo-pinned"])
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        await fill(c, "fo", 7, start=10)  # 1000 bytes > 950: pressure
        with trio.fail_after(10):
            while c.bytes > int(QUOTA * c.low_watermark):
                await trio.sleep(0.01)
        assert c.bytes == 800  # freed at least the 150 needed, whole blocks
        assert all(c.has_block(b) for b in pinned)
        nursery.cancel_scope.cancel()


async def test_touch_statistics_reach_the_index(caches):
    c = caches()
    b = await c.put("fo", 0, block(0), None)
    for _ in range(3):
        c.touch(b)
    c.flush_access()
    (stat,) = c.index.eviction_candidates()
    assert stat.id == b and stat.hits == 3


# -- restart and crash recovery ------------------------------------------------


async def test_clean_restart_keeps_everything(caches, synced):
    c = caches()
    ids = await fill(c, "fo", 3)
    c.close()
    assert (c.dir / "clean-shutdown").exists()
    assert synced  # a clean close makes the blocks durable first
    c2 = reopen(c, caches)
    assert c2.bytes == 300 and all(c2.has_block(b) for b in ids)
    assert c2.present_block("fo", 2) == ids[2]


async def test_block_file_without_index_row_is_adopted(caches):
    c = caches()
    # The rename happened but the process died before the index row was written.
    data = block(42)
    bid, _ = c.store.write(data, None)
    crash(c)
    c2 = reopen(c, caches)
    assert c2.has_block(bid) and c2.bytes == len(data)
    assert c2.index.block_sizes() == {bid: len(data)}


async def test_block_file_that_cannot_be_indexed_on_a_full_disk_is_removed(caches, monkeypatch):
    # A crash left a block file without its row, and the disk is full: the
    # start must not fail on "database or disk is full"; the file goes.
    c = caches()
    bid, _ = c.store.write(block(43), None)
    crash(c)

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Index, "add_block", full)
    c2 = reopen(c, caches)
    assert not c2.has_block(bid) and not os.path.exists(c2.store.path(bid)) and c2.bytes == 0


async def test_block_file_whose_name_does_not_match_its_bytes_is_not_adopted(caches):
    c = caches()
    # A file named as one block holding another's bytes (bit rot, or planted in the cache dir).
    real = content_id(block(1))
    path = Path(c.store.path(real))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(block(2))
    crash(c)
    c2 = reopen(c, caches)
    assert not c2.has_block(real) and c2.bytes == 0
    assert not path.exists()


async def test_index_row_without_block_file_is_dropped(caches):
    c = caches()
    keep = await c.put("fo", 0, block(0), None)
    lost = await c.put("fo", 1, block(1), None)
    crash(c)
    os.unlink(c.store.path(lost))  # the file vanished (manual cleanup, fs repair)
    c2 = reopen(c, caches)
    assert c2.has_block(keep) and not c2.has_block(lost)
    assert c2.bytes == BLOCK
    assert lost not in c2.index.block_sizes()
    assert c2.present_block("fo", 1) is None and c2.known_blocks("fo")[1] == lost


def corrupt(cache: BlockCache, bid: str) -> None:
    """Flip one byte of a block file in place (same size, same name)."""
    p = Path(cache.store.path(bid))
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


async def test_corrupted_block_written_since_last_start_is_dropped_on_unclean_start(caches):
    c = caches()
    good = await c.put("fo", 0, block(0), None)
    bad = await c.put("fo", 1, block(1), None)
    crash(c)
    # The machine went down before the block's data reached the disk.
    corrupt(c, bad)
    c2 = reopen(c, caches)
    assert not c2.has_block(bad) and not os.path.exists(c2.store.path(bad))
    assert c2.has_block(good)
    assert c2.bytes == BLOCK
    assert bad not in c2.index.block_sizes()


async def test_unclean_start_checks_blocks_written_after_the_last_commit(caches):
    c = caches()
    before = await c.put("fo", 0, block(0), None)
    await c.commit()
    after = await c.put("fo", 1, block(1), None)
    crash(c)
    corrupt(c, after)
    c2 = reopen(c, caches)
    assert c2.has_block(before)
    assert not c2.has_block(after)


async def test_commit_records_how_far_blocks_are_durable(caches, synced):
    c = caches()
    assert c.index.get_meta("durable_before") is None
    await c.commit()  # nothing written yet: nothing to do
    assert c.index.get_meta("durable_before") is None
    t0 = time.time()  # the index records wall-clock times
    await c.put("fo", 0, block(0), None)
    syncs = len(synced)
    await c.commit()
    assert len(synced) == syncs + 1  # one syncfs for the whole group
    assert float(c.index.get_meta("durable_before")) >= t0
    await c.commit()  # nothing new since: no second sync
    assert len(synced) == syncs + 1


async def test_restart_after_crash_removes_temp_files(caches):
    c = caches()
    bid = await c.put("fo", 0, block(0), None)
    tmp = Path(c.store.path(bid)).parent / ".tmp-interrupted"
    tmp.write_bytes(b"half a blo")
    crash(c)
    c2 = reopen(c, caches)
    assert not tmp.exists() and c2.bytes == BLOCK


async def test_stray_files_in_the_block_tree_do_not_stop_a_start(caches):
    c = caches()
    bid = await c.put("fo", 0, block(0), None)
    stray = Path(c.store.path(bid)).parent / ".nfs0000000000123"
    stray.write_bytes(b"not a block")
    c.close()
    c2 = reopen(c, caches)
    assert c2.has_block(bid) and c2.bytes == BLOCK


async def test_evicting_a_block_closes_its_cached_descriptor(caches):
    # A reader's descriptor must not keep an evicted block's disk space busy.
    c = caches()
    b0 = await c.put("fo", 0, block(0), None)
    fd = c.block_fd(b0)
    c.drop_blocks([b0])
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(FileNotFoundError):
        c.block_fd(b0)


async def _spooled(c: BlockCache, data: bytes):
    """A block as a splicing source leaves it: written into a temp file from ``spool``."""
    spooled = await trio.to_thread.run_sync(c.spool, len(data))
    os.write(spooled.fd, data)
    spooled.size = len(data)
    return spooled


def temp_files(c: BlockCache) -> list[str]:
    return [p.name for p in c.store.root.rglob(".tmp-*")]


async def test_a_spooled_block_is_stored_like_bytes_and_deduplicated(caches):
    c = caches()
    bid = await c.put("fo", 0, await _spooled(c, block(4)), None)
    assert bid == content_id(block(4)) and c.present_block("fo", 0) == bid
    assert os.pread(c.block_fd(bid), 1000, 0) == block(4) and c.bytes == BLOCK
    # The same bytes again, spooled for another file object: one block file, no temp file left.
    assert await c.put("fo-b", 1, await _spooled(c, block(4)), None) == bid
    assert block_files(c) == {bid} and c.bytes == BLOCK and temp_files(c) == []
    # Empty blocks (an empty file's) too.
    assert await c.put("fo-e", 0, await _spooled(c, b""), None) == content_id(b"")


async def test_a_spooled_block_with_other_bytes_than_expected_is_removed(caches):
    c = caches()
    with pytest.raises(BlockCorrupt):
        await c.put("fo", 0, await _spooled(c, block(1)), content_id(block(0)))
    assert block_files(c) == set() and temp_files(c) == [] and c.known_blocks("fo") == {}


async def test_spooling_refuses_to_eat_the_free_disk_reserve(caches):
    c = caches(min_free_disk=2**62)
    with pytest.raises(CacheFull):
        await _spooled(c, block(0))
    assert temp_files(c) == []


async def test_restart_after_crash_removes_spooled_temp_files(caches):
    c = caches()
    half = await _spooled(c, block(0)[:50])  # a block still arriving when the agent died
    half.close()
    crash(c)
    c2 = reopen(c, caches)
    assert not Path(half.path).exists() and c2.bytes == 0


async def test_eviction_during_a_deduplicated_put_does_not_leave_a_block_without_its_file(tmp_path):
    # Two file objects with the same bytes. While the second put's worker
    # thread has found the block file already there (dedup) and not yet
    # returned, eviction runs. Before, it removed the file and the put then
    # counted the block as present again: a present block without a file.
    import threading

    cache = BlockCache(tmp_path / "c", quota=10**9)
    cache.open()
    data = os.urandom(4096)
    bid = await cache.put("fo-A", 0, data, None)
    in_store, go = threading.Event(), threading.Event()
    write = cache.store.write

    def write_then_wait(*args, **kwargs):
        result = write(*args, **kwargs)  # dedup: the file exists, nothing written
        in_store.set()
        go.wait(10)
        return result

    cache.store.write = write_then_wait
    evicted = []

    async def evict_meanwhile():
        await trio.to_thread.run_sync(in_store.wait, 10)
        evicted.append(cache.evict(0))
        go.set()

    async with trio.open_nursery() as n:
        n.start_soon(evict_meanwhile)
        assert await cache.put("fo-B", 0, data, None) == bid
    assert evicted == [0]  # held by the put: not evicted under it
    assert cache.present_block("fo-B", 0) == bid and os.path.exists(cache.store.path(bid))
    assert cache.evict(0) == 1 and not os.path.exists(cache.store.path(bid))  # and evictable afterwards
    assert cache.bytes == 0


async def test_a_lost_block_is_forgotten_and_its_bytes_uncounted(tmp_path):
    cache = BlockCache(tmp_path / "c", quota=10**9)
    cache.open()
    bid = await cache.put("fo-A", 0, b"x" * 100, None)
    os.unlink(cache.store.path(bid))
    with pytest.raises(FileNotFoundError):
        cache.block_fd(bid)
    assert cache.present_block("fo-A", 0) is None and cache.bytes == 0
    assert bid not in cache.index.block_sizes()


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


@pytest.mark.parametrize("spooled", [False, True], ids=["bytes", "spooled"])
async def test_fresh_verified_bytes_replace_a_block_file_damaged_at_rest(caches, caplog, spooled):
    # A block file damaged on disk (a flipped byte) must not be kept by dedup
    # when the same block arrives again, verified, for another file object;
    # the descriptor the reader LRU holds for the old file goes too.
    c = caches()
    bid = await c.put("fo-a", 0, block(2), None)
    c.block_fd(bid)
    _flip_a_byte(c.store.path(bid))
    again = await _spooled(c, block(2)) if spooled else block(2)
    assert await c.put("fo-b", 0, again, None) == bid
    assert os.pread(c.block_fd(bid), BLOCK, 0) == block(2)
    assert Path(c.store.path(bid)).read_bytes() == block(2)
    assert block_files(c) == {bid} and temp_files(c) == [] and c.bytes == BLOCK
    assert "damaged on disk" in caplog.text
