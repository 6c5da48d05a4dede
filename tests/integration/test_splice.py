"""Plain-HTTP bodies spliced from the socket into block files (sources/splice.py).

Against the loopback origin: exact bytes for ranges that end on a short last
block, an origin that ignores Range (the prefix is read and skipped, the rest
spliced), a body cut mid-block, a connection reused after spliced ranges. On
socket pairs: a stalled sender times out, bytes the HTTP parser had already
read come first, a full cache filesystem is CacheFull. Every failure leaves
no temp file behind.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from syncbit.cache.store import BlockStore
from syncbit.errors import CacheFull, TemporarySourceError
from syncbit.sources import open_source
from syncbit.sources.base import Spool
from syncbit.sources.splice import splice_into
from tests.conftest import write_tree

BS = 64 * 1024


class Collector:
    """A sink that only takes spooled blocks: calling it with bytes fails the test."""

    def __init__(self, store: BlockStore, size: int = BS) -> None:
        self.store = store
        self.blocks: list[bytes] = []
        self.spool = Spool(size, store.spool, self._deliver)

    async def __call__(self, chunk) -> None:
        raise AssertionError("bytes reached the sink: the body was not spliced")

    async def _deliver(self, block) -> None:
        block.handed = True
        with open(block.path, "rb") as f:
            data = f.read()
        assert len(data) == block.size
        self.blocks.append(data)
        block.discard()

    def joined(self) -> bytes:
        return b"".join(self.blocks)


def _temp_files(store: BlockStore) -> list[str]:
    return [p.name for p in store.root.rglob(".tmp-*")]


@pytest.fixture
def served(tmp_path, origin_factory):
    data = os.urandom(5 * BS + 1234)
    write_tree(tmp_path / "src", {"f.bin": data})
    return origin_factory(tmp_path / "src"), data


async def _entry(origin):
    src = await open_source(origin.url + "f.bin")
    snap = await src.resolve()
    return src, snap.files[0]


async def test_ranges_arrive_as_block_files_with_the_exact_bytes(tmp_path, served):
    origin, data = served
    connections = []
    accept = origin.process_request
    origin.process_request = lambda request, address: (connections.append(address), accept(request, address))
    src, entry = await _entry(origin)
    store = BlockStore(tmp_path / "cache")
    for off, length in [(0, len(data)), (2 * BS, 3 * BS + 1234), (BS + 7, 100), (5 * BS, 1234)]:
        sink = Collector(store)
        await src.read_range(entry, off, length, sink)
        assert sink.joined() == data[off:off + length]
        # Blocks of the spool's size, the last one shorter.
        assert [len(b) for b in sink.blocks[:-1]] == [BS] * (len(sink.blocks) - 1)
    # Spliced responses gave their connection back: a HEAD and four ranges, one TCP connection.
    assert origin.gets == 4 and len(connections) == 1
    assert _temp_files(store) == []
    await src.aclose()


async def test_an_origin_that_ignores_range_is_skipped_then_spliced(tmp_path, served):
    origin, data = served
    origin.ignore_range = True
    src, entry = await _entry(origin)
    sink = Collector(BlockStore(tmp_path / "cache"))
    await src.read_range(entry, 2 * BS + 5, 2 * BS, sink)
    assert sink.joined() == data[2 * BS + 5:4 * BS + 5]
    await src.aclose()


async def test_a_body_cut_mid_block_is_temporary_and_leaves_no_temp_file(tmp_path, served):
    origin, data = served
    src, entry = await _entry(origin)
    origin.drop_after = BS + 100  # one whole block, then the connection closes
    store = BlockStore(tmp_path / "cache")
    sink = Collector(store)
    with pytest.raises(TemporarySourceError, match="short of the requested range") as e:
        await src.read_range(entry, 0, len(data), sink)
    assert src.is_temporary(e.value)
    assert sink.joined() == data[:BS]  # the whole block before the cut was delivered
    assert _temp_files(store) == []
    await src.aclose()


async def _splice_from_pair(tmp_path, send: bytes, head: bytes, length: int, *, timeout=5.0, store=None,
                            close=True):
    store = store or BlockStore(tmp_path / "cache")
    sink = Collector(store)
    a, b = socket.socketpair()
    a.settimeout(timeout)
    try:
        b.sendall(send)
        if close:
            b.shutdown(socket.SHUT_WR)
        with trio.fail_after(20):  # a splice that never gives up fails the test instead of hanging it
            await trio.to_thread.run_sync(splice_into, a, head, length, sink.spool, "test body",
                                          abandon_on_cancel=True)
    finally:
        a.close()
        b.close()
    return sink


async def test_bytes_read_with_the_headers_come_first(tmp_path):
    body = os.urandom(3 * BS)
    sink = await _splice_from_pair(tmp_path, body[BS + 10:], body[:BS + 10], len(body))
    assert sink.joined() == body and len(sink.blocks) == 3


async def test_a_stalled_sender_times_out(tmp_path):
    store = BlockStore(tmp_path / "cache")
    with pytest.raises(TemporarySourceError, match="no data for 0.3s"):
        # 1,000 bytes of 2 blocks, and the sender keeps the connection open, silent.
        await _splice_from_pair(tmp_path, b"x" * 1000, b"", 2 * BS, timeout=0.3, store=store, close=False)
    assert _temp_files(store) == []


async def test_a_full_cache_filesystem_is_cache_full_not_a_source_error(tmp_path, tmpfs_factory):
    store = BlockStore(tmpfs_factory("tiny", "256k"))  # the fourth 64 KiB block does not fit
    kept: list = []

    class Keeper(Collector):
        async def _deliver(self, block):  # keep the files, so that the filesystem fills
            block.handed = True
            kept.append(block)

    sink = Keeper(store)
    sink.spool = Spool(BS, store.spool, sink._deliver)
    a, b = socket.socketpair()
    a.settimeout(5)
    try:
        def feed():
            try:
                b.sendall(os.urandom(8 * BS))
            except OSError:
                pass  # the reader gave up: expected
            b.close()

        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, feed)
            try:
                with pytest.raises(CacheFull):
                    await trio.to_thread.run_sync(splice_into, a, b"", 8 * BS, sink.spool, "test body")
            finally:
                a.close()  # the feeder's sendall ends whatever happened
    finally:
        a.close()
    assert 1 <= len(kept) < 8
    for block in kept:
        block.discard()
    assert _temp_files(store) == []  # the block that did not fit was removed
