"""The peer server: ``GET /v1/blocks/<id>`` for other agents of the cluster.

Only blocks by content id, never a path; only to requests signed with the
cluster secret (401 otherwise); 404 for a block this node does not hold; 429
when every upload slot is busy, so the asker tries another holder at once
instead of queueing here. A block is served as soon as it is verified in the
cache, so blocks flow on down a chain while the file is still arriving.
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

from ..metrics import PEER_BYTES
from .auth import NODE_HEADER, verify
from .ratelimit import RateLimit

if TYPE_CHECKING:
    from ..cache import BlockCache

log = logging.getLogger(__name__)
_ID = re.compile(r"^[0-9a-f]{64}$")


class PeerServer:
    CHUNK = 256 * 1024

    def __init__(self, cache: BlockCache, secret: bytes, *, upload_slots: int = 8, upload_rate: int = 0) -> None:
        self.cache = cache
        self.secret = secret
        self.slots = trio.Semaphore(upload_slots)
        self.rate = RateLimit(upload_rate)  # bytes/s for all uploads together; 0: unlimited
        self.active = 0
        # Test-only fault switch: serve every block with one byte flipped.
        self.corrupt = os.environ.get("SYNCBIT_TEST_CORRUPT_PEER") == "1"

    def app(self) -> Starlette:
        async def block(request: Request):
            path = request.url.path
            if not verify(self.secret, request.method, path, request.headers, time.time()):
                return JSONResponse({"error": "unauthorized", "message": "missing or bad cluster signature"},
                                    status_code=401)
            bid = request.path_params["id"]
            if not _ID.match(bid):
                return JSONResponse({"error": "bad request", "message": "not a block id"}, status_code=400)
            data = self._read(bid)
            if data is None:
                return JSONResponse({"error": "not found", "message": "block not held"}, status_code=404)
            try:
                self.slots.acquire_nowait()
            except trio.WouldBlock:
                return JSONResponse({"error": "busy", "message": "all upload slots in use"}, status_code=429)
            self.active += 1
            counter = PEER_BYTES.labels(direction="upload", peer=request.headers.get(NODE_HEADER, "?"))

            async def body():
                # The slot is held until the last byte is sent (or the peer hangs up).
                try:
                    view = memoryview(data)
                    for pos in range(0, len(data), self.CHUNK):
                        chunk = view[pos:pos + self.CHUNK]
                        await self.rate.take(len(chunk))
                        yield bytes(chunk)
                        counter.inc(len(chunk))
                finally:
                    self.active -= 1
                    self.slots.release()

            return StreamingResponse(body(), media_type="application/octet-stream",
                                     headers={"content-length": str(len(data))})

        return Starlette(routes=[Route("/v1/blocks/{id}", block)])

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
