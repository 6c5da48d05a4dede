"""The peer server: ``GET /v1/blocks/<id>`` for other agents of the cluster.

Only blocks by content id, never a path; only to requests signed with the
cluster secret (401 otherwise); 404 for a block this node does not hold; 429
when every upload slot is busy, so the asker tries another holder at once
instead of queueing here. A block is served as soon as it is verified in the
cache, so blocks flow on down a chain while the file is still arriving.

``GET /v1/relay/<file object>/<index>`` serves a block this node is fetching
from the source while it arrives (cut-through), followed by its 64-character
BLAKE3 id once this node has hashed and stored it, chunked; the asker checks
the bytes against that id. A relay whose source fetch fails ends early.
Relays have their own slots: they run at the source's pace, and must not take
the slots of whole blocks.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..metrics import PEER_BYTES, RELAY_BYTES
from .auth import NODE_HEADER, verify
from .ratelimit import RateLimit

if TYPE_CHECKING:
    from ..cache import BlockCache
    from ..fetch.partial import PartialBlock

log = logging.getLogger(__name__)
_ID = re.compile(r"^[0-9a-f]{64}$")
_FILE_OBJECT = re.compile(r"^[0-9a-f]{32}$")
ID_LENGTH = 64  # the trailer of a relayed block: its hex BLAKE3 id
RELAYS_PER_SLOT = 4  # relays allowed at once per upload slot
_RELAYED = RELAY_BYTES.labels(direction="upload")


class PeerServer:
    # Bodies go out in slices of this many bytes (memoryviews, not copies: each
    # slice is copied once anyway, by h11 joining it to its framing).
    CHUNK = 1 * 2**20

    def __init__(self, cache: BlockCache, secret: bytes, *, upload_slots: int = 8, upload_rate: int = 0,
                 partials: dict[tuple[str, int], PartialBlock] | None = None) -> None:
        self.cache = cache
        self.secret = secret
        self.partials = partials if partials is not None else {}  # the fetcher's blocks arriving from the source
        self.slots = trio.Semaphore(upload_slots)
        # Relays go at the source's pace, a fraction of the link each, to every node at once.
        self.relay_slots = trio.Semaphore(RELAYS_PER_SLOT * upload_slots)
        self.rate = RateLimit(upload_rate)  # bytes/s for all uploads together; 0: unlimited
        self.active = 0
        # Test-only fault switch: serve every block with one byte flipped.
        self.corrupt = os.environ.get("SYNCBIT_TEST_CORRUPT_PEER") == "1"

    def app(self) -> Starlette:
        async def block(request: Request):
            if (refused := self._refuse(request)) is not None:
                return refused
            bid = request.path_params["id"]
            if not _ID.match(bid):
                return _error(400, "bad request", "not a block id")
            data = self._read(bid)
            if data is None:
                return _error(404, "not found", "block not held")
            if not _take(self.slots):
                return _error(429, "busy", "all upload slots in use")
            return self._stream(request, self._whole(data), len(data), self.slots)

        async def relay(request: Request):
            if (refused := self._refuse(request)) is not None:
                return refused
            fo, idx = request.path_params["fo"], request.path_params["idx"]
            if not _FILE_OBJECT.match(fo) or not idx.isdigit() or len(idx) > 9:
                return _error(400, "bad request", "not a file object and block index")
            key = (fo, int(idx))
            partial = self.partials.get(key)
            if partial is not None:
                body = self._arriving(partial)
            else:  # stored meanwhile (or never fetched here): the whole block, if held
                bid = self.cache.present_block(*key)
                data = self._read(bid) if bid is not None else None
                if data is None:
                    return _error(404, "not found", "block neither arriving nor held")
                body = self._whole(data, bid.encode())
            if not _take(self.relay_slots):
                return _error(429, "busy", "all relay slots in use")
            # No Content-Length (chunked): a relay whose source fetch fails ends early and
            # cleanly, and the asker sees fewer bytes than the block and its id.
            return self._stream(request, body, None, self.relay_slots)

        return Starlette(routes=[Route("/v1/blocks/{id}", block), Route("/v1/relay/{fo}/{idx}", relay)])

    def _refuse(self, request: Request) -> JSONResponse | None:
        if verify(self.secret, request.method, request.url.path, request.headers, time.time()):
            return None
        return _error(401, "unauthorized", "missing or bad cluster signature")

    def _stream(self, request: Request, body, length: int | None, slots: trio.Semaphore) -> StreamingResponse:
        """Send ``body``'s chunks, rate limited, holding an upload slot of ``slots`` until the last byte
        is sent (or the peer hangs up)."""
        self.active += 1
        counter = PEER_BYTES.labels(direction="upload", peer=request.headers.get(NODE_HEADER, "?"))

        async def limited():
            try:
                async for chunk in body:
                    await self.rate.take(len(chunk))
                    yield chunk
                    counter.inc(len(chunk))
            finally:
                self.active -= 1
                slots.release()

        return StreamingResponse(limited(), media_type="application/octet-stream",
                                 headers={"content-length": str(length)} if length is not None else None)

    async def _whole(self, data: bytes, trailer: bytes = b""):
        view = memoryview(data)
        for pos in range(0, len(data), self.CHUNK):
            yield view[pos:pos + self.CHUNK]
        if trailer:
            yield trailer

    async def _arriving(self, partial: PartialBlock):
        """A block's bytes as they arrive from the source, then its id; ends short if the fetch fails."""
        sent = 0
        while True:
            if partial.failed:
                log.debug("relayed block failed at the source after %d bytes: ending the relay short", sent)
                return  # fewer bytes than the block and its id: the asker drops them
            if sent < partial.filled:
                end = min(partial.filled, sent + self.CHUNK)
                chunk = memoryview(partial.buf)[sent:end]  # bytes below ``filled`` never change
                if self.corrupt and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                sent = end
                _RELAYED.inc(len(chunk))
                yield chunk
                continue
            if partial.block_id is not None:
                yield partial.block_id.encode()
                return
            await partial.changed()

    def _read(self, bid: str) -> bytes | None:
        if not self.cache.has_block(bid):
            return None
        try:
            fd = self.cache.block_fd(bid)
        except FileNotFoundError:
            return None
        data = os.pread(fd, self.cache.block_size_of(bid), 0)  # no await since block_fd: still open
        if self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    async def run(self, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = HypercornConfig()
        cfg.bind = [listen]
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("syncbit.peer.http")
        cfg.graceful_timeout = 1.0
        cfg.keep_alive_timeout = 30
        await serve(self.app(), cfg, task_status=task_status)


def _take(slots: trio.Semaphore) -> bool:
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)
