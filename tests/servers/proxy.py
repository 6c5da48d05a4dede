"""An HTTP reverse proxy for tests: counts the body bytes it relays and injects faults.

Put it in front of a server that has no byte counter or fault switches of its
own (moto's S3): the client talks to the proxy, which forwards every request
unchanged (Host header included, so AWS signatures still match) over a new
connection to the upstream and streams the answer back.
"""

from __future__ import annotations

import http.client
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from syncbit.demo.httpserver import TrackedHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy(TrackedHTTPServer):
    thread_name = "fault-proxy"

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.bytes_sent = 0  # response body bytes relayed to clients
        self.bytes_by_path: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self._fail: list[int] = []  # statuses to answer instead of forwarding, in order
        self._cut_after: int | None = None  # cut the next GET body after this many bytes
        super().__init__((host, 0), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` (an S3-style error body) instead of forwarding."""
        with self._lock:
            self._fail.extend([status] * n)

    def clear_faults(self) -> None:
        """Forward everything again (drops failures queued by ``fail_next``)."""
        with self._lock:
            self._fail.clear()

    def cut_next_body(self, after: int) -> None:
        """Close the connection of the next GET after ``after`` body bytes (a dropped transfer)."""
        with self._lock:
            self._cut_after = after

    def body_bytes(self, path_prefix: str) -> int:
        """Body bytes sent for paths starting with ``path_prefix`` (S3 objects: ``/bucket/key``)."""
        with self._lock:
            return sum(n for p, n in self.bytes_by_path.items() if p.startswith(path_prefix))

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.bytes_by_path = {}
            self.requests = []



class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _relay(self) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv._lock:
            srv.requests.append((self.command, self.path))
            status = srv._fail.pop(0) if srv._fail else None
            cut = None
            if self.command == "GET" and srv._cut_after is not None and status is None:
                cut, srv._cut_after = srv._cut_after, None
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if status is not None:
            msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                   b"<Message>injected by the test proxy</Message></Error>")
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(*srv.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            sent = 0
            while chunk := resp.read(1 << 20):
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[: cut - sent])
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                with srv._lock:
                    srv.bytes_sent += len(chunk)
                    srv.bytes_by_path[path] = srv.bytes_by_path.get(path, 0) + len(chunk)
        finally:
            conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay
