"""Unit tests for syncbit.cache.store: block files written atomically, verified at rest."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import xxhash

from syncbit.cache import store as store_mod
from syncbit.cache.store import TMP_PREFIX, BlockStore, at_rest_checksum
from syncbit.errors import BlockCorrupt, CacheFull
from syncbit.model import content_id


@pytest.fixture
def store(tmp_path):
    return BlockStore(tmp_path)


def all_files(store: BlockStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_write_stores_bytes_under_their_content_id(store):
    data = b"hello block" * 100
    bid, checksum = store.write(data, None)
    assert bid == content_id(data)
    assert checksum == at_rest_checksum(data) == xxhash.xxh3_64_hexdigest(data)
    assert store.path(bid) == f"{store.root}/{bid[:2]}/{bid}"
    assert Path(store.path(bid)).read_bytes() == data
    assert all_files(store) == [f"{bid[:2]}/{bid}"]  # no temp file left behind


def test_write_with_matching_expected_id(store):
    data = b"x" * 4096
    assert store.write(data, content_id(data))[0] == content_id(data)


def test_write_of_an_empty_block(store):
    bid, _ = store.write(b"", None)
    assert Path(store.path(bid)).read_bytes() == b""


def test_expected_id_mismatch_raises_and_leaves_no_file(store):
    # Bytes that do not hash to the id recorded for them (a changed or malicious source/peer).
    good, bad = b"A" * 1000, b"B" * 1000
    with pytest.raises(BlockCorrupt):
        store.write(bad, content_id(good))
    assert not os.path.exists(store.path(content_id(bad)))
    assert not os.path.exists(store.path(content_id(good)))
    assert all_files(store) == []


def test_write_dedups_identical_bytes(store):
    data = b"same" * 256
    bid, c1 = store.write(data, None)
    ino = os.stat(store.path(bid)).st_ino
    bid2, c2 = store.write(data, None)
    assert (bid2, c2) == (bid, c1)
    assert os.stat(store.path(bid)).st_ino == ino  # not rewritten
    assert all_files(store) == [f"{bid[:2]}/{bid}"]


def test_scan_yields_blocks_and_removes_interrupted_writes(store):
    a, b = b"a" * 10, b"b" * 20
    ida, _ = store.write(a, None)
    idb, _ = store.write(b, None)
    # Simulate a process killed between creating the temp file and the rename.
    leftover = store.root / ida[:2] / f"{TMP_PREFIX}deadbeef"
    leftover.write_bytes(b"torn")
    found = {bid: (size, mtime) for bid, size, mtime in store.scan()}
    assert set(found) == {ida, idb}
    assert found[ida][0] == 10 and found[idb][0] == 20
    assert found[ida][1] == pytest.approx(os.stat(store.path(ida)).st_mtime)
    assert not leftover.exists()
    assert all(TMP_PREFIX not in f for f in all_files(store))


def test_scan_of_an_empty_store(store):
    assert list(store.scan()) == []


class _FailingOs:
    """Stands in for the ``os`` module inside store.py; one call fails with ``err``."""

    def __init__(self, name: str, err: int):
        self._name, self._err = name, err

    def __getattr__(self, name):
        if name == self._name:
            def fail(*a, **kw):
                raise OSError(self._err, os.strerror(self._err))
            return fail
        return getattr(os, name)


@pytest.mark.parametrize("call", ["write", "replace", "makedirs"])
def test_disk_full_raises_cache_full_and_cleans_up(store, monkeypatch, call):
    # The disk fills up (or runs out of inodes) while the block's directory
    # is made, or the block is written or renamed.
    monkeypatch.setattr(store_mod, "os", _FailingOs(call, errno.ENOSPC))
    with pytest.raises(CacheFull):
        store.write(b"z" * 100, None)
    monkeypatch.undo()
    assert all_files(store) == []  # neither the temp file nor a torn final file


def test_other_io_errors_propagate_and_clean_up(store, monkeypatch):
    # An I/O error on the device is not "cache full".
    monkeypatch.setattr(store_mod, "os", _FailingOs("write", errno.EIO))
    with pytest.raises(OSError) as ei:
        store.write(b"z" * 100, None)
    assert ei.value.errno == errno.EIO and not isinstance(ei.value, CacheFull)
    monkeypatch.undo()
    assert all_files(store) == []


def test_verify_detects_a_corrupted_block_file(store):
    data = bytes(range(256)) * 16
    bid, checksum = store.write(data, None)
    assert store.verify(bid, checksum)
    # Flip one bit in place: same size, same name, different bytes (bit rot).
    p = Path(store.path(bid))
    raw = bytearray(p.read_bytes())
    raw[1000] ^= 0x01
    p.write_bytes(bytes(raw))
    assert not store.verify(bid, checksum)


def test_verify_detects_truncation_and_missing_files(store):
    bid, checksum = store.write(b"q" * 500, None)
    os.truncate(store.path(bid), 0)  # torn by a machine crash before the data reached the disk
    assert not store.verify(bid, checksum)
    store.remove(bid)
    assert not store.verify(bid, checksum)


def test_remove_and_open(store):
    data = b"readable"
    bid, _ = store.write(data, None)
    fd = store.open(bid)
    try:
        assert os.read(fd, 100) == data
    finally:
        os.close(fd)
    store.remove(bid)
    store.remove(bid)  # idempotent
    assert not os.path.exists(store.path(bid))
    with pytest.raises(FileNotFoundError):
        store.open(bid)


def test_sync_runs(store):
    store.write(b"durable", None)
    store.sync()


@pytest.mark.parametrize("call", ["open", "makedirs"])
def test_disk_full_while_spooling_raises_cache_full(store, monkeypatch, call):
    # The first spooled block of a cache makes blocks/spool/; a full disk or
    # inode table there is the cache's error, not an OSError from the source.
    monkeypatch.setattr(store_mod, "os", _FailingOs(call, errno.ENOSPC))
    with pytest.raises(CacheFull):
        store.spool()


@pytest.mark.parametrize("call", ["replace", "makedirs"])
def test_disk_full_while_adopting_raises_cache_full(store, monkeypatch, call):
    spooled = store.spool()
    os.write(spooled.fd, b"q" * 100)
    spooled.size = 100
    monkeypatch.setattr(store_mod, "os", _FailingOs(call, errno.ENOSPC))
    with pytest.raises(CacheFull):
        store.adopt(spooled, None)
    monkeypatch.undo()
    spooled.discard()
    assert all_files(store) == []
