"""Unit tests for syncbit.server.store: the control plane's SQLite state."""

from __future__ import annotations

import sqlite3

import pytest

from syncbit.errors import ConfigError
from syncbit.model import FileEntry, Snapshot
from syncbit.server.store import SCHEMA_VERSION, Store

TABLES = {"meta", "nodes", "datasets", "snapshots", "assignments", "placements", "manifest", "holdings"}


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "server.db"


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


def snap(uri: str = "s3://bucket/model", revision: str = "r1", files: int = 2, created: float = 1700000000.0,
         options: tuple = ()) -> Snapshot:
    entries = tuple(
        FileEntry(path=f"dir/file{i}.bin", size=1000 * (i + 1), locator=f"{uri}/dir/file{i}.bin",
                  validator=f'"etag-{revision}-{i}"', file_object=f"fo-{revision}-{i}", mode=0o444,
                  mtime=1690000000.5 + i, digest=f"sha256:{i:064x}" if i % 2 else None)
        for i in range(files)
    )
    return Snapshot(uri=uri, revision=revision, files=entries, created=created, options=options)


def tables(store: Store) -> set[str]:
    return {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}


def schema_row(store: Store) -> str:
    return store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]


# -- schema ------------------------------------------------------------------------


def test_new_store_creates_parent_dirs_all_tables_and_schema_version(db_path, store):
    assert db_path.exists()
    assert TABLES <= tables(store)
    assert schema_row(store) == str(SCHEMA_VERSION) == "1"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_everything_and_does_not_migrate_again(db_path):
    s = Store(db_path)
    sn = snap()
    s.put_node("n1", {"zone": "a"}, 100, 50, True, 10.0)
    s.put_dataset("ds", sn.uri, {"region": "eu"}, sn)
    s.put_assignment("ds", {"selector": {"zone": "a"}, "replicas": 1}, "complete")
    s.set_assignment_problem("ds", "trouble")
    s.set_placements("ds", ["n1"], sn.id)
    s.report("n1", "ds", sn.id, "ready", None, 3000, 3000)
    s.record_blocks("n1", [("fo-r1-0", 0, "b0")])
    s.put_holdings("n1", {sn.id: b"\x01"})
    before = (s.nodes(), s.datasets(), s.assignments(), s.placements(), s.manifest(["fo-r1-0"]), s.holdings(sn.id))
    s.close()

    s = Store(db_path)
    try:
        after = (s.nodes(), s.datasets(), s.assignments(), s.placements(), s.manifest(["fo-r1-0"]),
                 s.holdings(sn.id))
        assert after == before
        assert s.snapshot(sn.id) == sn
        assert schema_row(s) == "1"
        assert s.db.execute("SELECT count(*) FROM meta").fetchone()[0] == 1
    finally:
        s.close()


def test_newer_schema_version_is_refused_with_config_error(db_path):
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(ConfigError, match=f"schema {SCHEMA_VERSION + 1} is newer than this syncbit"):
        Store(db_path)


# -- nodes -------------------------------------------------------------------------


def test_put_node_and_list_nodes_sorted_with_decoded_labels_and_bool_up(store):
    store.put_node("b", {"zone": "b", "gpu": "h100"}, 1000, 800, True, 10.0)
    store.put_node("a", {}, 500, 500, False, 11.0)
    assert store.nodes() == [
        {"name": "a", "labels": {}, "capacity": 500, "free": 500, "up": False, "registered": 11.0, "last_seen": 11.0},
        {"name": "b", "labels": {"gpu": "h100", "zone": "b"}, "capacity": 1000, "free": 800, "up": True,
         "registered": 10.0, "last_seen": 10.0},
    ]


def test_put_node_again_updates_everything_but_registration_time(store):
    store.put_node("a", {"zone": "a"}, 500, 500, True, 10.0)
    store.put_node("a", {"zone": "b"}, 600, 100, False, 20.0)
    assert store.nodes() == [{"name": "a", "labels": {"zone": "b"}, "capacity": 600, "free": 100, "up": False,
                              "registered": 10.0, "last_seen": 20.0}]


