"""Unit tests for syncbit.cache.index: schema, pins, snapshots, access statistics."""

from __future__ import annotations

import pytest

from syncbit.cache.index import SCHEMA_VERSION, Index
from syncbit.errors import ConfigError
from syncbit.model import FileEntry, Snapshot


@pytest.fixture
def index(tmp_path):
    idx = Index(tmp_path / "index.sqlite")
    yield idx
    idx.close()


def snap(revision: str, fos: list[str]) -> Snapshot:
    return Snapshot(uri="file:///set", revision=revision, files=tuple(
        FileEntry(path=f"f{i}", size=1, locator=f"f{i}", validator="v", file_object=fo) for i, fo in enumerate(fos)))


def test_reopening_keeps_rows_and_schema(tmp_path):
    idx = Index(tmp_path / "i.sqlite")
    idx.add_block("b1", 10, "c1", 1.0)
    idx.set_fo_block("fo", 0, "b1")
    idx.close()
    idx = Index(tmp_path / "i.sqlite")
    try:
        assert idx.block_sizes() == {"b1": 10}
        assert idx.fo_blocks("fo") == {0: "b1"}
        assert idx.get_meta("schema") == str(SCHEMA_VERSION)
    finally:
        idx.close()


def test_a_newer_schema_is_refused(tmp_path):
    # An index written by a newer syncbit must not be misread.
    idx = Index(tmp_path / "i.sqlite")
    idx.set_meta("schema", str(SCHEMA_VERSION + 1))
    idx.close()
    with pytest.raises(ConfigError, match="newer"):
        Index(tmp_path / "i.sqlite")


def test_add_block_is_idempotent_and_checksums_since(index):
    index.add_block("b1", 10, "c1", 5.0)
    index.add_block("b1", 99, "other", 6.0)  # a second insert of one id changes nothing
    index.add_block("b2", 20, "c2", 7.0)
    assert index.block_sizes() == {"b1": 10, "b2": 20}
    assert sorted(index.checksums_since(6.0)) == [("b2", "c2")]
    assert sorted(index.checksums_since(5.0)) == [("b1", "c1"), ("b2", "c2")]
    index.remove_blocks(["b1", "nope"])
    assert index.block_sizes() == {"b2": 20}


def test_record_access_keeps_the_latest_time_and_adds_hits(index):
    index.add_block("b", 1, "c", 10.0)
    index.record_access({"b": (50.0, 2)})
    index.record_access({"b": (30.0, 1)})  # an older timestamp must not move last_access back
    (s,) = index.eviction_candidates()
    assert (s.last_access, s.hits) == (50.0, 3)


def test_eviction_candidates_exclude_blocks_of_pinned_current_snapshots(index):
    for b in ("p", "u", "old", "free"):
        index.add_block(b, 1, "c", 0.0)
    index.set_fo_block("fo-p", 0, "p")
    index.set_fo_block("fo-u", 0, "u")
    index.set_fo_block("fo-old", 0, "old")
    s_pinned, s_unpinned, s_old = snap("r1", ["fo-p"]), snap("r2", ["fo-u"]), snap("r0", ["fo-old"])
    for s in (s_pinned, s_unpinned, s_old):
        index.add_snapshot(s)
    index.put_dataset("pinned", s_pinned.uri, s_pinned.id, True, "ready", None, 0.0)
    index.put_dataset("casual", s_unpinned.uri, s_unpinned.id, False, "ready", None, 0.0)
    assert {s.id for s in index.eviction_candidates()} == {"u", "old", "free"}
    # Moving the pinned dataset to another snapshot releases the old one's blocks.
    index.put_dataset("pinned", s_old.uri, s_old.id, True, "ready", None, 0.0)
    assert {s.id for s in index.eviction_candidates()} == {"p", "u", "free"}
    assert index.blocks_of_snapshot(s_pinned.id) == {"p"}
    assert index.pinned_blocks(but="casual") == {"old"}
    assert index.pinned_blocks(but="pinned") == set()
    # Two pinned datasets on one snapshot (one URI pulled under two names):
    # leaving one out leaves the other's blocks pinned.
    index.put_dataset("twin", s_old.uri, s_old.id, True, "ready", None, 0.0)
    assert index.pinned_blocks(but="pinned") == {"old"}


def test_gc_snapshots_forgets_unreferenced_snapshots_but_not_block_ids(index):
    a, b = snap("r1", ["fo-a"]), snap("r2", ["fo-b"])
    index.add_snapshot(a)
    index.add_snapshot(b)
    index.set_fo_block("fo-b", 0, "blk")
    index.put_dataset("ds", a.uri, a.id, True, "ready", None, 0.0)
    index.gc_snapshots()
    assert index.snapshot(a.id) == a
    assert index.db.execute("SELECT count(*) FROM snapshots WHERE id=?", (b.id,)).fetchone()[0] == 0
    assert index.blocks_of_snapshot(b.id) == set()
    assert index.fo_blocks("fo-b") == {0: "blk"}


def test_datasets_upsert_and_delete(index):
    index.put_dataset("ds", "file:///a", None, False, "pending", None, 1.0)
    index.put_dataset("ds", "file:///b", "sid", True, "failed", "boom", 2.0)
    (row,) = index.datasets()
    assert (row["uri"], row["snapshot"], row["pinned"], row["state"], row["error"], row["created"]) == (
        "file:///b", "sid", 1, "failed", "boom", 1.0)
    index.delete_dataset("ds")
    assert index.datasets() == []


def test_a_version_1_index_is_migrated_and_keeps_its_datasets(tmp_path):
    """A cache made by the first release (schema 1) opens: datasets keep their rows, options default to {}."""
    import sqlite3

    from syncbit.cache import index as index_module

    path = tmp_path / "index.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for stmt in index_module._MIGRATIONS[1]:
        conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema', '1')")
    conn.execute("INSERT INTO datasets (name, uri, snapshot, pinned, state, error, created) "
                 "VALUES ('old', 'https://h/x/', NULL, 1, 'ready', NULL, 1.0)")
    conn.commit()
    conn.close()
    idx = Index(path)
    try:
        assert idx.get_meta("schema") == str(SCHEMA_VERSION)
        [row] = idx.datasets()
        assert (row["name"], row["uri"], row["pinned"], row["options"]) == ("old", "https://h/x/", 1, "{}")
        idx.set_verified("fo1", "sha256:ab", 2.0)
        assert idx.verified_digest("fo1") == "sha256:ab"
        idx.forget_fo("fo1")
        assert idx.verified_digest("fo1") is None
    finally:
        idx.close()
