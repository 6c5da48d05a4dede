"""Fetching blocks from peers: ask the tracker who holds them, fetch, verify, fall back.

Every block from a peer is checked against its BLAKE3 id before it goes
anywhere; a peer that sends a wrong block is logged, counted and banned for a
while. A slow, dead or refusing peer is dropped for that block and the next
holder is tried; when none is left the caller goes to the source.
"""

from __future__ import annotations

import logging
import time

import trio
import urllib3

from ..errors import BlockCorrupt
from ..metrics import PEER_BYTES, PEER_ERRORS
from ..model import content_id
from .auth import auth_headers
from .ratelimit import RateLimit

log = logging.getLogger(__name__)

BAN_SECONDS = 300.0
MIN_RATE = 1 * 2**20  # bytes/s below which a peer is given up on for a block


class PeerBusy(Exception):
    """The peer holds the block but every upload slot is in use (429): ask again soon, not the source."""


class PeerClient:
    """Blocks from peers over HTTP/1.1 with urllib3 in worker threads.

    Receiving and hashing run off the trio thread with the GIL released (as
    for HTTP sources): with httpx on trio a node taking ~20 MB/s from peers
    spent a quarter of its event loop parsing and joining the bodies.
    """

    READ = 1 * 2**20

    def __init__(self, secret: bytes, node: str, download_rate: int = 0) -> None:
        self.secret = secret
        self.node = node
        self.rate = RateLimit(download_rate)  # bytes/s for all downloads from peers; 0: unlimited
        self.banned: dict[str, float] = {}
        self._pool = urllib3.PoolManager(num_pools=256, maxsize=8, retries=False)
        self._threads = trio.CapacityLimiter(16)

    async def aclose(self) -> None:
        self._pool.clear()

    def usable(self, address: str) -> bool:
        until = self.banned.get(address)
        if until is None:
            return True
        if time.monotonic() > until:
            del self.banned[address]
            return True
        return False

    async def fetch(self, address: str, block_id: str, size: int) -> bytes | None:
        """The block from ``address``, verified; None if that peer cannot give it.

        Raises PeerBusy when the peer answered 429, BlockCorrupt (and bans
        the peer) when its bytes are not the block.
        """
        path = f"/v1/blocks/{block_id}"
        headers = auth_headers(self.secret, "GET", path, time.time(), self.node)
        limit = max(5.0, size / MIN_RATE)  # slower than MIN_RATE: given up on for this block
        await self.rate.take(size)  # booked up front: the limit holds on average over blocks
        try:
            with trio.fail_after(limit + 1.0):  # a peer trickling bytes: its reads never time out
                status, data, got = await trio.to_thread.run_sync(
                    self._get, f"http://{address}{path}", headers, size, limit, abandon_on_cancel=True,
                    limiter=self._threads)
        except trio.TooSlowError:
            PEER_ERRORS.labels(reason="slow").inc()
            log.debug("peer %s too slow for block %s", address, block_id)
            return None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            reason = "slow" if isinstance(e, _TooSlow | urllib3.exceptions.TimeoutError) else "unreachable"
            PEER_ERRORS.labels(reason=reason).inc()
            log.debug("peer %s, block %s: %s: %s", address, block_id, type(e).__name__, e)
            return None
        if status != 200:
            PEER_ERRORS.labels(reason=str(status)).inc()
            if status == 401:
                log.error("peer %s refused our cluster signature: is cluster_secret_file the same there?", address)
            if status == 429:
                raise PeerBusy(address)
            return None
        if got != block_id:
            self.banned[address] = time.monotonic() + BAN_SECONDS
            PEER_ERRORS.labels(reason="corrupt").inc()
            log.error("peer %s sent a wrong block for %s (hash %s): banned for %.0fs", address, block_id, got,
                      BAN_SECONDS)
            raise BlockCorrupt(f"peer {address} sent bytes that are not block {block_id}")
        PEER_BYTES.labels(direction="download", peer=address).inc(len(data))
        return data

    def _get(self, url: str, headers: dict, size: int, limit: float) -> tuple[int, bytes | None, str | None]:
        """(status, body, its BLAKE3 id) in a worker thread; raises _TooSlow past ``limit`` seconds."""
        deadline = time.monotonic() + limit
        r = self._pool.request("GET", url, headers=headers, preload_content=False,
                               timeout=urllib3.Timeout(connect=2.0, read=limit))
        whole = False
        try:
            if r.status != 200:
                r.drain_conn()  # a short JSON error: the connection stays usable
                whole = True
                return r.status, None, None
            buf = bytearray()
            while chunk := r.read(self.READ):
                buf += chunk
                if len(buf) > size:
                    break  # more than a block: the hash check refuses it
                if time.monotonic() > deadline:
                    raise _TooSlow(f"under {MIN_RATE} bytes/s")
            else:
                whole = True
            data = bytes(buf)
            return 200, data, content_id(data)
        finally:
            if whole:
                r.release_conn()
            else:
                r.close()  # bytes left unread: never reuse this connection


class _TooSlow(urllib3.exceptions.HTTPError):
    pass