def test_set_node_up_and_down_updates_up_and_last_seen(store):
    store.put_node("a", {}, 1, 1, True, 10.0)
    store.set_node_up("a", False, 15.0)
    assert (store.nodes()[0]["up"], store.nodes()[0]["last_seen"]) == (False, 15.0)
    store.set_node_up("a", True, 16.0)
    assert (store.nodes()[0]["up"], store.nodes()[0]["last_seen"]) == (True, 16.0)


def test_set_node_up_of_unknown_node_creates_nothing(store):
    store.set_node_up("ghost", True, 1.0)
    assert store.nodes() == []


def test_delete_node_removes_it_and_its_holdings_only(store):
    store.put_node("a", {}, 1, 1, True, 1.0)
    store.put_node("b", {}, 1, 1, True, 1.0)
    store.put_holdings("a", {"s1": b"\xff"})
    store.put_holdings("b", {"s1": b"\x0f"})
    store.delete_node("a")
    assert [n["name"] for n in store.nodes()] == ["b"]
    assert store.holdings("s1") == {"b": b"\x0f"}
    store.delete_node("ghost")  # unknown: no error
    assert [n["name"] for n in store.nodes()] == ["b"]


# -- datasets and snapshots --------------------------------------------------------


def test_snapshot_json_round_trip_is_equal():
    sn = snap(options=(("endpoint", "http://minio:9000"), ("region", "eu")))
    back = Snapshot.from_json(sn.to_json())
    assert back == sn
    assert back.id == sn.id
    assert back.files == sn.files and back.options == sn.options and back.created == sn.created
    assert back.to_json() == sn.to_json()


def test_put_dataset_and_get_it(store):
    sn = snap()
    store.put_dataset("ds", sn.uri, {"region": "eu"}, sn)
    row = store.dataset("ds")
    assert {k: row[k] for k in ("name", "uri", "options", "snapshot")} == \
        {"name": "ds", "uri": sn.uri, "options": {"region": "eu"}, "snapshot": sn.id}
    assert row["created"] == row["updated"] > 0
    assert store.datasets() == [row]


def test_dataset_of_unknown_name_is_none(store):
    assert store.dataset("nope") is None
    assert store.datasets() == []


def test_stored_snapshot_round_trips_equal(store):
    sn = snap(options=(("endpoint", "http://minio:9000"),))
    store.put_dataset("ds", sn.uri, {"endpoint": "http://minio:9000"}, sn)
    back = store.snapshot(sn.id)
    assert back == sn and back.id == sn.id and back.files == sn.files and back.options == sn.options
    assert store.snapshot_json(sn.id) == sn.to_json()
    assert Snapshot.from_json(store.snapshot_json(sn.id)) == sn


def test_snapshot_of_unknown_id_is_none(store):
    assert store.snapshot("0" * 64) is None
    assert store.snapshot_json("0" * 64) is None


def test_snapshot_row_created_is_the_snapshots_own_time(store):
    sn = snap(created=1234.5)
    store.put_dataset("ds", sn.uri, {}, sn)
    assert store.db.execute("SELECT created FROM snapshots WHERE id=?", (sn.id,)).fetchone()[0] == 1234.5


def test_datasets_are_listed_by_name(store):
    for name in ("zeta", "alpha", "mid"):
        sn = snap(uri=f"s3://b/{name}")
        store.put_dataset(name, sn.uri, {}, sn)
    assert [d["name"] for d in store.datasets()] == ["alpha", "mid", "zeta"]


def test_put_dataset_again_moves_to_new_snapshot_keeps_created_and_old_snapshot(store):
    s1, s2 = snap(revision="r1"), snap(revision="r2")
    store.put_dataset("ds", s1.uri, {"a": "1"}, s1)
    created = store.dataset("ds")["created"]
    store.put_dataset("ds", "s3://other", {"b": "2"}, s2)
    row = store.dataset("ds")
    assert (row["uri"], row["options"], row["snapshot"], row["created"]) == ("s3://other", {"b": "2"}, s2.id, created)
    assert row["updated"] >= created
    assert store.snapshot(s1.id) == s1 and store.snapshot(s2.id) == s2


