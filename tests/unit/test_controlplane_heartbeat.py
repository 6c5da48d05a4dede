"""ControlPlane's heartbeat path in process: what is written at once, what is written behind, what stays cached.

A real Store on disk and a real file:// dataset; no HTTP (the API around it is
covered by tests/integration/test_control_plane.py).
"""

from __future__ import annotations

import pytest

from syncbit.model import encode_bitmap
from syncbit.server.controlplane import ControlPlane
from syncbit.server.scheduler import Assignment
from syncbit.server.store import Store


async def two_node_plane(tmp_path) -> ControlPlane:
    """A control plane on a real store with dataset "ds" (10,000 bytes) and nodes n1, n2 (role=gpu)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 10_000)
    cp = ControlPlane(Store(tmp_path / "server.db"))
    await cp.add_dataset("ds", src.as_uri())
    for n in ("n1", "n2"):
        cp.heartbeat(n, {"labels": {"role": "gpu"}, "free": 10**9})
    cp.check_liveness()  # runs the reschedule the joins asked for
    return cp


@pytest.fixture
async def plane(tmp_path):
    cp = await two_node_plane(tmp_path)
    cp.assign("ds", Assignment("ds", selector={"role": "gpu"}))
    yield cp
    cp.store.close()


def beat(cp: ControlPlane, node: str, state: str, cached: int, holdings: bytes | None = None) -> dict:
    snap = cp.store.dataset("ds")["snapshot"]
    body = {"labels": {"role": "gpu"}, "free": 10**9,
            "datasets": {"ds": {"snapshot": snap, "state": state, "bytes_cached": cached, "bytes_total": 10_000}}}
    if holdings is not None:
        body["holdings"] = {snap: encode_bitmap(holdings)}
    return cp.heartbeat(node, body)


def stored(cp: ControlPlane, node: str) -> dict:
    return cp.store.placements("ds", node)[0]


async def test_state_changes_are_written_at_once_progress_behind_and_reads_see_both(plane):
    beat(plane, "n1", "syncing", 1_000)
    assert stored(plane, "n1")["state"] == "syncing"  # a state change: in the database now
    beat(plane, "n1", "syncing", 5_000)
    assert stored(plane, "n1")["bytes_cached"] == 1_000  # progress only: not yet written
    # Anything that reads placements back flushes first, so no view is stale.
    assert plane.dataset_view("ds")["nodes"]["n1"]["bytes_cached"] == 5_000
    assert stored(plane, "n1")["bytes_cached"] == 5_000
    beat(plane, "n1", "syncing", 7_000)
    beat(plane, "n1", "ready", 10_000)  # the state change supersedes the buffered progress
    plane.flush()
    row = stored(plane, "n1")
    assert (row["state"], row["bytes_cached"]) == ("ready", 10_000)


async def test_progress_wakes_waiters_but_keeps_every_nodes_cached_answer(plane):
    beat(plane, "n1", "syncing", 1_000)
    answer = beat(plane, "n2", "syncing", 1_000)["desired"]
    version = plane.version
    event = plane.changed
    beat(plane, "n1", "syncing", 2_000)
    assert event.is_set()  # `syncbit wait` and status see the progress
    assert plane.version == version  # ... but nobody's desired list was invalidated
    assert beat(plane, "n2", "syncing", 2_000)["desired"] is answer  # served from the cache


async def test_holdings_serve_the_tracker_at_once_and_persist_on_flush(plane, tmp_path):
    snap = plane.store.dataset("ds")["snapshot"]
    beat(plane, "n1", "syncing", 4_000, holdings=b"\x80")
    assert plane.bitmaps[snap]["n1"] == b"\x80"
    assert plane.store.holdings(snap) == {}  # written behind
    plane.check_liveness()  # the server's one-second loop flushes
    assert plane.store.holdings(snap) == {"n1": b"\x80"}
    beat(plane, "n1", "syncing", 4_000, holdings=b"\xc0")
    plane.flush()
    # A restarted control plane starts its tracker from what was flushed.
    again = ControlPlane(plane.store)
    assert again.bitmaps[snap] == {"n1": b"\xc0"}


async def test_node_row_cache_follows_down_and_up(plane):
    plane.node_down_after = 0.0
    plane.check_liveness()
    assert [n["up"] for n in plane.store.nodes()] == [False, False]
    beat(plane, "n1", "pending", 0)
    assert {n["name"]: n["up"] for n in plane.store.nodes()} == {"n1": True, "n2": False}


# -- tracker: announcements between heartbeats, long-polled lookups ---------------------


def peer_beat(cp: ControlPlane, node: str, address: str) -> None:
    cp.heartbeat(node, {"labels": {"role": "gpu"}, "free": 10**9, "peer_address": address})


def first_block(cp: ControlPlane) -> str:
    return cp.store.snapshot(cp.store.dataset("ds")["snapshot"]).files[0].file_object


async def test_announced_block_is_served_by_its_holder_before_any_heartbeat_bitmap(plane):
    peer_beat(plane, "n1", "10.0.0.1:7071")
    peer_beat(plane, "n2", "10.0.0.2:7071")
    fo = first_block(plane)
    assert plane.lookup("n2", [[fo, 0]], claim=True)[0]["source"] is True  # n2 fetches it from the source
    assert plane.lookup("n1", [[fo, 0]], claim=True)[0]["wait_for"] == "n2"
    assert plane.have("n2", [[fo, 0, "ab" * 32]]) == []
    item = plane.lookup("n1", [[fo, 0]], claim=True)[0]
    assert item == {"id": "ab" * 32, "peers": ["10.0.0.2:7071"]}  # no claim left, the id recorded
    assert plane.store.manifest([fo]) == {fo: {0: "ab" * 32}}


async def test_a_block_being_fetched_is_offered_for_relay_by_the_node_fetching_it(plane):
    peer_beat(plane, "n1", "10.0.0.1:7071")
    peer_beat(plane, "n2", "10.0.0.2:7071")
    fo = first_block(plane)
    assert plane.lookup("n2", [[fo, 0]], claim=True)[0]["source"] is True
    # Asked without a claim (the relay stream) or with one (a source worker): n2 relays it as it arrives.
    assert plane.lookup("n1", [[fo, 0]])[0] == {"id": None, "peers": [], "relay": "10.0.0.2:7071"}
    assert plane.lookup("n1", [[fo, 0]], claim=True)[0]["relay"] == "10.0.0.2:7071"
    assert "relay" not in plane.lookup("n2", [[fo, 0]])[0], "never the asker itself"
    plane.node_meta["n2"]["block_size"] = 2**20
    assert "relay" not in plane.lookup("n1", [[fo, 0]])[0], "another block size: not the same blocks"
    plane.node_meta["n2"]["block_size"] = plane.node_meta["n1"]["block_size"]
    plane.have("n2", [[fo, 0, "ab" * 32]])
    assert plane.lookup("n1", [[fo, 0]])[0] == {"id": "ab" * 32, "peers": ["10.0.0.2:7071"]}, "held: no relay"


async def test_announcement_with_a_conflicting_id_is_refused_and_names_nobody(plane):
    peer_beat(plane, "n1", "10.0.0.1:7071")
    peer_beat(plane, "n2", "10.0.0.2:7071")
    fo = first_block(plane)
    plane.have("n1", [[fo, 0, "ab" * 32]])
    assert plane.have("n2", [[fo, 0, "cd" * 32]]) == [[fo, 0, "ab" * 32]]
    assert plane.lookup("n1", [[fo, 0]])[0]["peers"] == []  # n2 is not a holder of the recorded block


@pytest.mark.parametrize("bad", [None, "x", [[1, 0, "ab" * 32]], [["fo", -1, "ab" * 32]], [["fo", 0, "short"]]])
async def test_malformed_announcement_is_a_config_error_and_changes_nothing(plane, bad):
    from syncbit.errors import ConfigError

    with pytest.raises(ConfigError):
        plane.have("n1", bad)
    assert plane.store.manifest(["fo"]) == {}


async def test_long_polled_lookup_returns_when_the_claimed_block_is_announced(plane, autojump_clock):
    import trio

    peer_beat(plane, "n1", "10.0.0.1:7071")
    peer_beat(plane, "n2", "10.0.0.2:7071")
    fo = first_block(plane)
    plane.lookup("n2", [[fo, 0]], claim=True)
    answers = []

    async def ask() -> None:
        answers.append((await plane.lookup_wait("n1", [[fo, 0]], claim=True, wait=5.0), trio.current_time()))

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(ask)
        await trio.sleep(1.5)
        assert answers == []  # still held: n2 has not announced it
        plane.have("n2", [[fo, 0, "ab" * 32]])
    items, at = answers[0]
    assert items[0]["peers"] == ["10.0.0.2:7071"]
    assert at - start == pytest.approx(1.5)
    # Nothing announced: the answer comes at the deadline, still "wait for n2".
    import time

    plane.claims[(fo, 1)] = ("n2", time.monotonic() + 60)  # claims live on the wall clock
    start = trio.current_time()
    items = await plane.lookup_wait("n1", [[fo, 1]], claim=True, wait=3.0)
    assert items[0]["wait_for"] == "n2" and trio.current_time() - start == pytest.approx(3.0)


async def test_grants_bound_the_source_claims_of_one_lookup(tmp_path):
    # Three 1-block files: the lookup grants the first two in the asker's order, leaves the third unclaimed.
    src = tmp_path / "src3"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(name.encode() * 1000)
    store = Store(tmp_path / "s3.db")
    cp = ControlPlane(store)
    await cp.add_dataset("three", src.as_uri())
    peer_beat(cp, "n1", "10.0.0.1:7071")
    peer_beat(cp, "n2", "10.0.0.2:7071")
    fos = [f.file_object for f in store.snapshot(store.dataset("three")["snapshot"]).files]
    items = cp.lookup("n1", [[fo, 0] for fo in reversed(fos)], claim=True, grants=2)
    assert [("source" in it, "wait_for" in it) for it in items] == [(True, False), (True, False), (False, False)]
    # The ungranted one is free for the next asker; the granted ones are n1's.
    items = cp.lookup("n2", [[fo, 0] for fo in fos], claim=True, grants=5)
    assert [it.get("source", False) for it in items] == [True, False, False]
    assert [it.get("wait_for") for it in items] == [None, "n1", "n1"]
    store.close()


async def test_an_older_heartbeat_bitmap_does_not_erase_a_newer_announcement(plane):
    peer_beat(plane, "n1", "10.0.0.1:7071")
    peer_beat(plane, "n2", "10.0.0.2:7071")
    fo = first_block(plane)
    plane.have("n2", [[fo, 0, "ab" * 32]])
    # n2's next beat carries a bitmap it built before it stored block 0 (all zero).
    snap = plane.store.dataset("ds")["snapshot"]
    plane.heartbeat("n2", {"labels": {"role": "gpu"}, "free": 10**9, "peer_address": "10.0.0.2:7071",
                           "holdings": {snap: encode_bitmap(b"\x00")}})
    assert plane.lookup("n1", [[fo, 0]])[0]["peers"] == ["10.0.0.2:7071"]


async def test_an_announcement_before_the_first_heartbeat_records_ids_but_names_no_holder(plane):
    fo = first_block(plane)
    assert plane.have("n9", [[fo, 0, "ab" * 32]]) == []  # a node this server has not heard from
    peer_beat(plane, "n1", "10.0.0.1:7071")
    assert plane.lookup("n1", [[fo, 0]])[0] == {"id": "ab" * 32, "peers": []}


async def test_a_failed_flush_keeps_what_it_could_not_write(plane, monkeypatch):
    snap = plane.store.dataset("ds")["snapshot"]
    beat(plane, "n1", "syncing", 1_000, holdings=b"\x80")

    def full_disk(*a, **k):
        raise OSError("database or disk is full")

    monkeypatch.setattr(plane.store, "put_holdings", full_disk)
    with pytest.raises(OSError):
        plane.flush()
    monkeypatch.undo()
    plane.flush()
    assert plane.store.holdings(snap) == {"n1": b"\x80"}


async def test_heartbeat_answers_carry_the_servers_epoch(plane, tmp_path):
    answer = beat(plane, "n1", "syncing", 1_000)
    assert answer["epoch"] == plane.epoch
    assert ControlPlane(plane.store).epoch != plane.epoch  # a restarted server: agents resend every bitmap
