"""The agent: one trio process holding the mount, the cache, the fetcher,
the prefetcher and the local API, under one root nursery."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import signal
import sqlite3
import stat
import time
from collections.abc import Mapping

import pyfuse3
import trio

from ..cache import BlockCache
from ..config import AgentConfig, DatasetSpec, export_insecure_registries
from ..errors import (
    AgentAlreadyRunning, ConfigError, DatasetNotFound, DigestMismatch, MountError, SourceChanged, SyncbitError,
    collapse_groups, unwrap_group,
)
from ..fetch import Fetcher
from ..fs.fuse import SyncbitFS, fuse_options
from ..fs.vfs import ROOT_INODE, Vfs
from ..model import FileEntry, Snapshot, block_count, block_span
from ..sources import Source, open_source, preload_sources, source_key
from .datasets import FAILED, PENDING, READY, SYNCING, DatasetState
from .link import ControlPlaneLink
from .mountpoint import cleanup_stale_mount, raise_kernel_readahead

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PREFETCH_RUN_BLOCKS = 16
# With peers, small source runs: each is a claim on the source that other
# nodes wait for, so it should arrive in a second or two.
_SOURCE_RUN_BLOCKS = 1
_RAREST_WINDOW = 256  # missing blocks looked up at once for rarest-first (with peers)
_RAREST_BATCH = 16  # fetched from peers per lookup: 64 MiB, a few seconds of a node's link
_SOURCE_WINDOW = 32  # missing blocks a source worker asks the tracker about at once
_PEER_FETCHES = 8  # blocks coming from peers at once, per node (with peers)
_RELAY_FETCHES = 16  # blocks relayed to this node while they arrive at another from the source
_SOURCE_WORKERS = 2  # with peers: prefetch runs that take this node's share of the source (all datasets)


def check_dataset_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
            f"starting with a letter or digit)"
        )
    return name


def default_name(uri: str) -> str:
    from urllib.parse import unquote

    tail = unquote(uri.rstrip("/").rsplit("/", 1)[-1]) or "dataset"
    tail = tail.split("@", 1)[0] or tail  # hf://org/repo@main -> repo: '@' names revisions in the mount
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.") or "dataset"
    return tail[:128]


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        export_insecure_registries(config.insecure_registries)
        self.cache = BlockCache(
            config.cache_path, quota=config.cache_quota,
            high_watermark=config.cache_high_watermark, low_watermark=config.cache_low_watermark,
            min_free_disk=config.min_free_disk, commit_interval=config.commit_interval,
        )
        self.fetcher = Fetcher(
            self.cache, block_size=config.block_size, deadline=config.fetch_deadline,
            read_concurrency=config.read_concurrency, prefetch_concurrency=config.prefetch_concurrency,
        )
        self.vfs = Vfs()
        self.fs = SyncbitFS(self.vfs, self.cache, self.fetcher, self.source_for,
                            block_size=config.block_size, readahead=config.readahead)
        self.sources: dict[str, Source] = {}
        self.datasets: dict[str, DatasetState] = {}
        self.link: ControlPlaneLink | None = None
        if config.server:
            self.link = ControlPlaneLink(self, config.server, config.heartbeat_interval)
        self.peer_server = None
        self.peer_address = None
        self._peer_client = None
        if config.peer_listen:
            from ..peer.auth import load_secret
            from ..peer.client import PeerClient
            from ..peer.server import PeerServer
            from ..peer.swarm import Swarm

            secret = load_secret(config.cluster_secret_file)
            self.peer_server = PeerServer(self.cache, secret, upload_slots=config.peer_upload_slots,
                                          upload_rate=config.peer_upload_rate, partials=self.fetcher.partials)
            self.fetcher.relaying = True
            self.peer_address = config.peer_advertise or config.peer_listen
            self._peer_client = PeerClient(secret, config.node_name, download_rate=config.peer_download_rate)
            self.fetcher.peers = Swarm(self._peer_client, self.link, config.block_size)
            self.fetcher.on_stored = self.link.stored  # announced to the tracker at once
            self._source_limiter = trio.CapacityLimiter(_SOURCE_WORKERS)
        self.started = time.time()
        self._nursery: trio.Nursery | None = None
        self._mounted = False

    # -- lifecycle -----------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .api import serve_api

        self._check_not_running()
        await trio.to_thread.run_sync(cleanup_stale_mount, self.config.mountpoint)
        os.makedirs(self.config.mountpoint, exist_ok=True)
        await trio.to_thread.run_sync(self.cache.open)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # First: a SIGTERM that comes while the mount is being set up
                # must unmount it too (the default action would leave it stale).
                await nursery.start(self._signals)
                await nursery.start(self.cache.run)
                await nursery.start(self.fetcher.run)
                nursery.start_soon(preload_sources)
                await self._restore()
                self._mount()
                nursery.start_soon(self._fuse_main)
                await trio.to_thread.run_sync(
                    raise_kernel_readahead, self.config.mountpoint, self.config.kernel_read_ahead_kb)
                for spec in self.config.datasets:
                    nursery.start_soon(self._add_from_config, spec)
                await nursery.start(serve_api, self, self.config.socket)
                if self.peer_server is not None:
                    await nursery.start(self.peer_server.run, self.config.peer_listen)
                if self.link is not None:
                    await nursery.start(self.link.run)
                if self.config.metrics_listen:
                    from .api import serve_metrics

                    await nursery.start(serve_metrics, self, self.config.metrics_listen)
                if self.config.registry_mirror_listen:
                    from .mirror import serve_mirror

                    await nursery.start(serve_mirror, self, self.config.registry_mirror_listen,
                                        self.config.registry_mirror_pull_through)
                    log.info("registry mirror on http://%s%s", self.config.registry_mirror_listen,
                             " (pull-through)" if self.config.registry_mirror_pull_through else "")
                log.info("agent %s serving %s (socket %s)", self.config.node_name, self.config.mountpoint,
                         self.config.socket)
                task_status.started()
        finally:
            self._unmount()
            for src in self.sources.values():
                with trio.CancelScope(shield=True):
                    await src.aclose()
            if self._peer_client is not None:
                with trio.CancelScope(shield=True):
                    await self._peer_client.aclose()
            self.cache.close()
            log.info("agent stopped")

    def shutdown(self, delay: float = 0.0) -> None:
        if self._nursery is None:
            return
        if delay:
            self._nursery.start_soon(self._shutdown_later, delay)
        else:
            self._nursery.cancel_scope.cancel()

    async def _shutdown_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self.shutdown()

    async def _signals(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                self.shutdown()
                return

    def _check_not_running(self) -> None:
        import socket

        path = self.config.socket
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"socket: {path} exists and is not a socket; refusing to replace it")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # left by a crashed agent
            return
        finally:
            s.close()
        raise AgentAlreadyRunning(f"an agent is already running on {path}")

    def _mount(self) -> None:
        try:
            pyfuse3.init(self.fs, self.config.mountpoint, fuse_options())
        except RuntimeError as e:
            raise MountError(f"cannot mount at {self.config.mountpoint}: {e}") from None
        self._mounted = True

    async def _fuse_main(self) -> None:
        await pyfuse3.main()

    def _unmount(self) -> None:
        if self._mounted:
            self._mounted = False
            pyfuse3.close(unmount=True)

    # -- datasets ------------------------------------------------------------

    def source_for(self, snap: Snapshot) -> Source:
        return self.sources[source_key(snap.uri, snap.options)]

    async def _source(self, uri: str, options: Mapping[str, str]) -> Source:
        key = source_key(uri, options)
        src = self.sources.get(key)
        if src is None:
            src = await open_source(uri, options)
            if key in self.sources:  # another request opened it meanwhile
                await src.aclose()
            else:
                self.sources[key] = src
        return self.sources[key]

    async def _restore(self) -> None:
        for row in self.cache.index.datasets():
            ds = DatasetState(row["name"], row["uri"], pinned=bool(row["pinned"]),
                              options=json.loads(row["options"]), managed=bool(row["managed"]),
                              switch=row["switch"])
            self.datasets[ds.name] = ds
            if row["staged"] and self.cache.index.has_snapshot(row["staged"]):
                ds.staged = self.cache.index.snapshot(row["staged"])
            if row["snapshot"]:
                ds.snapshot = self.cache.index.snapshot(row["snapshot"])
                try:
                    await self._source(ds.uri, ds.options)
                except SyncbitError as e:
                    ds.set_state(FAILED, str(e))
                    continue
                self._show(ds.name, ds.snapshot)
            ds.set_state(row["state"], row["error"])
            if ds.pinned and ds.snapshot is not None and ds.state != FAILED:
                self.start_prefetch(ds)

    async def _add_from_config(self, spec: DatasetSpec) -> None:
        try:
            await self.add_dataset(spec.name, spec.uri, pin=spec.pin, options=spec.options)
        except SyncbitError as e:
            log.error("dataset %s from the config: %s", spec.name, e)
        except Exception:  # a bug; it must not take the other datasets and the mount down with it
            log.exception("dataset %s from the config: unexpected error", spec.name)

    async def add_dataset(self, name: str | None, uri: str, *, pin: bool = True,
                          options: Mapping[str, str] | None = None) -> DatasetState:
        """Register (or refresh) a dataset: resolve a snapshot and show it; prefetch if pinned."""
        name = check_dataset_name(name or default_name(uri))
        options = dict(options or {})
        existing = self.datasets.get(name)
        source = await self._source(uri, options)
        snap = await source.resolve()
        same = existing is not None and existing.uri == uri and existing.options == options
        ds = existing if same else DatasetState(name, uri, options=options)
        if existing is not None and existing is not ds and existing.prefetch_scope:
            existing.prefetch_scope.cancel()
        self.datasets[name] = ds
        new_snapshot = ds.snapshot is None or ds.snapshot.id != snap.id
        if new_snapshot:
            if ds.prefetch_scope is not None:
                ds.prefetch_scope.cancel()
                ds.prefetch_scope = None
            self.cache.index.add_snapshot(snap)
            ds.snapshot = snap
            ds.set_state(PENDING)
            self._show(name, snap)
            log.info("dataset %s: snapshot %s of %s (%d files, %d bytes)", name, snap.revision, uri,
                     len(snap.files), snap.total_size)
        ds.pinned = ds.pinned or pin
        self._save(ds)
        self.cache.index.gc_snapshots()
        if ds.pinned and (ds.prefetch_scope is None or ds.state == FAILED):
            self.start_prefetch(ds)  # not when one is already running for this snapshot
        return ds

    def _show(self, name: str, snap: Snapshot) -> None:
        """Make ``snap`` the dataset's current snapshot in the mount; the kernel forgets the names that changed."""
        changed = [name] if self.vfs.set_dataset(name, snap) is not None else []
        changed += self.vfs.take_unnamed()  # NAME@REVISION of trees no longer shown
        if self._mounted:
            for n in changed:
                # Queued to pyfuse3's own thread: no deadlock with requests in progress.
                pyfuse3.invalidate_entry_async(ROOT_INODE, os.fsencode(n), ignore_enoent=True)

    def _save(self, ds: DatasetState) -> None:
        try:
            self.cache.index.put_dataset(ds.name, ds.uri, ds.snapshot.id if ds.snapshot else None, ds.pinned,
                                         ds.state, ds.error, time.time(), ds.options, ds.managed,
                                         ds.staged.id if ds.staged else None, ds.switch)
        except sqlite3.OperationalError as e:  # a full cache disk; the state in memory is still right
            log.error("cannot record dataset %s in the cache index: %s", ds.name, e)

    def get(self, name: str) -> DatasetState:
        try:
            return self.datasets[name]
        except KeyError:
            raise DatasetNotFound(f"no dataset named {name!r} on this agent") from None

    def pin(self, ds: DatasetState) -> None:
        """Pin a dataset and fetch what is missing of its current snapshot."""
        ds.pinned = True
        self._save(ds)
        self.start_prefetch(ds)

    def start_prefetch(self, ds: DatasetState) -> None:
        if ds.prefetch_scope is not None:
            ds.prefetch_scope.cancel()
        if ds.snapshot is not None:
            # Now, not when the task first runs: a caller that reads the state
            # right after asking for a prefetch must not see the last outcome.
            ds.set_state(SYNCING)
        scope = ds.prefetch_scope = trio.CancelScope()
        self._nursery.start_soon(self._prefetch, ds, scope)

    async def _prefetch(self, ds: DatasetState, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._prefetch_snapshot(ds)
        except Exception as e:
            # A prefetch never takes the agent down: whatever escaped (a group
            # of failures, a full index disk) fails this dataset only.
            err = unwrap_group(e)
            if isinstance(err, trio.Cancelled):
                raise
            ds.set_state(FAILED, f"prefetch stopped: {err}")
            log.error("dataset %s: prefetch stopped: %r", ds.name, err)
        finally:
            if ds.prefetch_scope is scope:
                ds.prefetch_scope = None

    async def _prefetch_snapshot(self, ds: DatasetState) -> None:
        snap = ds.staged or ds.snapshot
        ds.set_state(SYNCING)
        self._save(ds)
        if self.link is not None:
            await self.link.seed_manifest(snap)  # verify what we fetch against what the cluster learnt
        source = self.source_for(snap)
        try:
            await self._prefetch_passes(snap, source)
            for entry in snap.files:
                # Whole-file digests from the source (HF LFS sha256): ready means verified.
                await self.fetcher.verify_file(entry)
        except SyncbitError as e:
            hint = " (run 'syncbit pull' again to take a new snapshot)" \
                if isinstance(e, SourceChanged) and not isinstance(e, DigestMismatch) else ""
            ds.set_state(FAILED, f"{e}{hint}")
            self._save(ds)
            log.error("dataset %s failed: %s", ds.name, e)
            return
        missing = self.missing_bytes(snap)
        # Eviction never takes pinned blocks, but a full disk can refuse some.
        if missing:
            ds.set_state(FAILED, f"{missing} bytes still missing")
        else:
            if ds.staged is snap:
                self._make_current(ds, snap)
            ds.set_state(READY)
        self._save(ds)
        log.info("dataset %s is %s", ds.name, ds.state)

    # With peers: pause between passes that brought nothing, and how long
    # rounds may bring nothing before the prefetch gives up (and says so).
    PASS_PAUSE = 0.25
    PASS_STALL = 120.0

    async def _prefetch_passes(self, snap: Snapshot, source: Source) -> None:
        """Fetch the snapshot's missing blocks: one pass without peers, rounds with them.

        With peers, a round is one pass of a few "source" workers (this
        node's share of the source: blocks the tracker grants it) beside a
        stream of fetches from peers, rarest first (``_from_peers``). What
        cannot be had yet (another node is fetching it) is left for later, so
        nothing idles behind another node's claim. Rounds go on until nothing
        is missing, or until PASS_STALL seconds brought nothing (the caller
        then reports what is missing).
        """
        if self.peer_server is None:
            await self._pass(snap, source)
            return
        stalled_since, pause = None, self.PASS_PAUSE
        while missing := self.missing_bytes(snap):
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    source_done = trio.Event()
                    nursery.start_soon(self._source_pass, snap, source, source_done)
                    await self._from_peers(snap, source, source_done)
            if not (now_missing := self.missing_bytes(snap)):
                return
            if now_missing < missing:
                stalled_since, pause = None, self.PASS_PAUSE
            elif stalled_since is None:
                stalled_since = trio.current_time()
            elif trio.current_time() - stalled_since > self.PASS_STALL:
                stuck = [(e, i) for e, i in self._missing_blocks(snap)][:8]
                said = {f"{e.path}#{i}": (await self.link.lookup(e.file_object, [i], claim=False)).get(i)
                        for e, i in stuck}
                log.warning("snapshot %s: no block arrived for %.0fs of prefetch passes; giving up for now "
                            "(the tracker says of the first missing ones: %s)", snap.revision, self.PASS_STALL, said)
                return
            await trio.sleep(pause)
            pause = min(5.0, pause * 2)  # rounds that bring nothing: ask the tracker less and less often

    async def _from_peers(self, snap: Snapshot, source: Source, source_done: trio.Event) -> None:
        """Take from peers what this node lacks, until the source pass is done and peers hold nothing
        more that this node lacks, and nobody fetches anything it lacks.

        Each turn, one tracker lookup covers a window of the missing blocks
        (in this node's random order), and starts two kinds of fetches:

        - relays: every block another node is fetching from the source is
          taken from that node as it arrives there, ``_RELAY_FETCHES`` at a
          time. A relay that fails leaves the block for a later turn, when
          it has holders.
        - whole blocks, rarest first: of the blocks some peer holds, those
          with the fewest holders first (ties in the window's order), so no
          holder stays the only source of anything for long. They give way
          on the link: the source streams (this node's, and those relayed
          from others) set the pace of the whole swarm, and every TCP stream
          beside them takes a share of the link, so at most
          ``_PEER_FETCHES`` less the relays and source streams in progress
          run at once (at least one). A block no holder gives (dead,
          refusing, corrupt) goes the way of a read: the next holder the
          tracker names, else the source.

        The next turn comes when a block is stored, or after ``PEER_POLL``.
        """
        slots = trio.Semaphore(_PEER_FETCHES)
        relay_slots = trio.Semaphore(_RELAY_FETCHES)

        def pacing_streams() -> int:
            return (_RELAY_FETCHES - relay_slots.value) + self._source_limiter.borrowed_tokens

        async def whole(entry, idx: int, block_id: str, addresses: list[str]) -> None:
            try:
                outcome = await self.fetcher.fetch_from_peers(entry, idx, block_id, addresses)
                if outcome == "busy":
                    await trio.sleep(0.2)  # its holders' upload slots are full: not straight back to them
                elif outcome == "failed":
                    await self.fetcher.prefetch_run(source, entry, idx, 1)
            finally:
                slots.release()

        async def relayed(entry, idx: int, address: str) -> None:
            try:
                await self.fetcher.fetch_from_relay(entry, idx, address)
            finally:
                relay_slots.release()

        async with trio.open_nursery() as nursery:
            while self.missing_bytes(snap):
                window = list(itertools.islice(
                    ((e, i) for e, i in self._missing_blocks(snap) if not self.fetcher.in_flight(e, i)),
                    _RAREST_WINDOW))
                answers = await self.link.lookup_items([(e.file_object, i) for e, i in window])
                relays = [(e, i, a["relay"]) for (e, i), a in zip(window, answers) if a is not None and a.get("relay")]
                for e, i, address in relays:
                    if not relay_slots.value:
                        break
                    if not self.fetcher.in_flight(e, i):
                        relay_slots.acquire_nowait()
                        nursery.start_soon(relayed, e, i, address)
                held = sorted((len(a["peers"]), n, e, i, a) for n, ((e, i), a) in enumerate(zip(window, answers))
                              if a is not None and a.get("id") and a.get("peers"))
                for _, _, e, i, a in held[:_RAREST_BATCH]:
                    if _PEER_FETCHES - slots.value >= max(1, _PEER_FETCHES - pacing_streams()):
                        break
                    if not self.fetcher.in_flight(e, i):
                        slots.acquire_nowait()
                        nursery.start_soon(whole, e, i, a["id"], a["peers"])
                if (not held and not relays and source_done.is_set() and slots.value == _PEER_FETCHES
                        and relay_slots.value == _RELAY_FETCHES):
                    return  # nothing held that we lack, nothing coming: the round is over
                with trio.move_on_after(self.PEER_POLL):
                    await self.fetcher.block_stored()
                await trio.sleep(self.TURN_GAP)

    # The tracker is asked again when a block is stored, at least this often (a relay
    # that starts late loses nothing: what arrived meanwhile is sent at once), and at most
    # every TURN_GAP.
    PEER_POLL = 0.2
    TURN_GAP = 0.05

    async def _pause(self, snap: Snapshot, seconds: float) -> None:
        """Sleep up to ``seconds``; return early once nothing of ``snap`` is missing.

        The snapshot is looked at only when this node has no fetch in
        progress (which is rare before its last block), not at every block.
        """
        with trio.move_on_after(seconds):
            while True:
                await self.fetcher.block_stored()
                if not self.fetcher.busy and not self.missing_bytes(snap):
                    return

    async def _source_pass(self, snap: Snapshot, source: Source, done: trio.Event) -> None:
        """This node's share of the source: ``_SOURCE_WORKERS`` streams of blocks the tracker grants it.

        Each worker asks the tracker about a window of the missing blocks
        (in this node's random order) and is granted at most a run's worth
        of those nobody holds or is fetching; one lookup skips what others
        hold or fetch. With the tracker away (and no holder heard of) it
        fetches the window's first run from the source itself: bounded
        concurrency, never the whole cluster's worth at once.
        """
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(_SOURCE_WORKERS):
                    nursery.start_soon(self._source_worker, snap, source)
        finally:
            done.set()

    async def _source_worker(self, snap: Snapshot, source: Source) -> None:
        bs = self.config.block_size
        order = [(e, i) for e in snap.files for i in range(block_count(e.size, bs))]
        start = random.randrange(len(order)) if order else 0
        order = order[start:] + order[:start]  # its own random start
        pos = 0  # blocks before this one are held, claimed or fetched: done for this pass
        fetched = trio.Event()  # the worker's last grant is fetched (or failed)
        fetched.set()
        async with trio.open_nursery() as nursery:
            while True:
                window = []
                for j in range(pos, len(order)):
                    e, i = order[j]
                    if self.cache.present_block(e.file_object, i) is not None or self.fetcher.in_flight(e, i):
                        if not window:
                            pos = j + 1
                        continue
                    window.append((j, e, i))
                    if len(window) == _SOURCE_WINDOW:
                        break
                if not window:
                    return
                answers = await self.link.lookup_items([(e.file_object, i) for _, e, i in window], claim=True,
                                                       grants=_SOURCE_RUN_BLOCKS)
                if all(a is None or a.get("stale") for a in answers):
                    # No tracker: the source, a run at a time, for blocks no peer was last heard to hold.
                    granted = [(j, e, i) for (j, e, i), a in zip(window, answers) if a is None][:_SOURCE_RUN_BLOCKS]
                else:
                    # Granted to us, or held by peers whose id the tracker does not know (no way to
                    # verify a peer's copy): both come from the source.
                    granted = [(j, e, i) for (j, e, i), a in zip(window, answers)
                               if a is not None and (a.get("source") or (a.get("peers") and not a.get("id")))]
                    granted = granted[:_SOURCE_RUN_BLOCKS]
                # Move on past what is taken care of (held, being fetched, taken now), up to the first
                # block that is not: it is asked about again.
                taken = {j for j, _, _ in granted}
                moved_to = window[-1][0] + 1
                for (j, _, _), a in zip(window, answers):
                    if j not in taken and (a is None or a.get("stale") or not (
                            (a.get("peers") and a.get("id")) or a.get("wait_for"))):
                        moved_to = j
                        break
                if not granted and moved_to == pos:
                    await self._pause(snap, self.PASS_PAUSE)  # nothing to take and nothing moved: do not spin
                pos = moved_to
                await fetched.wait()  # one source request at a time per worker
                if granted:
                    fetched = trio.Event()
                    nursery.start_soon(self._fetch_granted, source, granted, fetched)
                    # The next grant is asked for while the end of this one arrives, so that the
                    # next request follows at once: every node's workers finish their blocks
                    # together, and a pause of each between blocks idles the source's link.
                    _, entry, idx = granted[-1]
                    await self._nearly_arrived(entry, idx, fetched)

    async def _fetch_granted(self, source: Source, granted: list, done: trio.Event) -> None:
        try:
            by_file: dict[str, tuple[FileEntry, list[int]]] = {}
            for _, entry, idx in granted:
                by_file.setdefault(entry.file_object, (entry, []))[1].append(idx)
            for entry, idxs in by_file.values():
                async with self._source_limiter:
                    await self.fetcher.fetch_from_source(source, entry, idxs)
        finally:
            done.set()

    async def _nearly_arrived(self, entry: FileEntry, idx: int, fetched: trio.Event) -> None:
        """Wait until three quarters of block ``idx`` arrived from the source, or its fetch ended."""
        while not fetched.is_set():
            partial = self.fetcher.partials.get((entry.file_object, idx))
            if partial is not None and partial.filled >= partial.size * 3 // 4:
                return
            if partial is None:
                await trio.sleep(0.02)  # its request not made yet (or the block just stored)
            else:
                await partial.changed()

    async def _pass(self, snap: Snapshot, source: Source) -> None:
        work = self._missing_blocks(snap)
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.prefetch_concurrency):
                    nursery.start_soon(self._prefetch_worker, source, work)

    def _make_current(self, ds: DatasetState, snap: Snapshot) -> None:
        """Show ``snap`` as the dataset; open files keep reading the snapshot they opened."""
        old = ds.snapshot
        ds.snapshot, ds.staged = snap, None
        self._show(ds.name, snap)
        self._save(ds)
        self.cache.index.gc_snapshots()  # the old snapshot is no longer pinned
        log.info("dataset %s: snapshot %s is current%s", ds.name, snap.revision,
                 f" (was {old.revision})" if old and old.id != snap.id else "")

    # -- control plane -----------------------------------------------------------

    def reported_state(self, ds: DatasetState) -> str:
        return SYNCING if ds.staged is not None and ds.state == READY else ds.state

    async def apply_desired(self, desired: list[dict], link) -> None:
        """Make the assigned datasets match what the control plane wants on this node."""
        wanted = {d["dataset"]: d for d in desired if isinstance(d, dict) and "dataset" in d}
        # Unassigned, but a running pod here uses it (Kubernetes): keep what is pinned, fetch nothing.
        kept = {name for name, d in wanted.items() if d.get("keep")}
        wanted = {name: d for name, d in wanted.items() if name not in kept}
        open_files = self.fs.open_file_count()
        for name, d in wanted.items():
            ds = self.datasets.get(name)
            target = d["snapshot"]
            if ds is not None and ds.managed and target in {s.id for s in (ds.snapshot, ds.staged) if s}:
                if not ds.pinned or ds.switch != d.get("switch", "complete"):
                    ds.pinned, ds.switch = True, d.get("switch", "complete")
                    self._save(ds)
                    self.start_prefetch(ds)
                continue
            try:
                snap = self.cache.index.snapshot(target) if self.cache.index.has_snapshot(target) \
                    else await link.snapshot(target)
                await self.stage(name, d["uri"], d.get("options") or {}, snap, d.get("switch", "complete"))
            except SyncbitError as e:
                log.error("assigned dataset %s: %s", name, e)
        for ds in list(self.datasets.values()):
            if ds.managed and ds.name not in wanted and ds.pinned:
                if ds.name in kept or open_files.get(ds.name):
                    # Still in use: unpinned at the first heartbeat after the last user is gone.
                    if not ds.held:
                        ds.held = True
                        log.info("dataset %s is no longer assigned to this node; kept pinned while in use "
                                 "(%s)", ds.name, f"{open_files[ds.name]} open files" if open_files.get(ds.name)
                                 else "a running pod uses it")
                    continue
                ds.held = False
                # Unassigned: keep serving it, but eviction may now reclaim it.
                if ds.prefetch_scope is not None:
                    ds.prefetch_scope.cancel()
                    ds.prefetch_scope = None
                ds.pinned, ds.staged = False, None
                ds.set_state(PENDING)
                self._save(ds)
                self.cache.index.gc_snapshots()
                log.info("dataset %s is no longer assigned to this node: unpinned", ds.name)

    async def stage(self, name: str, uri: str, options: Mapping[str, str], snap: Snapshot, switch: str) -> None:
        """Take an assigned snapshot: current at once if there is none (or ``switch`` says so), else staged."""
        name = check_dataset_name(name)
        await self._source(uri, options)
        ds = self.datasets.get(name)
        if ds is None or ds.uri != uri or ds.options != dict(options):
            if ds is not None and ds.prefetch_scope is not None:
                ds.prefetch_scope.cancel()
            ds = self.datasets[name] = DatasetState(name, uri, options=dict(options), snapshot=ds.snapshot if ds else None)
        self.cache.index.add_snapshot(snap)
        ds.managed, ds.pinned, ds.switch = True, True, switch
        if ds.snapshot is None or switch == "immediate" or ds.snapshot.id == snap.id:
            ds.staged = None
            if ds.snapshot is None or ds.snapshot.id != snap.id:
                self._make_current(ds, snap)
        else:
            ds.staged = snap
            log.info("dataset %s: staging snapshot %s; %s stays current until it is complete", name,
                     snap.revision, ds.snapshot.revision)
        self._save(ds)
        self.start_prefetch(ds)

    def _missing_blocks(self, snap: Snapshot):
        bs = self.config.block_size
        order = [(entry, idx) for entry in snap.files for idx in range(block_count(entry.size, bs))]
        if self.link is not None and self.peer_server is not None and order:
            # With peers, each node starts at its own random place: nodes that
            # start together fetch different parts from the source and trade them.
            start = random.randrange(len(order))
            order = order[start:] + order[:start]
        for entry, idx in order:
            if self.cache.present_block(entry.file_object, idx) is None:
                yield entry, idx  # possibly in flight: the worker decides

    async def _prefetch_worker(self, source: Source, work) -> None:
        while True:
            async with self.fetcher.prefetch_limiter:
                item = next(work, None)
                if item is None:
                    return
                if self.fetcher.in_flight(item[0], item[1]):
                    continue
                await self.fetcher.prefetch_run(source, item[0], item[1], _PREFETCH_RUN_BLOCKS)

    async def evict(self, name: str) -> int:
        """Unpin a dataset and drop its cached blocks that no other pinned dataset uses."""
        ds = self.get(name)
        if ds.prefetch_scope is not None:
            ds.prefetch_scope.cancel()
            ds.prefetch_scope = None
        ds.pinned = False
        ds.set_state(PENDING)
        self._save(ds)
        if ds.snapshot is None:
            return 0
        mine = self.cache.index.blocks_of_snapshot(ds.snapshot.id)
        keep = self.cache.index.pinned_blocks(but=name)
        victims = [b for b in mine - keep if self.cache.has_block(b)]
        before = self.cache.bytes
        self.cache.drop_blocks(victims)
        return before - self.cache.bytes

    # -- status ------------------------------------------------------------

    def cached_bytes(self, snap: Snapshot) -> int:
        bs = self.config.block_size
        total = 0
        for entry in snap.files:
            known = self.cache.known_blocks(entry.file_object)
            for idx, bid in known.items():
                if self.cache.has_block(bid):
                    total += block_span(entry.size, bs, idx)[1]
        return total

    def missing_bytes(self, snap: Snapshot) -> int:
        return snap.total_size - self.cached_bytes(snap)

    def dataset_status(self, ds: DatasetState) -> dict:
        snap = ds.snapshot
        total = snap.total_size if snap else 0
        cached = self.cached_bytes(snap) if snap else 0
        return {
            "name": ds.name,
            "uri": ds.uri,
            "options": ds.options,
            "snapshot": snap.id if snap else None,
            "revision": snap.revision if snap else None,
            "files": len(snap.files) if snap else 0,
            "bytes_total": total,
            "bytes_cached": cached,
            "pinned": ds.pinned,
            "held": ds.held,
            "state": ds.state,
            "error": ds.error,
            "path": os.path.join(self.config.mountpoint, ds.name),
            "open_files": self.fs.open_file_count().get(ds.name, 0),
        }

    def status(self) -> dict:
        stats = self.cache.statistics()
        return {
            "node_name": self.config.node_name,
            "pid": os.getpid(),
            "mountpoint": self.config.mountpoint,
            "control_plane": None if self.link is None else {
                "url": self.link.url, "connected": self.link.connected},
            "uptime_seconds": round(time.time() - self.started, 1),
            "cache": {
                "dir": str(self.cache.dir),
                "bytes": stats.bytes,
                "blocks": stats.blocks,
                "quota": stats.quota,
                "high_watermark": stats.high_watermark,
                "low_watermark": stats.low_watermark,
                "evicted_blocks": stats.evicted_blocks,
                "hits": stats.hits,
                "misses": stats.misses,
                "hit_ratio": round(stats.hit_ratio, 4),
            },
            "source_bytes": self.fetcher.bytes_from_source,
            "datasets": [self.dataset_status(ds) for ds in sorted(self.datasets.values(), key=lambda d: d.name)],
        }