def test_delete_dataset_removes_assignment_placements_and_its_snapshots(store):
    s1, s2 = snap(revision="r1"), snap(revision="r2")
    other = snap(uri="s3://b/other")
    store.put_dataset("ds", s1.uri, {}, s1)
    store.put_dataset("ds", s2.uri, {}, s2)
    store.put_dataset("keep", other.uri, {}, other)
    for name, sid in (("ds", s2.id), ("keep", other.id)):
        store.put_assignment(name, {"nodes": ["n1"]}, "complete")
        store.set_placements(name, ["n1", "n2"], sid)

    store.delete_dataset("ds")

    assert store.dataset("ds") is None
    assert store.snapshot(s1.id) is None and store.snapshot(s2.id) is None
    assert [a["dataset"] for a in store.assignments()] == ["keep"]
    assert store.placements("ds") == []
    assert {p["node"] for p in store.placements("keep")} == {"n1", "n2"}
    assert store.snapshot(other.id) == other
    assert [d["name"] for d in store.datasets()] == ["keep"]


def test_delete_dataset_keeps_a_snapshot_another_dataset_shares(store):
    sn = snap()  # two datasets over the same source and revision: the same snapshot id
    store.put_dataset("a", sn.uri, {}, sn)
    store.put_dataset("b", sn.uri, {}, sn)
    assert store.dataset("b")["snapshot"] == sn.id
    store.delete_dataset("a")
    assert store.snapshot(sn.id) == sn


# -- assignments -------------------------------------------------------------------


def test_put_assignment_and_list_with_decoded_spec(store):
    store.put_assignment("zz", {"nodes": ["n1"], "selector": None}, "immediate")
    store.put_assignment("aa", {"selector": {"gpu": "h100"}, "replicas": 2, "spread_by": "zone"}, "complete")
    rows = store.assignments()
    assert [r["dataset"] for r in rows] == ["aa", "zz"]
    assert rows[0]["spec"] == {"selector": {"gpu": "h100"}, "replicas": 2, "spread_by": "zone"}
    assert rows[0]["switch"] == "complete" and rows[0]["problem"] is None
    assert rows[1]["spec"] == {"nodes": ["n1"], "selector": None} and rows[1]["switch"] == "immediate"


def test_put_assignment_again_replaces_spec_and_switch_keeps_created(store):
    store.put_assignment("ds", {"nodes": ["n1"]}, "complete")
    created = store.assignments()[0]["created"]
    store.put_assignment("ds", {"nodes": ["n2"]}, "immediate")
    [row] = store.assignments()
    assert (row["spec"], row["switch"], row["created"]) == ({"nodes": ["n2"]}, "immediate", created)


def test_set_assignment_problem_sets_and_clears(store):
    store.put_assignment("ds", {"nodes": ["n1"]}, "complete")
    store.set_assignment_problem("ds", "not registered: n1")
    assert store.assignments()[0]["problem"] == "not registered: n1"
    store.set_assignment_problem("ds", None)
    assert store.assignments()[0]["problem"] is None
    store.set_assignment_problem("ghost", "x")  # unknown: no row created
    assert [r["dataset"] for r in store.assignments()] == ["ds"]


def test_delete_assignment_removes_it_and_its_placements_only(store):
    store.put_assignment("ds", {"nodes": ["n1"]}, "complete")
    store.put_assignment("other", {"nodes": ["n1"]}, "complete")
    store.set_placements("ds", ["n1"], "s1")
    store.set_placements("other", ["n1"], "s2")
    store.delete_assignment("ds")
    assert [r["dataset"] for r in store.assignments()] == ["other"]
    assert store.placements("ds") == []
    assert [p["dataset"] for p in store.placements(node="n1")] == ["other"]


# -- placements --------------------------------------------------------------------


def test_set_placements_first_time_adds_all_as_pending(store):
    added, removed = store.set_placements("ds", iter(["n2", "n1", "n1"]), "s1")
    assert (added, removed) == ({"n1", "n2"}, set())
    rows = store.placements("ds")
    assert [r["node"] for r in rows] == ["n1", "n2"]
    for r in rows:
        assert (r["snapshot"], r["state"], r["error"], r["bytes_cached"], r["bytes_total"]) == \
            ("s1", "pending", None, 0, 0)


