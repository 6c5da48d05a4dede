"""The control plane's behaviour: datasets, assignments, node liveness, scheduling, reports.

``ControlPlane`` owns the store and the in-memory liveness table, and is what
the HTTP API calls. It resolves sources itself (``dataset add``/``update``),
so every node receives the same pinned snapshot. Scheduling runs after
anything that can change a placement: an assignment, a node going up or
down, a node's labels or free space changing, a new snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import trio

from ..errors import ConfigError, DatasetNotFound
from ..model import block_count, decode_bitmap
from ..sources import open_source
from ..sqlite_tx import transaction
from .scheduler import Assignment, NodeView, place
from .store import Store

log = logging.getLogger(__name__)

STATES = ("pending", "syncing", "ready", "failed")
# A dataset name is also the name part of its Kubernetes node label
# (dataset.syncbit.io/<name>): at most 63 characters, alphanumeric at both ends.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
MAX_BLOCK_REPORTS = 100_000  # per heartbeat


@dataclass
class Liveness:
    last_seen: float
    up: bool


def check_name(name: object, what: str = "dataset") -> str:
    if not isinstance(name, str) or not (_NAME if what == "dataset" else _NODE).match(name):
        if what == "dataset":
            raise ConfigError(f"invalid dataset name {name!r}: use at most 63 letters, digits, '.', '_' and '-', "
                              "starting and ending with a letter or digit (it is also a Kubernetes label name)")
        raise ConfigError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    return name


class ControlPlane:
    def __init__(self, store: Store, *, node_down_after: float = 30.0, heartbeat_interval: float = 5.0) -> None:
        self.store = store
        self.node_down_after = node_down_after
        self.heartbeat_interval = heartbeat_interval
        self.live: dict[str, Liveness] = {}
        self.changed = trio.Event()  # fires on any placement or node state change (wait, status)
        self._told: dict[str, list[dict]] = {}  # node -> the desired list it was last sent
        self._poll_wakes: dict[str, trio.Event] = {}  # node -> wakes its long poll (desired_wait)
        self._poll_spread = 0.0  # seconds over which the polls woken last look again
        self.heartbeats = 0
        # Heartbeat fast path: answers and reports cached in memory, so a steady
        # node's heartbeat reads and writes nothing (see tools/bench/cp_scale_bench.py).
        self.version = 0
        self._desired: dict[str, tuple[int, list[dict]]] = {}
        self._desired_ctx: tuple[int, dict, dict] = (-1, {}, {})
        self._node_rows: dict[str, dict] = {}
        # Written behind by flush(): (node, dataset) -> report; (node, snapshot) -> bitmap.
        self._progress: dict[tuple[str, str], tuple] = {}
        self._dirty_holdings: dict[tuple[str, str], bytes] = {}
        self._reports: dict[tuple[str, str], tuple] = {}
        # Recent manifest entries, keyed "fo:idx": strings, not tuples, so that
        # half a million of them add nothing to the garbage collector's passes.
        self._recorded: dict[str, str] = {}
        self.reschedule_pending = False
        # Tracker state, in memory: refreshed by every heartbeat.
        self.node_meta: dict[str, dict] = {}  # node -> peer_address, block_size, uploads, zone
        self.bitmaps: dict[str, dict[str, bytes]] = {}  # snapshot -> node -> held-block bitmap
        self.claims: dict[tuple[str, int], tuple[str, float]] = {}  # block -> (node fetching it from the source, until)
        self._announced = trio.Event()  # fires on every have(): wakes long-polled lookups
        self._announced_by: dict[str, dict[tuple[str, int], float]] = {}  # node -> block -> when announced
        # Agents resend every bitmap when this changes (a restarted server may have lost
        # the last second of them: they are written behind).
        self.epoch = os.urandom(8).hex()
        self._positions: dict[int, dict[str, list[tuple[str, int]]]] = {}  # block size -> fo -> [(snapshot, bit)]
        # Kubernetes (k8s/controller.py): what it reads and what it feeds back.
        self.complete: dict[tuple[str, str], bool] = {}  # (node, dataset) -> served snapshot fully cached
        self.heard: set[str] = set()  # nodes that sent a heartbeat since this process started
        self.node_labels: dict[str, dict[str, str]] = {}  # node -> labels of its Kubernetes Node object
        self.in_use: dict[str, frozenset[str]] = {}  # node -> datasets that running pods there use
        self._placements_held = False  # see hold_placements()
        for snap_id in store.snapshot_ids():
            for node, bitmap in store.holdings(snap_id).items():
                self.bitmaps.setdefault(snap_id, {})[node] = bitmap
        for n in store.nodes():
            # After a restart every node gets a fresh grace period before it counts as down.
            self.live[n["name"]] = Liveness(time.monotonic(), n["up"])

    def _notify(self, nodes: Iterable[str] | None = None) -> None:
        """Placements, datasets or assignments changed: desired() answers are recomputed.

        ``nodes``: the only nodes whose desired list may have changed (None:
        any). Only their long polls wake: a node joining a cluster of
        thousands must not make every other node's poll recompute its list.
        """
        self.version += 1
        woken = list(self._poll_wakes) if nodes is None else [n for n in set(nodes) if n in self._poll_wakes]
        self._poll_spread = len(woken) * self.POLL_RECHECK
        for n in woken:
            self._poll_wakes.pop(n).set()
        self._wake()

    def _wake(self) -> None:
        """Something a waiter or a status reader sees changed (a state, progress)."""
        self.changed.set()
        self.changed = trio.Event()

    # -- datasets -------------------------------------------------------------

    async def add_dataset(self, name: str, uri: str, options: Mapping[str, str] | None = None) -> dict:
        check_name(name)
        if self.store.dataset(name) is not None:
            raise ConfigError(f"dataset {name!r} exists (use 'syncbit dataset update' for a new snapshot)")
        snap = await self._resolve(uri, options or {})
        self.store.put_dataset(name, uri, options or {}, snap)
        self._positions.clear()
        log.info("dataset %s: %s, snapshot %s (%d files, %d bytes)", name, uri, snap.revision, len(snap.files),
                 snap.total_size)
        self.reschedule()
        return self.dataset_view(name)

    async def update_dataset(self, name: str, revision: str | None = None) -> dict:
        ds = self._dataset(name)
        uri = ds["uri"]
        if revision is not None:
            uri = with_revision(uri, revision)
        snap = await self._resolve(uri, ds["options"])
        if snap.id != ds["snapshot"]:
            self.store.put_dataset(name, uri, ds["options"], snap)
            self._positions.clear()
            log.info("dataset %s: new snapshot %s (%s)", name, snap.revision, uri)
            self.reschedule()
            self._notify()
        return self.dataset_view(name)

    async def _resolve(self, uri: str, options: Mapping[str, str]):
        src = await open_source(uri, options)
        try:
            return await src.resolve()
        finally:
            await src.aclose()

    def remove_dataset(self, name: str) -> None:
        self._dataset(name)
        self.store.delete_dataset(name)
        self._reports.clear()
        log.info("dataset %s removed", name)
        self._notify()

    def _dataset(self, name: str) -> dict:
        ds = self.store.dataset(name)
        if ds is None:
            raise DatasetNotFound(f"no dataset named {name!r} on the control plane")
        return ds

    def dataset_view(self, name: str) -> dict:
        self.flush()
        ds = self._dataset(name)
        snap = self.store.snapshot(ds["snapshot"])
        assignment = next((a for a in self.store.assignments() if a["dataset"] == name), None)
        return {
            "name": name, "uri": ds["uri"], "options": ds["options"], "snapshot": ds["snapshot"],
            "revision": snap.revision if snap else None, "files": len(snap.files) if snap else 0,
            "bytes_total": snap.total_size if snap else 0,
            "assignment": assignment and {**assignment["spec"], "switch": assignment["switch"],
                                          "problem": assignment["problem"]},
            "nodes": {p["node"]: self._placement_view(p) for p in self.store.placements(name)},
        }

    def _placement_view(self, p: dict) -> dict:
        live = self.live.get(p["node"])
        return {"state": p["state"], "error": p["error"], "snapshot": p["snapshot"],
                "bytes_cached": p["bytes_cached"], "bytes_total": p["bytes_total"],
                "node_up": bool(live and live.up)}

    # -- assignments ----------------------------------------------------------

    def assign(self, dataset: str, a: Assignment, switch: str = "complete") -> dict:
        self._dataset(dataset)
        if switch not in ("complete", "immediate"):
            raise ConfigError(f"switch must be 'complete' or 'immediate', got {switch!r}")
        spec = {"nodes": list(a.nodes) if a.nodes else None, "selector": dict(a.selector) if a.selector else None,
                "replicas": a.replicas, "spread_by": a.spread_by, "taint_until_ready": a.taint_until_ready}
        self.store.put_assignment(dataset, spec, switch)
        self.reschedule()
        return self.dataset_view(dataset)

    def unassign(self, dataset: str) -> None:
        self._dataset(dataset)
        self.store.delete_assignment(dataset)
        self._reports.clear()
        log.info("dataset %s unassigned", dataset)
        self._notify()

    def hold_placements(self, hold: bool) -> None:
        """While held, placements stay as stored (Kubernetes mode, until the Node labels are known:
        a reschedule without them would drop every placement that selects on them)."""
        self._placements_held = hold
        if not hold:
            self.reschedule_pending = True

    def reschedule(self) -> None:
        """Recompute every assignment's placements (cheap: pure, in memory, a few rows per change)."""
        if self._placements_held:
            self.reschedule_pending = True
            return
        self._reports.clear()  # placements may be reset or re-made: take the next reports as news
        nodes = self._node_views()
        changed = False
        moved: set[str] = set()  # nodes that gained or lost a placement
        for row in self.store.assignments():
            ds = self.store.dataset(row["dataset"])
            if ds is None:
                continue
            snap = self.store.snapshot(ds["snapshot"])
            spec = row["spec"]
            try:
                a = Assignment(row["dataset"], tuple(spec["nodes"]) if spec.get("nodes") else None,
                               spec.get("selector"), spec.get("replicas"), spec.get("spread_by"),
                               bool(spec.get("taint_until_ready")))
            except ConfigError as e:  # a row written by an older version: report it, schedule the rest
                log.error("dataset %s: unusable assignment %s: %s", row["dataset"], spec, e)
                continue
            current = {p["node"] for p in self.store.placements(row["dataset"])}
            placement = place(a, nodes, snap.total_size if snap else 0, current)
            added, removed = self.store.set_placements(row["dataset"], placement.nodes, ds["snapshot"])
            if placement.problem != row["problem"]:
                self.store.set_assignment_problem(row["dataset"], placement.problem)
                if placement.problem:
                    log.warning("dataset %s: %s", row["dataset"], placement.problem)
                changed = True
            if added or removed:
                log.info("dataset %s: placed on %s%s", row["dataset"], ", ".join(placement.nodes) or "no node",
                         f" (removed from {', '.join(sorted(removed))})" if removed else "")
                changed = True
                moved |= added | removed
        if changed:
            self._notify(moved)

    def _node_views(self) -> list[NodeView]:
        self.flush()
        held: dict[str, dict[str, int]] = {}
        for p in self.store.placements():
            held.setdefault(p["node"], {})[p["dataset"]] = p["bytes_cached"]
        return [NodeView(n["name"], self.labels_of(n["name"], n["labels"]), self._is_up(n["name"]), n["free"],
                         held.get(n["name"], {}))
                for n in self.store.nodes()]

    def labels_of(self, node: str, reported: Mapping[str, str]) -> dict[str, str]:
        """The agent's labels, then its Kubernetes Node's (which win: they are what pods select on)."""
        return {**reported, **self.node_labels.get(node, {})}

    def set_node_labels(self, node: str, labels: Mapping[str, str] | None) -> None:
        """Labels of the Kubernetes Node ``node`` (None: the Node is gone); reschedules when they change."""
        labels = dict(labels) if labels is not None else {}
        if self.node_labels.get(node, {}) == labels:
            return
        if labels:
            self.node_labels[node] = labels
        else:
            self.node_labels.pop(node, None)
        self.reschedule_pending = True

    def set_in_use(self, in_use: Mapping[str, frozenset[str]]) -> None:
        """Datasets that running pods use, per node: they stay pinned there even when unassigned."""
        in_use = {n: frozenset(d) for n, d in in_use.items() if d}
        if in_use != self.in_use:
            differ = {n for n in in_use.keys() | self.in_use.keys() if in_use.get(n) != self.in_use.get(n)}
            self.in_use = in_use
            self._notify(differ)

    def node_datasets(self) -> dict[str, dict]:
        """Per node: the datasets complete there (``ready``), those it still syncs for an assignment
        that taints until ready (``tainting``), whether the node is up and heard since this start.
        """
        self.flush()
        tainting = {a["dataset"] for a in self.store.assignments() if a["spec"].get("taint_until_ready")}
        out: dict[str, dict] = {}
        for n in self.store.nodes():
            out[n["name"]] = {"ready": set(), "tainting": set(), "up": self._is_up(n["name"]),
                              "heard": n["name"] in self.heard}
        for p in self.store.placements():
            view = out.get(p["node"])
            if view is None:
                continue
            # "ready" or the served snapshot complete: a node staging a new snapshot, or an
            # agent restarting and re-checking its cache, still has the whole dataset.
            if view["up"] and (p["state"] == "ready" or self.complete.get((p["node"], p["dataset"]))):
                view["ready"].add(p["dataset"])
            elif p["dataset"] in tainting:
                view["tainting"].add(p["dataset"])
        return out

    def _is_up(self, name: str) -> bool:
        live = self.live.get(name)
        return bool(live and live.up)

    # -- nodes ------------------------------------------------------------------

    def heartbeat(self, name: str, body: Mapping) -> dict:
        # Everything is checked before anything is applied: a malformed
        # heartbeat changes nothing (not even registering the node).
        check_name(name, "node")
        labels = body.get("labels", {})
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in labels.items()):
            raise ConfigError("labels must be an object of strings")
        labels = dict(labels)
        capacity, free, uploads = _int(body, "capacity"), _int(body, "free"), _int(body, "uploads")
        datasets = body.get("datasets", {})
        if not isinstance(datasets, Mapping):
            raise ConfigError("datasets must be an object")
        reports = []
        for ds_name, rep in datasets.items():
            if not isinstance(rep, Mapping) or rep.get("state") not in STATES:
                raise ConfigError(f"dataset report {ds_name!r}: needs a state in {', '.join(STATES)}")
            reports.append((str(ds_name), (str(rep.get("snapshot")), rep["state"],
                                           rep.get("error") if isinstance(rep.get("error"), str) else None,
                                           _int(rep, "bytes_cached"), _int(rep, "bytes_total"))))
        complete = {str(ds_name): rep.get("complete") is True for ds_name, rep in datasets.items()}
        blocks = _parse_blocks(body.get("blocks", []))
        holdings = body.get("holdings", {})
        if not isinstance(holdings, Mapping):
            raise ConfigError("holdings must be an object of snapshot -> bitmap")
        decoded = {str(s): decode_bitmap(b) for s, b in holdings.items()}
        address = body.get("peer_address")
        if address is not None and (not isinstance(address, str) or ":" not in address or len(address) > 300):
            raise ConfigError("peer_address must be HOST:PORT")
        block_size = body.get("block_size", 4 * 2**20)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ConfigError("block_size must be a positive integer")

        now = time.time()
        self.heartbeats += 1
        live = self.live.get(name)
        row = self._node_row(name)
        reschedule = live is None or not live.up or row is None
        if reschedule:
            log.info("node %s %s (labels %s)", name, "registered" if row is None else "is up", labels)
        self.live[name] = Liveness(time.monotonic(), True)
        # One commit for the whole beat: a node back after a server restart
        # reports every dataset at once, and a commit each was most of its cost.
        try:
            with transaction(self.store.db.conn):
                if row is None or row["labels"] != labels or _free_changed(row["free"], free) or not row["up"]:
                    if row is not None and (row["labels"] != labels or _free_changed(row["free"], free)):
                        reschedule = True
                    self.store.put_node(name, labels, capacity, free, True, now)
                    self._node_rows[name] = {"labels": labels, "free": free, "up": True}
                notify = False
                for ds_name, report in reports:
                    last = self._reports.get((name, ds_name))
                    if last == report:
                        continue  # nothing new: no database round trip
                    self._reports[(name, ds_name)] = report
                    if last is not None and last[:3] == report[:3]:
                        # Progress only (same snapshot, state and error): written by the next flush().
                        self._progress[(name, ds_name)] = report
                        notify = True
                        continue
                    self._progress.pop((name, ds_name), None)
                    if self.store.report(name, ds_name, *report):
                        notify = True
                        log.info("node %s: dataset %s is %s%s", name, ds_name, report[1],
                                 f" ({report[2]})" if report[2] else "")
                    elif report[1] == "syncing":
                        notify = True  # progress for waiters and status
                refused = self._blocks(name, blocks)
        except BaseException:
            # Rolled back: the in-memory copies must not claim it was written.
            self._node_rows.pop(name, None)
            for ds_name, _ in reports:
                self._reports.pop((name, ds_name), None)
            raise
        for snap_id, bitmap in decoded.items():
            self.bitmaps.setdefault(snap_id, {})[name] = bitmap
            self._dirty_holdings[(name, snap_id)] = bitmap
        if decoded and self._announced_by.get(name):
            # The agent built these bitmaps before it sent the beat: blocks it announced
            # meanwhile may be missing from them. Announcements stay valid for ANNOUNCED_FOR.
            now = time.monotonic()
            recent = {k: t for k, t in self._announced_by[name].items() if now - t < self.ANNOUNCED_FOR}
            self._announced_by[name] = recent
            self._set_bits(name, list(recent), only=set(decoded))
        self.heard.add(name)
        for ds_name, done in complete.items():
            if self.complete.get((name, ds_name)) != done:
                self.complete[(name, ds_name)] = done
                notify = True
        self.node_meta[name] = {"peer_address": address, "block_size": block_size, "uploads": uploads,
                                "zone": labels.get(self.topology_label)}
        if reschedule:
            # Not now: a burst of joining nodes would each pay a full reschedule
            # inside its heartbeat. The liveness loop runs it within a second.
            self.reschedule_pending = True
        if notify:
            # States and progress are not part of any node's desired answer:
            # waking the waiters must not invalidate every node's cached answer.
            self._wake()
        desired = self._told[name] = self.desired(name)
        return {"desired": desired, "version": self.version, "long_poll": len(self.live) <= self.LONG_POLL_NODES,
                "refused_blocks": refused,
                "heartbeat_interval": self.heartbeat_interval, "epoch": self.epoch}

    def flush(self) -> None:
        """Write progress and held-block bitmaps that heartbeats left in memory, in one transaction.

        They change with nearly every beat of a syncing node and are resent by
        the agents, so they are written behind (every second, and before
        anything reads them back) rather than committed once per heartbeat:
        at 1,000 nodes those commits were a fifth of the server's time.
        """
        if not (self._progress or self._dirty_holdings):
            return
        progress, holdings = self._progress, self._dirty_holdings
        self._progress, self._dirty_holdings = {}, {}
        per_node: dict[str, dict[str, bytes]] = {}
        for (node, snap_id), bitmap in holdings.items():
            per_node.setdefault(node, {})[snap_id] = bitmap
        try:
            with transaction(self.store.db.conn):
                for (node, ds_name), report in progress.items():
                    self.store.report(node, ds_name, *report)
                for node, bitmaps in per_node.items():
                    self.store.put_holdings(node, bitmaps)
        except BaseException:
            # Kept for the next flush (newer entries win), not lost.
            self._progress = {**progress, **self._progress}
            self._dirty_holdings = {**holdings, **self._dirty_holdings}
            raise

    def _node_row(self, name: str) -> dict | None:
        """The node's stored labels, free space and up flag (kept in memory: read by every heartbeat)."""
        row = self._node_rows.get(name)
        if row is None:
            found = self.store.db.execute("SELECT labels, free, up FROM nodes WHERE name=?", (name,)).fetchone()
            if found is None:
                return None
            row = self._node_rows[name] = {"labels": json.loads(found[0]), "free": found[1], "up": bool(found[2])}
        return row

    def _blocks(self, node: str, reports: list[tuple[str, int, str]]) -> list:
        clean = []
        refused = []
        for item in reports:
            known = self._recorded.get(f"{item[0]}:{item[1]}")
            if known == item[2]:
                continue  # already recorded (every node hashes the same blocks)
            if known is not None:
                refused.append((item[0], item[1], item[2], known))
                continue
            clean.append(tuple(item))
        refused += self.store.record_blocks(node, clean)
        refused_keys = {(fo, idx) for fo, idx, _, _ in refused}
        if len(self._recorded) > 500_000:  # bounded (~100 MB): forget the oldest half
            for key in list(self._recorded)[:250_000]:
                del self._recorded[key]
        for fo, idx, block in clean:
            if (fo, idx) not in refused_keys:
                self._recorded[f"{fo}:{idx}"] = block
        for fo, idx, got, recorded in refused:
            log.warning("node %s reported block %s of file object %s as %s, but %s is recorded: refused",
                        node, idx, fo, got, recorded)
        return [[fo, idx, recorded] for fo, idx, _, recorded in refused]

    # -- tracker ------------------------------------------------------------------

    topology_label = "zone"
    MAX_PEERS = 4

    CLAIM_SECONDS = 30.0

    def lookup(self, asker: str, items: list, claim: bool = False, grants: int | None = None) -> list[dict]:
        """For each (file object, index): its recorded block id and up to four holders, best first.

        Best: the asker's topology domain first, then fewer active uploads,
        then a random order so that no single holder serves the whole swarm.
        Never the asker; only nodes that are up and serve peers.

        With ``claim``, a block nobody holds is the cluster's single flight to
        the source: the first asker gets it (``"source": true``) for
        ``CLAIM_SECONDS``; later askers are told which node is fetching it
        (``"wait_for"``) and ask again, to take it from that node. ``grants``
        bounds how many blocks one lookup hands out (the first ones in the
        asker's order); the others nobody holds are answered without a claim.
        With or without ``claim``, a block nobody holds that another node is
        fetching names that node's peer address as ``"relay"``: it passes the
        block on while it arrives.
        """
        if not isinstance(items, list) or len(items) > 10_000 or not all(
                isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) and isinstance(it[1], int)
                and it[1] >= 0 for it in items):
            raise ConfigError("items must be a list of at most 10000 [file object, block index] pairs")
        me = self.node_meta.get(asker, {})
        bs = me.get("block_size", 4 * 2**20)
        ids = self.store.manifest({fo for fo, _ in items})
        out = []
        granted = 0
        for fo, idx in items:
            holders = set()
            for snap_id, first_bit in self._fo_positions(bs).get(fo, ()):
                bit = first_bit + idx
                for node, bitmap in self.bitmaps.get(snap_id, {}).items():
                    if node == asker or node in holders or bit // 8 >= len(bitmap):
                        continue
                    if bitmap[bit // 8] >> (7 - bit % 8) & 1:
                        holders.add(node)
            usable = [n for n in holders if self._is_up(n) and self.node_meta.get(n, {}).get("peer_address")
                      and self.node_meta[n].get("block_size") == bs]
            random.shuffle(usable)
            usable.sort(key=lambda n: (self.node_meta[n].get("zone") != me.get("zone"),
                                       self.node_meta[n].get("uploads", 0)))
            item = {"id": ids.get(fo, {}).get(idx),
                    "peers": [self.node_meta[n]["peer_address"] for n in usable[:self.MAX_PEERS]]}
            if not usable:
                now = time.monotonic()
                holder = self.claims.get((fo, idx))
                if holder is not None and holder[0] != asker and holder[1] > now and self._is_up(holder[0]):
                    relay = self.node_meta.get(holder[0], {})
                    if relay.get("peer_address") and relay.get("block_size") == bs:
                        item["relay"] = relay["peer_address"]  # it can pass the block on as it arrives
                    if claim:
                        item["wait_for"] = holder[0]
                elif claim and (grants is None or granted < grants):
                    self.claims[(fo, idx)] = (asker, now + self.CLAIM_SECONDS)
                    item["source"] = True
                    granted += 1
            out.append(item)
        if claim and len(self.claims) > 1_000_000:  # expired claims, dropped now and then
            now = time.monotonic()
            self.claims = {k: v for k, v in self.claims.items() if v[1] > now}
        return out

    MAX_WAIT = 5.0
    ANNOUNCED_FOR = 10.0  # seconds an announcement outlives a heartbeat's older bitmap

    async def lookup_wait(self, asker: str, items: list, claim: bool = False, wait: float = 0.0,
                          grants: int | None = None) -> list[dict]:
        """``lookup``, long-polled: while every block is only being fetched by other nodes
        (``wait_for``), wait up to ``wait`` seconds for one of them to announce it holds it."""
        deadline = trio.current_time() + min(max(0.0, wait), self.MAX_WAIT)
        while True:
            announced = self._announced
            out = self.lookup(asker, items, claim, grants)
            if not all("wait_for" in it for it in out) or trio.current_time() >= deadline:
                return out
            with trio.move_on_at(deadline):
                await announced.wait()

    def have(self, node: str, reports: list) -> list:
        """A node announces blocks it just stored: ``[[file object, index, id], ...]``.

        Sent the moment blocks arrive, between heartbeats: the tracker names
        this node as a holder at once (and wakes the nodes waiting for those
        blocks), instead of at the node's next heartbeat. The ids also go into
        the manifest; a conflicting id is refused as in a heartbeat.
        """
        check_name(node, "node")
        blocks = _parse_blocks(reports)
        with transaction(self.store.db.conn):
            refused = self._blocks(node, blocks)
        if node not in self.node_meta:
            return refused  # no heartbeat since this server started: block size and address unknown yet
        bad = {(fo, idx) for fo, idx, _ in refused}
        recent = self._announced_by.setdefault(node, {})
        now = time.monotonic()
        for fo, idx, _ in blocks:
            if (fo, idx) in bad:
                continue
            self.claims.pop((fo, idx), None)
            recent[(fo, idx)] = now
        self._set_bits(node, [(fo, idx) for fo, idx, _ in blocks if (fo, idx) not in bad])
        self._announced.set()
        self._announced = trio.Event()
        return refused

    def _set_bits(self, node: str, blocks: list[tuple[str, int]], only: set[str] | None = None) -> None:
        """Mark ``node`` as holding ``blocks`` in the bitmaps of every snapshot (or those in ``only``)."""
        positions = self._fo_positions(self.node_meta[node]["block_size"])
        for fo, idx in blocks:
            for snap_id, first_bit in positions.get(fo, ()):
                if only is not None and snap_id not in only:
                    continue
                per_node = self.bitmaps.setdefault(snap_id, {})
                bitmap = per_node.get(node, b"")
                if not isinstance(bitmap, bytearray):  # the heartbeat's bytes: copied once, then set in place
                    bitmap = per_node[node] = bytearray(bitmap)
                bit = first_bit + idx
                if len(bitmap) <= bit // 8:
                    bitmap.extend(bytes(bit // 8 + 1 - len(bitmap)))
                bitmap[bit // 8] |= 0x80 >> (bit % 8)

    def _fo_positions(self, block_size: int) -> dict[str, list[tuple[str, int]]]:
        """file object -> [(snapshot, bit of its block 0 in that snapshot's bitmaps)], per block size."""
        positions = self._positions.get(block_size)
        if positions is None:
            positions = self._positions[block_size] = {}
            for snap_id in self.store.snapshot_ids():
                snap = self.store.snapshot(snap_id)
                bit = 0
                for f in snap.files:
                    positions.setdefault(f.file_object, []).append((snap_id, bit))
                    bit += block_count(f.size, block_size)
        return positions

    POLL_RECHECK = 0.002  # seconds of spread per waiting poll when the version changes
    # Agents long-poll their desired state only in clusters up to this size. Measured at 1,000
    # simulated nodes on one core (tools/bench/cp_scale_bench.py), a held poll per node raised
    # heartbeat p99 from 46-56 ms to 227-452 ms; bigger clusters take assignments at heartbeats.
    LONG_POLL_NODES = 200

    async def desired_wait(self, node: str, since: int, timeout: float) -> tuple[int, list[dict] | None]:
        """(version, desired list) for a node's long poll: at once if ``since`` is -1 or the node's
        list is not the one it was last sent, else when it changes; else (version, None) at the
        timeout: nothing new, and nothing to encode or send.

        Every agent holds one, so they must cost nothing while nothing changes
        for them: only the polls of the nodes a change may concern are woken
        (``_notify``), spread over POLL_RECHECK seconds per poll woken; each
        answers only if its node's list differs from the one it was last sent;
        and timeouts are spread over the timeout's second half, so polls
        started together do not come back together.
        """
        deadline = trio.current_time() + timeout * random.uniform(0.5, 1.0)
        with trio.move_on_at(deadline):
            while since >= 0 and (self.version == since or self.desired(node) == self._told.get(node)):
                since = self.version  # nothing yet, or a new version with the same list: keep waiting
                await self._poll_wakes.setdefault(node, trio.Event()).wait()
                await trio.sleep(random.uniform(0.0, self._poll_spread))
        if since >= 0 and self.desired(node) == self._told.get(node):
            return self.version, None  # the timeout, and nothing new for this node
        desired = self._told[node] = self.desired(node)
        return self.version, desired

    def desired(self, node: str) -> list[dict]:
        hit = self._desired.get(node)
        if hit is not None and hit[0] == self.version:
            return hit[1]
        out = self._compute_desired(node)
        self._desired[node] = (self.version, out)
        return out

    def _compute_desired(self, node: str) -> list[dict]:
        # After a change every node recomputes its answer once: the datasets
        # and assignments are read once per version, not once per node.
        if self._desired_ctx[0] != self.version:
            self._desired_ctx = (self.version, {a["dataset"]: a["switch"] for a in self.store.assignments()},
                                 {d["name"]: d for d in self.store.datasets()})
        _, switches, datasets = self._desired_ctx
        out = []
        for p in self.store.placements(node=node):
            ds = datasets.get(p["dataset"])
            if ds is None:
                continue
            out.append({"dataset": p["dataset"], "uri": ds["uri"], "options": ds["options"],
                        "snapshot": p["snapshot"], "switch": switches.get(p["dataset"], "complete")})
        placed = {d["dataset"] for d in out}
        # Unassigned but used by a running pod here: the agent keeps what it has pinned.
        out.extend({"dataset": name, "keep": True} for name in sorted(self.in_use.get(node, frozenset()) - placed))
        return out

    def check_liveness(self, lag: float = 0.0) -> None:
        """Mark nodes that missed heartbeats for ``node_down_after`` as down (and re-place their replicas).

        ``lag`` is how late this check runs: when the server itself is behind,
        missing heartbeats may be waiting in its own queue, so nobody is marked
        down this round (otherwise an overload turns into a re-placement storm).
        """
        self.flush()
        if self.reschedule_pending:
            self.reschedule_pending = False
            self.reschedule()
        if lag > self.node_down_after / 4:
            log.warning("liveness check %.1fs late: the server is overloaded; not marking nodes down", lag)
            return
        now = time.monotonic()
        down = [n for n, live in self.live.items() if live.up and now - live.last_seen > self.node_down_after]
        for n in down:
            self.live[n].up = False
            self.store.set_node_up(n, False, time.time())
            self._node_rows.pop(n, None)
            log.warning("node %s is down (no heartbeat for %.0fs)", n, now - self.live[n].last_seen)
        if down:
            self.reschedule()
            self._notify(down)  # others' lists change only if the reschedule moved placements to them

    def nodes_view(self) -> list[dict]:
        self.flush()
        per_node: dict[str, dict] = {}
        for p in self.store.placements():
            per_node.setdefault(p["node"], {})[p["dataset"]] = p["state"]
        return [{"name": n["name"], "labels": self.labels_of(n["name"], n["labels"]), "up": self._is_up(n["name"]),
                 "capacity": n["capacity"], "free": n["free"], "last_seen": n["last_seen"],
                 "datasets": per_node.get(n["name"], {})} for n in self.store.nodes()]

    def status(self) -> dict:
        return {"nodes": self.nodes_view(), "datasets": [self.dataset_view(d["name"]) for d in self.store.datasets()]}

    def wait_state(self, name: str, node: str | None) -> tuple[str, str | None]:
        """("ready" | "failed" | "waiting", reason) for a dataset on one node or on all its placements."""
        ds = self.dataset_view(name)
        nodes = ds["nodes"]
        if node is not None:
            if node not in nodes:
                return "waiting", f"dataset {name} is not placed on node {node}"
            nodes = {node: nodes[node]}
        if not nodes:
            problem = (ds["assignment"] or {}).get("problem") if ds["assignment"] else "not assigned to any node"
            return "waiting", f"dataset {name} is not placed on any node ({problem})"
        failed = {n: p for n, p in nodes.items() if p["state"] == "failed"}
        if failed:
            return "failed", "; ".join(f"{n}: {p['error']}" for n, p in sorted(failed.items()))
        waiting = sorted(n for n, p in nodes.items() if p["state"] != "ready" or p["snapshot"] != ds["snapshot"])
        if waiting:
            return "waiting", "not ready on " + ", ".join(
                f"{n} ({nodes[n]['state']}{'' if nodes[n]['node_up'] else ', node down'})" for n in waiting)
        return "ready", None


def _parse_blocks(reports) -> list[tuple[str, int, str]]:
    if not isinstance(reports, list) or len(reports) > MAX_BLOCK_REPORTS:
        raise ConfigError(f"blocks must be a list of at most {MAX_BLOCK_REPORTS} [fo, index, id] items")
    out = []
    for item in reports:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0
                and isinstance(item[2], str) and len(item[2]) == 64):
            raise ConfigError(f"malformed block report {item!r}: expected [file object, index, BLAKE3 hex id]")
        out.append((item[0], item[1], item[2]))
    return out


def _int(body: Mapping, key: str) -> int:
    v = body.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {v!r}")
    return v


def _free_changed(old: int, new: int) -> bool:
    # Free space moves all the time; only a change that could matter to placement reschedules.
    return abs(old - new) > max(old, new) * 0.05


def with_revision(uri: str, revision: str) -> str:
    """The same source at another revision (hf:// only: the other sources have no revisions)."""
    if not uri.startswith("hf://"):
        raise ConfigError("only hf:// datasets have revisions; 'dataset update' without --revision re-lists the source")
    from urllib.parse import quote

    from ..sources.hf import parse_hf

    repo_type, repo_id, _, subdir = parse_hf(uri)
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"hf://{prefix}{repo_id}@{quote(revision, safe='')}" + (f"/{subdir}" if subdir else "")

