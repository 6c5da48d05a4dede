"""Fetching blocks from peers: ask the tracker who holds them, fetch, verify, fall back.

Every block from a peer is checked against its BLAKE3 id before it goes
anywhere; a peer that sends a wrong block is logged, counted and banned for a
while. A slow, dead or refusing peer is dropped for that block and the next
holder is tried; when none is left the caller goes to the source.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time

import trio

from ..errors import BlockCorrupt
from ..metrics import PEER_BYTES, PEER_ERRORS, RELAY_BYTES
from ..model import content_id
from .auth import auth_headers
from .ratelimit import RateLimit
from .server import ID_LENGTH

log = logging.getLogger(__name__)

BAN_SECONDS = 300.0
MIN_RATE = 1 * 2**20  # bytes/s below which a peer is given up on for a block
RELAY_SECONDS = 30.0  # a relay goes at the source's pace: given up on only after this long (a claim's life)
# ... but a relay that brings no byte for this long is stalled (its node's link is down, say): given up on,
# so that the block is taken whole from a holder instead of waiting out RELAY_SECONDS.
RELAY_STALL = 5.0


class PeerBusy(Exception):
    """The peer holds the block but every upload slot is in use (429): ask again soon, not the source."""


class PeerClient:
    """Blocks from peers over HTTP/1.1 with the standard library's http.client in worker threads.

    Receiving and hashing run off the trio thread with the GIL released (as
    for HTTP sources): with httpx on trio a node taking ~20 MB/s from peers
    spent a quarter of its event loop parsing and joining the bodies. The
    body is read with ``readinto`` straight into one buffer of the block's
    size, which is what gets stored: urllib3's ``read`` copied every byte
    three more times, each into fresh memory (page faults that cost more
    than the copies on VMs whose free memory goes back to the host).
    """

    READ = 1 * 2**20
    IDLE_PER_PEER = 8  # kept-alive connections per peer

    def __init__(self, secret: bytes, node: str, download_rate: int = 0) -> None:
        self.secret = secret
        self.node = node
        self.rate = RateLimit(download_rate)  # bytes/s for all downloads from peers; 0: unlimited
        self.banned: dict[str, float] = {}
        self._idle: dict[str, list[http.client.HTTPConnection]] = {}  # kept-alive connections by peer
        self._idle_lock = threading.Lock()
        self._threads = trio.CapacityLimiter(40)  # whole blocks, relays, reads

    async def aclose(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

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
        got = await self._fetch(address, f"/v1/blocks/{block_id}", size, max(5.0, size / MIN_RATE))
        if got is None:
            return None
        data, actual, _ = got
        if actual != block_id:
            self._corrupt(address, block_id, actual)
        return data

    async def fetch_relay(self, address: str, file_object: str, idx: int, size: int) -> tuple[bytes, str] | None:
        """Block ``idx`` of ``file_object`` from the node fetching it from the source, while it arrives.

        Returns (bytes, block id), the bytes checked against the id the
        relaying node computed; None if that node cannot give it (any more).
        Raises PeerBusy (429) and BlockCorrupt (the node is banned).
        """
        got = await self._fetch(address, f"/v1/relay/{file_object}/{idx}", size, RELAY_SECONDS, trailer=ID_LENGTH,
                                stall=RELAY_STALL)
        if got is None:
            return None
        data, actual, claimed = got
        if actual != claimed:
            self._corrupt(address, f"{file_object}#{idx} (relayed as {claimed[:16]}…)", actual)
        RELAY_BYTES.labels(direction="download").inc(len(data))
        return data, actual

    def _corrupt(self, address: str, what: str, got: str) -> None:
        self.banned[address] = time.monotonic() + BAN_SECONDS
        PEER_ERRORS.labels(reason="corrupt").inc()
        log.error("peer %s sent a wrong block for %s (hash %s): banned for %.0fs", address, what, got, BAN_SECONDS)
        raise BlockCorrupt(f"peer {address} sent bytes that are not block {what}")

    async def _fetch(self, address: str, path: str, size: int, limit: float, trailer: int = 0,
                     stall: float | None = None) -> tuple[bytes, str, str] | None:
        """GET ``path`` from ``address``: (block bytes, their BLAKE3 id, the trailer), or None.

        Slower than ``limit`` seconds in all (or ``stall`` seconds without a byte), unreachable or
        refusing (but 429: PeerBusy): None.
        """
        headers = auth_headers(self.secret, "GET", path, time.time(), self.node)
        await self.rate.take(size)  # booked up front: the limit holds on average over blocks
        try:
            with trio.fail_after(limit + 1.0):  # a peer trickling bytes: its reads never time out
                status, data, got, tail = await trio.to_thread.run_sync(
                    self._get, address, path, headers, size, limit, trailer, stall or limit, abandon_on_cancel=True,
                    limiter=self._threads)
        except trio.TooSlowError:
            PEER_ERRORS.labels(reason="slow").inc()
            log.debug("peer %s too slow for %s", address, path)
            return None
        except (http.client.HTTPException, OSError, ValueError) as e:  # ValueError: a malformed address
            reason = "slow" if isinstance(e, _TooSlow | TimeoutError) else "unreachable"
            PEER_ERRORS.labels(reason=reason).inc()
            log.debug("peer %s, %s: %s: %s", address, path, type(e).__name__, e)
            return None
        if status != 200:
            PEER_ERRORS.labels(reason=str(status)).inc()
            if status == 401:
                log.error("peer %s refused our cluster signature: is cluster_secret_file the same there?", address)
            if status == 429:
                raise PeerBusy(address)
            return None
        if data is None:  # a body of the wrong length
            PEER_ERRORS.labels(reason="short").inc()
            return None
        PEER_BYTES.labels(direction="download", peer=address).inc(len(data))
        return data, got, tail

    def _get(self, address: str, path: str, headers: dict, size: int, limit: float, trailer: int,
             stall: float) -> tuple[int, bytearray | None, str | None, str]:
        """(status, body, its BLAKE3 id, trailer) in a worker thread; raises _TooSlow past ``limit`` seconds.

        The body is ``size`` bytes followed by ``trailer`` bytes of text; None if it ended short.
        """
        deadline = time.monotonic() + limit
        conn, reused = self._connection(address, stall)
        keep = False
        try:
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError):
                if not reused:
                    raise
                conn.close()  # the peer closed it while it was idle here: once more on a new one
                conn, _ = self._connection(address, stall, fresh=True)
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
            if r.status != 200:
                r.read(64 * 1024)  # a short JSON error: the connection stays usable
                keep = not r.will_close and r.isclosed()
                return r.status, None, None, ""
            want = size + trailer
            if r.length is not None and r.length > want:  # more than a block: its id will not match
                return 200, bytearray(), content_id(b"more than the block"), ""
            buf = bytearray(want)
            view = memoryview(buf)
            got = 0
            while got < want:
                n = r.readinto(view[got:got + self.READ])
                if not n:
                    break
                got += n
                if time.monotonic() > deadline:
                    raise _TooSlow(f"under {size / limit:.0f} bytes/s")
            tail = bytes(view[size:got]).decode("ascii", "replace")
            view.release()
            if got < want:
                return 200, None, None, ""
            if r.length is None and r.read(1):  # chunked (a relay), and more than the block: not it
                return 200, bytearray(), content_id(b"more than the block"), ""
            keep = not r.will_close and r.isclosed()
            del buf[size:]
            return 200, buf, content_id(buf), tail
        finally:
            if keep:
                self._release(address, conn)
            else:
                conn.close()  # bytes left unread or a broken exchange: never reuse this connection

    def _connection(self, address: str, timeout: float,
                    fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection to ``address`` if there is one (reused: True), else a new one."""
        conn = None
        if not fresh:
            with self._idle_lock:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else None
        reused = conn is not None
        if conn is None:
            host, _, port = address.rpartition(":")
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2.0)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(timeout)  # connected within 2 s; then each read within ``timeout``
        return conn, reused

    def _release(self, address: str, conn: http.client.HTTPConnection) -> None:
        with self._idle_lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < self.IDLE_PER_PEER:
                idle.append(conn)
                return
        conn.close()


class _TooSlow(http.client.HTTPException):
    pass