def test_set_placements_returns_added_and_removed_and_keeps_unchanged_rows_state(store):
    store.set_placements("ds", ["n1", "n2"], "s1")
    assert store.report("n1", "ds", "s1", "ready", None, 3000, 3000)
    added, removed = store.set_placements("ds", ["n1", "n3"], "s1")
    assert (added, removed) == ({"n3"}, {"n2"})
    rows = {r["node"]: r for r in store.placements("ds")}
    assert set(rows) == {"n1", "n3"}
    assert (rows["n1"]["state"], rows["n1"]["bytes_cached"], rows["n1"]["bytes_total"]) == ("ready", 3000, 3000)
    assert rows["n3"]["state"] == "pending"


def test_set_placements_same_nodes_is_a_no_op(store):
    store.set_placements("ds", ["n1"], "s1")
    store.report("n1", "ds", "s1", "ready", None, 10, 10)
    assert store.set_placements("ds", ["n1"], "s1") == (set(), set())
    assert store.placements("ds")[0]["state"] == "ready"


def test_set_placements_new_snapshot_resets_every_row_to_pending(store):
    store.set_placements("ds", ["n1", "n2"], "s1")
    store.report("n1", "ds", "s1", "ready", None, 10, 10)
    store.report("n2", "ds", "s1", "failed", "boom", 5, 10)
    added, removed = store.set_placements("ds", ["n1", "n2"], "s2")
    assert (added, removed) == (set(), set())
    for r in store.placements("ds"):
        assert (r["snapshot"], r["state"], r["error"]) == ("s2", "pending", None)


def test_set_placements_only_touches_its_dataset(store):
    store.set_placements("a", ["n1"], "s1")
    store.report("n1", "a", "s1", "ready", None, 1, 1)
    store.set_placements("b", ["n1"], "s9")
    store.set_placements("b", [], "s9")
    assert [(p["dataset"], p["state"]) for p in store.placements(node="n1")] == [("a", "ready")]


def test_set_placements_to_empty_removes_all(store):
    store.set_placements("ds", ["n1", "n2"], "s1")
    assert store.set_placements("ds", [], "s1") == (set(), {"n1", "n2"})
    assert store.placements() == []


def test_placements_filter_by_dataset_node_both_and_sorted(store):
    store.set_placements("b", ["n2", "n1"], "s")
    store.set_placements("a", ["n2"], "s")
    key = [(p["dataset"], p["node"]) for p in store.placements()]
    assert key == [("a", "n2"), ("b", "n1"), ("b", "n2")]
    assert [(p["dataset"], p["node"]) for p in store.placements(node="n2")] == [("a", "n2"), ("b", "n2")]
    assert [(p["dataset"], p["node"]) for p in store.placements("b", "n1")] == [("b", "n1")]
    assert store.placements("c") == []


# -- report ------------------------------------------------------------------------


def test_report_for_unplaced_node_or_dataset_is_ignored(store):
    store.set_placements("ds", ["n1"], "s1")
    assert store.report("n2", "ds", "s1", "ready", None, 1, 1) is False
    assert store.report("n1", "other", "s1", "ready", None, 1, 1) is False
    assert [p["node"] for p in store.placements()] == ["n1"]
    assert store.placements()[0]["state"] == "pending"


def test_report_about_another_snapshot_is_ignored(store):
    store.set_placements("ds", ["n1"], "s2")
    assert store.report("n1", "ds", "s1", "ready", None, 100, 100) is False
    r = store.placements("ds")[0]
    assert (r["state"], r["bytes_cached"], r["bytes_total"]) == ("pending", 0, 0)


def test_report_state_change_returns_true_and_records_everything(store):
    store.set_placements("ds", ["n1"], "s1")
    assert store.report("n1", "ds", "s1", "fetching", None, 10, 100) is True
    r = store.placements("ds")[0]
    assert (r["state"], r["error"], r["bytes_cached"], r["bytes_total"]) == ("fetching", None, 10, 100)
    assert store.report("n1", "ds", "s1", "failed", "disk full", 10, 100) is True
    r = store.placements("ds")[0]
    assert (r["state"], r["error"]) == ("failed", "disk full")


def test_report_progress_without_state_change_updates_row_but_returns_false(store):
    store.set_placements("ds", ["n1"], "s1")
    store.report("n1", "ds", "s1", "fetching", None, 10, 100)
    assert store.report("n1", "ds", "s1", "fetching", None, 50, 100) is False
    assert store.placements("ds")[0]["bytes_cached"] == 50
    assert store.report("n1", "ds", "s1", "fetching", "slow source", 50, 100) is False
    assert store.placements("ds")[0]["error"] == "slow source"


