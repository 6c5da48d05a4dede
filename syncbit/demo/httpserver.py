"""A threading HTTP server that can really stop: it cuts its kept-alive connections too.

``ThreadingHTTPServer.shutdown`` only stops accepting; a client holding a
keep-alive connection would keep a handler thread (and a test) waiting. The
demo origin and the test servers share this bookkeeping.
"""

from __future__ import annotations

import sys
import threading
from http.server import ThreadingHTTPServer


class TrackedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    thread_name = "http-server"
    poll_interval = 0.5  # how soon serve_forever notices shutdown()

    def __init__(self, address, handler) -> None:
        self._lock = threading.Lock()  # also guards the subclasses' counters
        self._conns: set = set()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # Clients that hang up mid-body (range readers, tests) are normal here.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def cut_connections(self) -> None:
        """Close every open connection, keep-alive ones included (after ``shutdown``)."""
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(2)
            except OSError:
                pass

    def start(self):
        """Serve in a daemon thread; returns self."""
        threading.Thread(target=self.serve_forever, args=(self.poll_interval,), name=self.thread_name,
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (keep-alive ones too): the server is gone."""
        self.shutdown()
        self.server_close()
        self.cut_connections()
