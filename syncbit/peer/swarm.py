"""The agent's side of the swarm: which peers hold the blocks a run needs, and getting them.

The tracker (the control plane) answers "who holds these blocks" with each
block's recorded id and its holders, best first. Blocks are fetched from them
in parallel (bounded), each verified against its id by the client; what no
peer can give goes to the source.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..errors import BlockCorrupt, collapse_groups
from ..metrics import BYTES
from ..model import FileEntry, block_span
from .client import PeerBusy, PeerClient

if TYPE_CHECKING:
    from ..agent.link import ControlPlaneLink

log = logging.getLogger(__name__)
_FROM_PEERS = BYTES.labels(origin="peer")


class Swarm:
    def __init__(self, client: PeerClient, link: ControlPlaneLink, block_size: int, concurrency: int = 12) -> None:
        self.client = client
        self.link = link
        self.block_size = block_size
        # Above the prefetch's peer stream (8): reads always find a free one.
        self.limiter = trio.CapacityLimiter(concurrency)

    # How long to wait, with no block arriving, for blocks another node is
    # fetching from the source before fetching them too.
    WAIT_FOR_CLAIM = 20.0
    LONG_POLL = 2.0  # a lookup waits up to this long for a claimed block to be announced
    BUSY_RETRY = 0.2  # every holder of a block was busy (429): ask again after this long

    async def fetch_blocks(self, entry: FileEntry, idxs: list[int], fetch_source, deliver, release=None, *,
                           prefetch: bool = False) -> tuple[set[int], list[int]]:
        """Get what of blocks ``idxs`` of ``entry`` peers can give; returns (those, the deferred ones).

        Each block from a peer, verified, goes to ``deliver(idx, data)`` as it
        arrives (which stores it: a run's blocks are never all held in memory).

        Blocks the tracker grants us (nobody holds them, nobody is fetching
        them) go to ``fetch_source(idxs)`` at once, beside the rest.

        For a read (``prefetch`` false) blocks another node is fetching are
        taken from it as they arrive there (relays), else asked for again,
        long-polling the tracker until that node announces it has them, and
        blocks whose holders are all busy shortly after (the holders grow as
        nodes announce what they store); we give up waiting
        (and the caller goes to the source) only after ``WAIT_FOR_CLAIM``
        seconds without any block arriving.

        For background prefetch there is one round and no waiting: blocks
        another node is fetching go to ``release(idxs)`` at once (nobody
        waits for this run to finish for them), blocks whose holders were all
        busy are returned as deferred; both are left for a later pass. The
        source thus sends each block about once, whatever the number of nodes.
        """
        got: set[int] = set()
        pending = list(idxs)
        with collapse_groups():
            return await self._rounds(entry, pending, got, fetch_source, deliver, release, prefetch)

    async def _rounds(self, entry, pending, got, fetch_source, deliver, release, prefetch):
        wait = 0.0
        async with trio.open_nursery() as sources:
            give_up = trio.current_time() + self.WAIT_FOR_CLAIM
            while pending and trio.current_time() < give_up:
                answers = await self.link.lookup(entry.file_object, pending, wait=wait)
                if not answers:
                    break  # no tracker and no holders heard of: the caller goes to the source
                mine = [i for i in pending if answers.get(i, {}).get("source")]
                if mine:
                    sources.start_soon(fetch_source, mine)
                if prefetch and release is not None:
                    out_of_reach = [i for i in pending if answers.get(i, {}).get("wait_for")]
                    release(out_of_reach)
                    pending = [i for i in pending if i not in out_of_reach]
                    answers = {i: a for i, a in answers.items() if i not in out_of_reach}
                before = len(got)
                with collapse_groups():
                    busy = await self._fetch_from(entry, answers, got, deliver)
                if prefetch:  # what failed otherwise (dead, refusing, corrupt holders) goes to the source
                    return got, [i for i in pending if i not in got and i in busy]
                if len(got) > before:
                    give_up = trio.current_time() + self.WAIT_FOR_CLAIM  # progress: keep waiting
                pending = [i for i in pending if i not in got and (answers.get(i, {}).get("wait_for") or i in busy)]
                if any(i in busy for i in pending):
                    await trio.sleep(self.BUSY_RETRY)
                    wait = 0.0
                else:
                    wait = self.LONG_POLL
        return got, []

    async def from_holders(self, entry: FileEntry, idx: int, block_id: str,
                           addresses: list[str]) -> tuple[bytes | None, bool]:
        """Block ``idx`` from the first holder that gives it, verified; (None, busy) when none did.

        ``busy`` is true when some holder refused only because its upload
        slots were full: the block is there, just not now.
        """
        size = block_span(entry.size, self.block_size, idx)[1]
        refused = False
        async with self.limiter:
            for address in addresses:
                if not self.client.usable(address):
                    continue
                try:
                    data = await self.client.fetch(address, block_id, size)
                except BlockCorrupt:
                    continue  # banned by the client; the next holder, or the source
                except PeerBusy:
                    refused = True
                    continue
                if data is not None:
                    _FROM_PEERS.inc(len(data))
                    return data, False
        return None, refused

    async def from_relay(self, entry: FileEntry, idx: int, address: str, recorded: str | None) -> bytes | None:
        """Block ``idx`` of ``entry`` from the node fetching it from the source, as it arrives.

        None when that node cannot give it (busy, finished, failed, wrong
        bytes), or gives bytes other than the ``recorded`` id (when one is
        known): the block is then asked about again later, when it has holders.
        """
        if not self.client.usable(address):
            return None
        size = block_span(entry.size, self.block_size, idx)[1]
        try:
            got = await self.client.fetch_relay(address, entry.file_object, idx, size)
        except (BlockCorrupt, PeerBusy):
            return None
        if got is None:
            return None
        data, block_id = got
        if recorded is not None and block_id != recorded:
            log.warning("peer %s relayed block %d of %s as %s, but %s is recorded: dropped", address, idx,
                        entry.path, block_id, recorded)
            return None
        _FROM_PEERS.inc(len(data))
        return data

    async def _fetch_from(self, entry: FileEntry, answers: dict[int, dict], got: set[int], deliver) -> set[int]:
        """Fetch the blocks that have holders, and those another node relays as they arrive there
        (adding them to ``got``); returns those every holder refused as busy."""
        busy: set[int] = set()

        async def one(idx: int, block_id: str, addresses: list[str]) -> None:
            data, refused = await self.from_holders(entry, idx, block_id, addresses)
            if data is not None:
                got.add(idx)
                await deliver(idx, data)  # outside the limiter: storing waits for memory, not for peers
            elif refused:
                busy.add(idx)  # held, and someone will have a free slot: not a job for the source

        async def relayed(idx: int, address: str, recorded: str | None) -> None:
            data = await self.from_relay(entry, idx, address, recorded)
            if data is not None:
                got.add(idx)
                await deliver(idx, data)
            # else: still being fetched by that node; asked about again (long poll)

        async with trio.open_nursery() as nursery:
            for idx, a in answers.items():
                if idx in got:
                    continue
                if a.get("id") and a.get("peers"):
                    nursery.start_soon(one, idx, a["id"], a["peers"])
                elif a.get("relay"):
                    nursery.start_soon(relayed, idx, a["relay"], a.get("id"))
        return busy