def test_report_identical_returns_false(store):
    store.set_placements("ds", ["n1"], "s1")
    store.report("n1", "ds", "s1", "ready", None, 100, 100)
    assert store.report("n1", "ds", "s1", "ready", None, 100, 100) is False


def test_report_pending_on_pending_placement_is_not_a_change(store):
    store.set_placements("ds", ["n1"], "s1")
    assert store.report("n1", "ds", "s1", "pending", None, 0, 100) is False


# -- manifest ----------------------------------------------------------------------


def test_record_blocks_first_report_is_recorded(store):
    assert store.record_blocks("n1", [("fo1", 0, "b0"), ("fo1", 1, "b1"), ("fo2", 0, "c0")]) == []
    assert store.manifest(["fo1", "fo2"]) == {"fo1": {0: "b0", 1: "b1"}, "fo2": {0: "c0"}}
    rows = store.db.execute("SELECT fo, idx, node FROM manifest ORDER BY fo, idx").fetchall()
    assert rows == [("fo1", 0, "n1"), ("fo1", 1, "n1"), ("fo2", 0, "n1")]


def test_record_blocks_same_id_again_is_accepted_and_keeps_first_reporter(store):
    store.record_blocks("n1", [("fo1", 0, "b0")])
    assert store.record_blocks("n1", [("fo1", 0, "b0")]) == []
    assert store.record_blocks("n2", [("fo1", 0, "b0")]) == []
    assert store.db.execute("SELECT node FROM manifest WHERE fo='fo1' AND idx=0").fetchone()[0] == "n1"


def test_record_blocks_different_id_is_refused_with_both_ids(store):
    store.record_blocks("n1", [("fo1", 0, "b0")])
    refused = store.record_blocks("n2", [("fo1", 0, "evil"), ("fo1", 1, "b1"), ("fo1", 0, "b0")])
    assert refused == [("fo1", 0, "evil", "b0")]
    assert store.manifest(["fo1"]) == {"fo1": {0: "b0", 1: "b1"}}


def test_record_blocks_conflict_within_one_batch_keeps_the_first(store):
    assert store.record_blocks("n1", [("fo", 3, "x"), ("fo", 3, "y")]) == [("fo", 3, "y", "x")]
    assert store.manifest(["fo"]) == {"fo": {3: "x"}}


def test_record_blocks_empty_batch(store):
    assert store.record_blocks("n1", []) == []
    assert store.manifest(["fo"]) == {}


def test_record_blocks_is_atomic_when_a_report_fails(store):
    def reports():
        yield ("fo", 0, "b0")
        raise RuntimeError("agent sent garbage")

    with pytest.raises(RuntimeError):
        store.record_blocks("n1", reports())
    assert store.manifest(["fo"]) == {}


def test_manifest_returns_only_known_file_objects(store):
    store.record_blocks("n1", [("fo1", 0, "b0"), ("fo1", 2, "b2")])
    assert store.manifest(["fo1", "unknown"]) == {"fo1": {0: "b0", 2: "b2"}}
    assert store.manifest(["unknown"]) == {}
    assert store.manifest([]) == {}


# -- holdings ----------------------------------------------------------------------


def test_put_and_get_holdings_per_snapshot(store):
    store.put_holdings("n1", {"s1": b"\xff\x01", "s2": b"\x00"})
    store.put_holdings("n2", {"s1": b"\x0f"})
    assert store.holdings("s1") == {"n1": b"\xff\x01", "n2": b"\x0f"}
    assert store.holdings("s2") == {"n1": b"\x00"}
    assert store.holdings("s3") == {}
    assert isinstance(store.holdings("s1")["n1"], bytes)


def test_put_holdings_again_replaces_the_bitmap(store):
    store.put_holdings("n1", {"s1": b"\x01"})
    store.put_holdings("n1", {"s1": b"\x03\x00"})
    assert store.holdings("s1") == {"n1": b"\x03\x00"}
    assert store.db.execute("SELECT count(*) FROM holdings").fetchone()[0] == 1
