"""SyncbitFS.read driven directly (no kernel): damaged or missing block files, errors of the cache disk.

The adapter is exercised through real mounts elsewhere; these cases need a
block file deleted or truncated behind the agent's back at a chosen moment,
which is easier to arrange, and to check, without the kernel in between.
"""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
import trio

from syncbit.fs.fuse import SyncbitFS
from syncbit.fs.vfs import Vfs

from .test_fetcher import BS, DATA, MemSource, cache, fetcher  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def source():
    return MemSource({"w.bin": DATA})


@pytest.fixture
async def opened(cache, fetcher, source):
    """(fs, file handle, entry) for w.bin of a dataset "ds" served by SyncbitFS, nothing cached yet."""
    snap = await source.resolve()
    vfs = Vfs()
    vfs.set_dataset("ds", snap)
    fs = SyncbitFS(vfs, cache, fetcher, lambda s: source, block_size=BS, readahead=0)
    ino = vfs.lookup(vfs.lookup(1, "ds").inode, "w.bin").inode
    info = await fs.open(ino, os.O_RDONLY, None)
    return fs, info.fh, snap.files[0]


async def test_a_block_file_deleted_under_the_agent_is_fetched_again(opened, cache, source):
    # Before, the read looped on "evicted: fetch again" while the cache still
    # counted the block as present: no checkpoint, so the whole agent froze
    # (a ticker task stopped and move_on_after never fired). With that bug
    # this test hangs instead of failing: fail_after cannot fire either.
    fs, fh, entry = opened
    assert await fs.read(fh, 0, BS) == DATA[:BS]
    bid = cache.present_block(entry.file_object, 0)
    cache._close_fd(bid)  # as after LRU pressure: the next read opens the file again
    os.unlink(cache.store.path(bid))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.001)

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        with trio.fail_after(5):
            assert await fs.read(fh, 0, BS) == DATA[:BS]
        n.cancel_scope.cancel()
    assert source.requests.count(("w.bin", 0, BS)) == 2  # fetched again, once
    assert os.path.exists(cache.store.path(bid)) and cache.present_block(entry.file_object, 0) == bid


@pytest.mark.parametrize("length", [BS, 2 * BS])  # within one block, and across two (the miss path joins pieces)
async def test_a_truncated_block_file_is_fetched_again_not_served_short(opened, cache, source, length):
    # Before, the fast path answered the short read (the kernel takes it as the
    # end of the file), and the miss path joined the short piece to the next
    # block, shifting its bytes.
    fs, fh, entry = opened
    assert await fs.read(fh, BS, length) == DATA[BS:BS + length]
    bid = cache.present_block(entry.file_object, 1)
    os.truncate(cache.store.path(bid), BS // 3)
    if length == 2 * BS:
        cache.lose(cache.present_block(entry.file_object, 2))  # block 2 missing: the read takes the miss path
    assert await fs.read(fh, BS, length) == DATA[BS:BS + length]
    assert os.path.getsize(cache.store.path(bid)) == BS


async def test_an_os_error_of_the_cache_disk_fails_the_read_not_the_mount(opened, cache, monkeypatch, caplog):
    # An OSError escaping read() ends pyfuse3.main: every reader then got
    # ENOTCONN. It is one read's EIO, with the dataset and file in the log.
    fs, fh, entry = opened
    assert await fs.read(fh, 0, BS) == DATA[:BS]
    cache._close_fd(cache.present_block(entry.file_object, 0))

    def emfile(block_id):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cache.store, "open", emfile)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.read(fh, 0, BS)
    assert e.value.errno == errno.EIO
    assert "read failed: dataset ds file w.bin offset 0: [Errno 24] Too many open files" in caplog.text
    monkeypatch.undo()
    assert await fs.read(fh, 0, BS) == DATA[:BS]


def test_the_open_block_file_table_fits_the_descriptor_limit(cache):
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert cache.max_open_files <= max(16, soft // 2)
