"""A small static HTTP origin with Range support, for the demo, tests and benchmarks.

Serves a directory like nginx with ``autoindex on``: an index page per
directory (with a ``../`` link), ETag and Last-Modified, single byte ranges,
HEAD. Bytes go out with ``sendfile``. Fault switches (for tests only) make it
behave like the origins users meet: one that ignores Range, one that drops
the connection mid-body, one that answers 503 at times. ``bytes_sent`` counts
body bytes, so tests can tell how much left the origin.
"""

from __future__ import annotations

import email.utils
import html
import os
import re
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from .httpserver import TrackedHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class OriginServer(TrackedHTTPServer):
    thread_name = "origin"

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.ignore_range = False
        self.drop_after: int | None = None  # close the connection after this many body bytes
        self.drop_every = 1  # ... on every Nth GET (1: all of them)
        self.fail_every = 0  # answer 503 to every Nth GET (0: never)
        self.fail_next = 0  # answer 503 to this many next requests, HEAD included (an outage)
        self.extra_links: list[str] = []  # hrefs added to every index page (hostile-listing tests)
        self.rate: int | None = None  # bytes per second per response (slow origins)
        self.bytes_sent = 0
        self.gets = 0
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n



class _Handler(BaseHTTPRequestHandler):
    server: OriginServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _path(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        p = (self.server.root / rel).resolve()
        if p != self.server.root and self.server.root not in p.parents:
            return None
        return p

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv = self.server
        with srv._lock:
            outage = srv.fail_next > 0
            srv.fail_next -= outage
        if outage:
            return self._simple(503, b"down for maintenance\n")
        if not head:
            with srv._lock:
                srv.gets += 1
                n = srv.gets
            if srv.fail_every and n % srv.fail_every == 0:
                return self._simple(503, b"try again later\n")
        else:
            n = 0
        p = self._path()
        if p is None or not p.exists():
            return self._simple(404, b"not found\n")
        if p.is_dir():
            if not urlsplit(self.path).path.endswith("/"):
                self.send_response(301)
                self.send_header("Location", urlsplit(self.path).path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self._index(p, head)
        st = p.stat()
        size = st.st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(0, size - int(m.group(2)))
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if not srv.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or not length:
            return
        limit = length
        drop = srv.drop_after is not None and n % max(1, srv.drop_every) == 0
        if drop:
            limit = min(length, srv.drop_after)
        self.wfile.flush()
        with open(p, "rb") as f:
            sent = 0
            try:
                while sent < limit:
                    step = 8 << 20 if srv.rate is None else max(4096, srv.rate // 20)
                    k = self.connection.sendfile(f, start + sent, min(limit - sent, step))
                    if not k:
                        break
                    sent += k
                    srv.count(k)
                    if srv.rate is not None:
                        time.sleep(k / srv.rate)
            except (BrokenPipeError, ConnectionResetError):
                pass
        if drop:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

    def _index(self, d: Path, head: bool) -> None:
        base = urlsplit(self.path).path
        rows = ['<a href="../">../</a>'] if base != "/" else []
        for child in sorted(d.iterdir()):
            name = child.name + ("/" if child.is_dir() else "")
            rows.append(f'<a href="{quote(name)}">{html.escape(name)}</a>')
        rows += [f'<a href="{h}">{html.escape(h)}</a>' for h in self.server.extra_links]
        body = (f"<html><head><title>Index of {html.escape(base)}</title></head><body>"
                f"<h1>Index of {html.escape(base)}</h1><hr><pre>\n" + "\n".join(rows) +
                "\n</pre><hr></body></html>\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _simple(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def main() -> None:  # python -m syncbit.demo.origin DIR [PORT [HOST]]
    import sys

    srv = OriginServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                       host=sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1")
    print(srv.url, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
