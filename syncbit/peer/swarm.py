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

from ..errors import BlockCorrupt
from ..metrics import BYTES
from ..model import FileEntry, block_span
from .client import PeerClient

if TYPE_CHECKING:
    from ..agent.link import ControlPlaneLink

log = logging.getLogger(__name__)
_FROM_PEERS = BYTES.labels(origin="peer")


class Swarm:
    def __init__(self, client: PeerClient, link: ControlPlaneLink, block_size: int, concurrency: int = 8) -> None:
        self.client = client
        self.link = link
        self.block_size = block_size
        self.limiter = trio.CapacityLimiter(concurrency)

    # How long to wait, with no block arriving, for blocks another node is
    # fetching from the source before fetching them too.
    WAIT_FOR_CLAIM = 20.0
    POLL = 0.5

    async def fetch_blocks(self, entry: FileEntry, idxs: list[int], fetch_source) -> dict[int, bytes]:
        """Whatever of blocks ``idxs`` of ``entry`` peers can give, verified, by index.

        Blocks the tracker grants us (nobody holds them, nobody is fetching
        them) go to ``fetch_source(idxs)`` at once, beside the rest. Blocks
        another node is fetching are asked for again until that node has them;
        we give up on them (and the caller goes to the source) only after
        ``WAIT_FOR_CLAIM`` seconds without any of them arriving. The source
        thus sends each block about once, whatever the number of nodes.
        """
        got: dict[int, bytes] = {}
        pending = list(idxs)
        async with trio.open_nursery() as sources:
            give_up = trio.current_time() + self.WAIT_FOR_CLAIM
            while pending and trio.current_time() < give_up:
                answers = await self.link.lookup(entry.file_object, pending)
                mine = [i for i in pending if answers.get(i, {}).get("source")]
                if mine:
                    sources.start_soon(fetch_source, mine)
                before = len(got)
                await self._fetch_from(entry, answers, got)
                if len(got) > before:
                    give_up = trio.current_time() + self.WAIT_FOR_CLAIM  # progress: keep waiting
                pending = [i for i in pending if i not in got and answers.get(i, {}).get("wait_for")]
                if pending:
                    await trio.sleep(self.POLL)
        return got

    async def _fetch_from(self, entry: FileEntry, answers: dict[int, dict], got: dict[int, bytes]) -> None:
        holders = {i: (a.get("id"), a.get("peers") or []) for i, a in answers.items()}
        if not holders:
            return

        async def one(idx: int, block_id: str, addresses: list[str]) -> None:
            size = block_span(entry.size, self.block_size, idx)[1]
            async with self.limiter:
                for address in addresses:
                    if not self.client.usable(address):
                        continue
                    try:
                        data = await self.client.fetch(address, block_id, size)
                    except BlockCorrupt:
                        continue  # banned by the client; the next holder, or the source
                    if data is not None:
                        got[idx] = data
                        _FROM_PEERS.inc(len(data))
                        return

        async with trio.open_nursery() as nursery:
            for idx, (block_id, addresses) in holders.items():
                if block_id and addresses and idx not in got:
                    nursery.start_soon(one, idx, block_id, addresses)
