"""The http source against an origin whose 206 answers do not hold the bytes asked for."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler

import pytest
import trio

from syncbit.errors import SourceError
from syncbit.sources import open_source

from ..servers.threaded import serving

SIZE = 1 << 30  # what the origin claims the file holds
BODY = 256 << 20  # what it sends for any range


class _ShiftedRanges(BaseHTTPRequestHandler):
    """Answers every range with 206 and a Content-Range that starts 1 MiB after the one asked for."""

    protocol_version = "HTTP/1.1"
    sent = 0

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.send_header("ETag", '"v1"')
        self.end_headers()

    def do_GET(self):
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) + (1 << 20)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + BODY - 1}/{SIZE}")
        self.send_header("Content-Length", str(BODY))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(BODY // len(chunk)):
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:
            pass  # the client hung up: what it should do

    def log_message(self, *args):
        pass


@pytest.fixture
def shifted_origin():
    with serving(_ShiftedRanges) as url:
        yield f"{url}/big.bin"


async def test_a_range_answer_starting_after_the_offset_is_refused_at_once(shifted_origin):
    # The bytes asked for are not in the answer, and none can be skipped to:
    # a negative skip once made urllib3 read the whole 256 MiB body into one
    # bytes object, then fail with a temporary error that was retried.
    src = await open_source(shifted_origin)
    try:
        entry = (await src.resolve()).files[0]
        got = []

        async def sink(chunk):
            got.append(chunk)

        t0 = time.monotonic()
        with trio.fail_after(30), pytest.raises(SourceError, match="starting at 1048676") as e:
            await src.read_range(entry, 100, 100, sink)
        assert not src.is_temporary(e.value)  # retrying cannot fix an origin that answers this
        assert got == []
        assert time.monotonic() - t0 < 5
        assert _ShiftedRanges.sent < BODY  # the connection was dropped, not drained
    finally:
        await src.aclose()
