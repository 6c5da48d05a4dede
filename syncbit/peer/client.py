"""Fetching blocks from peers: ask the tracker who holds them, fetch, verify, fall back.

Every block from a peer is checked against its BLAKE3 id before it goes
anywhere; a peer that sends a wrong block is logged, counted and banned for a
while. A slow, dead or refusing peer is dropped for that block and the next
holder is tried; when none is left the caller goes to the source.
"""

from __future__ import annotations

import logging
import time

import httpx
import trio

from ..errors import BlockCorrupt
from ..metrics import PEER_BYTES, PEER_ERRORS
from ..model import content_id
from .auth import auth_headers
from .ratelimit import RateLimit

log = logging.getLogger(__name__)

BAN_SECONDS = 300.0
MIN_RATE = 1 * 2**20  # bytes/s below which a peer is given up on for a block


class PeerClient:
    def __init__(self, secret: bytes, node: str, download_rate: int = 0) -> None:
        self.secret = secret
        self.node = node
        self.rate = RateLimit(download_rate)  # bytes/s for all downloads from peers; 0: unlimited
        self.banned: dict[str, float] = {}
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0),
                                       limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))

    async def aclose(self) -> None:
        await self._http.aclose()

    def usable(self, address: str) -> bool:
        until = self.banned.get(address)
        if until is None:
            return True
        if time.monotonic() > until:
            del self.banned[address]
            return True
        return False

    async def fetch(self, address: str, block_id: str, size: int) -> bytes | None:
        """The block from ``address``, verified; None if that peer cannot give it now."""
        path = f"/v1/blocks/{block_id}"
        headers = auth_headers(self.secret, "GET", path, time.time(), self.node)
        with trio.move_on_after(max(5.0, size / MIN_RATE)):
            try:
                async with self._http.stream("GET", f"http://{address}{path}", headers=headers) as r:
                    if r.status_code != 200:
                        PEER_ERRORS.labels(reason=str(r.status_code)).inc()
                        if r.status_code == 401:
                            log.error("peer %s refused our cluster signature: is cluster_secret_file the same "
                                      "there?", address)
                        return None
                    buf = bytearray()
                    async for chunk in r.aiter_bytes():
                        await self.rate.take(len(chunk))
                        buf += chunk
                        if len(buf) > size:
                            break  # more than a block: the hash check below refuses it
            except httpx.HTTPError as e:
                PEER_ERRORS.labels(reason="unreachable").inc()
                log.debug("peer %s: %s: %s", address, type(e).__name__, e)
                return None
            data = bytes(buf)
            got = content_id(data)
            if got != block_id:
                self.banned[address] = time.monotonic() + BAN_SECONDS
                PEER_ERRORS.labels(reason="corrupt").inc()
                log.error("peer %s sent a wrong block for %s (hash %s): banned for %.0fs", address, block_id, got,
                          BAN_SECONDS)
                raise BlockCorrupt(f"peer {address} sent bytes that are not block {block_id}")
            PEER_BYTES.labels(direction="download", peer=address).inc(len(data))
            return data
        PEER_ERRORS.labels(reason="slow").inc()
        log.debug("peer %s too slow for block %s", address, block_id)
        return None
