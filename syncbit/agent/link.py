"""The agent's link to the control plane: heartbeats out, desired datasets in.

Each heartbeat carries the node's labels, capacity and free space, the state
of every dataset the control plane assigned here, block bitmaps of the
snapshots it holds (only those that changed since the last accepted one) and
the block ids it learnt by hashing since then (the progressive manifest). The
answer lists the datasets this node should hold; the agent applies it.

When the control plane is unreachable the agent carries on with what it was
told last: it serves, prefetches from sources, keeps unreported block ids
(bounded), and catches up at the next successful heartbeat.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import httpx
import trio

from ..model import Snapshot, block_count, encode_bitmap

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

MAX_BLOCKS_PER_HEARTBEAT = 50_000
MAX_ANNOUNCE = 10_000  # stored blocks waiting to be announced (more are left to the heartbeat's bitmaps)
ANNOUNCE_BATCH = 0.05  # seconds


class ControlPlaneLink:
    def __init__(self, agent: Agent, url: str, interval: float) -> None:
        self.agent = agent
        self.url = url
        self.interval = interval
        self.connected = False
        self.last_ok: float | None = None
        self._sent_bitmaps: dict[str, bytes] = {}
        self._epoch: str | None = None  # the control plane's, from heartbeat answers
        self._last_holders: dict[tuple[str, int], tuple[str, list[str]]] = {}  # for tracker outages
        self._http: httpx.AsyncClient | None = None
        self._stored: list[tuple[str, int, str]] = []  # to announce to the tracker
        self._stored_event = trio.Event()
        # Desired states arrive from heartbeats and from the long poll: applied one at a
        # time, and never one older than the last applied (same server epoch).
        self._applying = trio.Lock()
        self._applied: tuple[str | None, int] = (None, -1)
        # Whether the control plane wants a long poll from this node (heartbeat answers say).
        self.long_poll = False
        self._long_poll_on = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.agent.cache.report_learned = True
        async with (httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(30.0, connect=5.0)) as http,
                    trio.open_nursery() as nursery):
            self._http = http
            if self.agent.peer_server is not None:
                nursery.start_soon(self._announce)
            nursery.start_soon(self._follow_desired)
            task_status.started()
            await self._heartbeats()

    def stored(self, fo: str, idx: int, block_id: str) -> None:
        """The fetcher stored a block: announce it to the tracker soon (no await)."""
        if len(self._stored) < MAX_ANNOUNCE:
            self._stored.append((fo, idx, block_id))
            self._stored_event.set()

    async def _announce(self) -> None:
        """Tell the tracker about stored blocks within a fraction of a second, between heartbeats.

        Other nodes waiting for those blocks learn at once that this node
        holds them. Lost announcements cost nothing lasting: the next
        heartbeat's bitmaps carry the same facts.
        """
        while True:
            await self._stored_event.wait()
            self._stored_event = trio.Event()
            await trio.sleep(ANNOUNCE_BATCH)  # a few blocks per request, not one each
            blocks, self._stored = self._stored, []
            try:
                r = await self._http.post("/v1/peers/have", json={
                    "node": self.agent.config.node_name, "blocks": [list(b) for b in blocks]})
                r.raise_for_status()
            except (httpx.HTTPError, OSError) as e:
                log.debug("could not announce %d blocks to the tracker: %s", len(blocks), e)

    DESIRED_POLL = 50.0  # seconds the control plane holds a desired-state request without news (at most)

    async def _follow_desired(self) -> None:
        """Long-poll this node's desired datasets, so that an assignment starts here at once
        rather than at the next heartbeat (every 5 s by default).

        Heartbeats still carry the same answer: this is only the fast path,
        taken while heartbeat answers say ``long_poll`` (the control plane
        turns it off in large clusters, where a held request per node costs
        it more than it saves). A control plane without the endpoint (404) is
        left to the heartbeats.
        """
        node = self.agent.config.node_name
        version = -1
        while True:
            if not self.long_poll:
                await self._long_poll_on.wait()  # a large cluster: heartbeats only, until told otherwise
                version = -1
            try:
                r = await self._http.get(f"/v1/nodes/{node}/desired",
                                         params={"version": version, "timeout": self.DESIRED_POLL},
                                         timeout=httpx.Timeout(self.DESIRED_POLL + 10.0, connect=5.0))
                if r.status_code == 404:
                    log.info("control plane %s has no desired-state long poll: heartbeats only", self.url)
                    return
                r.raise_for_status()
                answer = r.json()
                version = answer["version"] if isinstance(answer["version"], int) else -1
                if not answer.get("unchanged"):
                    await self._apply_desired(answer["desired"], answer.get("epoch"), version)
            except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as e:
                log.debug("desired-state long poll: %s: %s", type(e).__name__, e)
                version = -1
                await trio.sleep(self.interval)

    async def _apply_desired(self, desired: list, epoch: str | None, version: int | None) -> None:
        async with self._applying:
            if isinstance(version, int):
                if epoch == self._applied[0] and version < self._applied[1]:
                    return  # an answer older than one already applied (they cross on the wire)
                self._applied = (epoch, version)
            await self.agent.apply_desired(desired, self)

    async def _heartbeats(self) -> None:
        failures = 0
        while True:
            try:
                await self.beat()
                if failures:
                    log.info("control plane %s is back", self.url)
                failures = 0
            except (httpx.HTTPError, OSError, ValueError) as e:
                failures += 1
                # One warning per outage; the rest at debug level.
                (log.warning if failures == 1 else log.debug)(
                    "control plane %s unreachable (%s: %s); serving and prefetching what we have",
                    self.url, type(e).__name__, e)
                self.connected = False
            await trio.sleep(self.interval if not failures else min(30.0, self.interval * 2 ** min(failures, 3)))

    async def beat(self) -> None:
        body, bitmaps, blocks = self.report()
        r = await self._http.put(f"/v1/nodes/{self.agent.config.node_name}/heartbeat", json=body)
        if r.status_code >= 400:
            raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
        answer = r.json()
        if answer.get("epoch") != self._epoch:
            # A control plane that (re)started: it may have lost the last bitmaps it
            # acknowledged (written behind), so the next beat sends them all again.
            if self._epoch is not None:
                self._sent_bitmaps.clear()
                bitmaps = {}
            self._epoch = answer.get("epoch")
        self.connected = True
        self.last_ok = trio.current_time()
        self._sent_bitmaps.update(bitmaps)
        del self.agent.cache.learned[:blocks]
        for fo, idx, recorded in answer.get("refused_blocks", []):
            # The cluster saw other bytes for this block first: the source
            # served two versions. Forget ours; the next fetch checks against theirs.
            log.error("control plane refused block %s of file object %s (cluster has %s): source changed?",
                      idx, fo, recorded)
            self.agent.cache.forget_file_object(fo)
        allowed = answer.get("long_poll") is True
        if allowed and not self.long_poll:
            self._long_poll_on.set()
        elif not allowed and self.long_poll:
            self._long_poll_on = trio.Event()
        self.long_poll = allowed
        interval = answer.get("heartbeat_interval")
        if isinstance(interval, int | float) and 0.2 <= interval <= 300:
            self.interval = float(interval)
        await self._apply_desired(answer.get("desired", []), answer.get("epoch"), answer.get("version"))

    def report(self) -> tuple[dict, dict[str, bytes], int]:
        agent = self.agent
        cache = agent.cache
        st = os.statvfs(cache.dir)
        disk_free = max(0, st.f_bavail * st.f_frsize - agent.config.min_free_disk)
        free = max(0, min(cache.quota - cache.bytes, disk_free))
        datasets = {}
        bitmaps: dict[str, bytes] = {}
        for ds in agent.datasets.values():
            if not ds.managed:
                continue
            target = ds.staged or ds.snapshot
            if target is None:
                continue
            total = target.total_size
            cached = agent.cached_bytes(target)
            datasets[ds.name] = {"snapshot": target.id, "state": agent.reported_state(ds), "error": ds.error,
                                 "bytes_cached": cached, "bytes_total": total,
                                 # The snapshot the mount shows is all here (Kubernetes node labels).
                                 "complete": ds.snapshot is not None and (
                                     cached if target is ds.snapshot else agent.cached_bytes(ds.snapshot)
                                 ) == ds.snapshot.total_size}
            for snap in {s.id: s for s in (ds.snapshot, ds.staged) if s is not None}.values():
                bits = self.bitmap(snap)
                if self._sent_bitmaps.get(snap.id) != bits:
                    bitmaps[snap.id] = bits
        blocks = cache.learned[:MAX_BLOCKS_PER_HEARTBEAT]
        body = {
            "labels": dict(agent.config.labels), "capacity": cache.quota, "free": free,
            "block_size": agent.config.block_size,
            "peer_address": agent.peer_address, "uploads": agent.peer_server.active if agent.peer_server else 0,
            "datasets": datasets,
            "holdings": {s: encode_bitmap(b) for s, b in bitmaps.items()},
            "blocks": [list(b) for b in blocks],
        }
        return body, bitmaps, len(blocks)

    def bitmap(self, snap: Snapshot) -> bytes:
        """One bit per block of the snapshot, files in snapshot order, set when the block is cached."""
        bs = self.agent.config.block_size
        bits = bytearray()
        acc = n = 0
        for entry in snap.files:
            for idx in range(block_count(entry.size, bs)):
                if self.agent.cache.present_block(entry.file_object, idx) is not None:
                    acc |= 1 << (7 - n)
                n += 1
                if n == 8:
                    bits.append(acc)
                    acc = n = 0
        if n:
            bits.append(acc)
        return bytes(bits)

    async def lookup(self, fo: str, idxs: list[int], wait: float = 0.0, claim: bool = True) -> dict[int, dict]:
        """Tracker: {index: {"id", "peers", and "wait_for" or "source"}}; {} when it cannot be asked.

        With ``wait``, the tracker holds the answer (up to that many seconds)
        while every block is still being fetched by other nodes.
        """
        answers = await self.lookup_items([(fo, i) for i in idxs], wait=wait, claim=claim)
        return {i: it for i, it in zip(idxs, answers) if it is not None}

    async def lookup_items(self, items: list[tuple[str, int]], wait: float = 0.0, claim: bool = False,
                           grants: int | None = None) -> list[dict | None]:
        """The tracker's answer for each (file object, index), in order.

        When the tracker cannot be asked: the holders it named last
        (``"stale": true``), None where there were none.
        """
        if self._http is None or not items:
            return [None] * len(items)
        try:
            r = await self._http.post("/v1/peers/lookup", json={
                "node": self.agent.config.node_name, "items": [list(it) for it in items], "claim": claim,
                "wait": wait, **({"grants": grants} if grants is not None else {})}, timeout=httpx.Timeout(30.0 + wait, connect=5.0))
            r.raise_for_status()
            answers = r.json()["items"]
            if not isinstance(answers, list) or len(answers) != len(items):
                raise ValueError("the tracker answered another number of items")
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as e:
            # The tracker is away: use the peers it named last for these blocks ("stale").
            log.debug("tracker lookup failed (%s); using the peers last heard of", e)
            return [{"id": h[0], "peers": h[1], "stale": True} if (h := self._last_holders.get(it)) else None
                    for it in items]
        answers = [it if isinstance(it, dict) else None for it in answers]
        for key, it in zip(items, answers):
            if it is not None and it.get("id") and it.get("peers"):
                self._last_holders[key] = (it["id"], list(it["peers"]))
        if len(self._last_holders) > 200_000:  # bounded: forget the oldest half
            for key in list(self._last_holders)[:100_000]:
                del self._last_holders[key]
        return answers

    async def snapshot(self, snapshot_id: str) -> Snapshot:
        r = await self._http.get(f"/v1/snapshots/{snapshot_id}")
        r.raise_for_status()
        return Snapshot.from_json(r.text)

    async def seed_manifest(self, snap: Snapshot) -> int:
        """Learn the block ids the cluster already knows for this snapshot; returns how many."""
        if self._http is None:  # not connected yet (a prefetch resumed at start)
            return 0
        fos = sorted({f.file_object for f in snap.files})
        try:
            r = await self._http.post("/v1/manifest", json={"file_objects": fos})
            r.raise_for_status()
            blocks = r.json()["blocks"]
        except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
            log.debug("no manifest from the control plane for %s: %s", snap.id, e)
            return 0
        n = 0
        for fo, by_idx in blocks.items():
            for idx, block_id in by_idx.items():
                self.agent.cache.learn_block(fo, int(idx), block_id)
                n += 1
        if n:
            log.info("learnt %d block ids from the control plane for snapshot %s", n, snap.revision)
        return n
