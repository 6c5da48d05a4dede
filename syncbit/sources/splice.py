"""Moving a response body from a plain TCP socket into block files with ``os.splice``.

The bytes go from the socket's buffers through a pipe into the block file's
page cache without entering user space: no receive copy, no fresh buffer per
block (on a VM whose free memory is handed back to the host every fresh page
costs a host fault), and one GIL release per megabyte rather than per recv.
The block is then hashed in place (``BlockStore.adopt``, through an mmap).

Measured on the development VM (1 GiB from the loopback origin, 4 parallel
ranges; docs/performance.md): fetching and storing took 1.7 CPU-s per GiB
instead of 2.2 and ran 1.4x faster; a cold read through the mount went from
0.55-0.62 to 0.68-0.74 of curl. With a 64 KiB pipe (the default size) most of
the gain is lost to the number of calls, hence ``PIPE_SIZE``.

Only plain sockets: TLS has to be decrypted in user space.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket

import trio

from ..errors import TemporarySourceError, cache_full_on_enospc
from .base import Spool

PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size is 1 MiB by default: the most an unprivileged agent may ask


def splice_into(sock: socket.socket, head: bytes, length: int, spool: Spool, what: str) -> None:
    """Deliver ``length`` bytes as spooled blocks: ``head`` (already read), then from ``sock``.

    Runs in a worker thread. Honours the socket's timeout between bytes.
    Socket errors and a body that ends early raise TemporarySourceError; a
    full cache filesystem raises CacheFull. A block not delivered is discarded.
    """
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            capacity = fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe quota: the default size still works
            capacity = fcntl.fcntl(pipe_w, fcntl.F_GETPIPE_SZ)
        remaining = length
        while remaining:
            n = min(remaining, spool.size)
            block = spool.new()
            try:
                got = 0
                while head and got < n:  # what the HTTP parser read past the headers
                    k = _write(block.fd, head[:n - got])
                    head = head[k:]
                    got += k
                while got < n:
                    k = _from_socket(sock, poller, timeout, pipe_w, min(n - got, capacity), what, remaining - got)
                    _pipe_to_file(pipe_r, block.fd, k)
                    got += k
                block.size = n
                block.close()
                trio.from_thread.run(spool.deliver, block)
            except BaseException:
                if not block.handed:
                    block.discard()
                raise
            remaining -= n
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _from_socket(sock: socket.socket, poller, timeout: float | None, pipe_w: int, count: int,
                 what: str, missing: int) -> int:
    while True:
        try:
            k = os.splice(sock.fileno(), pipe_w, count)
        except BlockingIOError:  # a socket with a timeout is non-blocking underneath
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TemporarySourceError(f"{what}: no data for {timeout:g}s") from None
            continue
        except OSError as e:
            raise TemporarySourceError(f"{what}: {os.strerror(e.errno) if e.errno else e}") from e
        if k == 0:
            raise TemporarySourceError(f"{what}: body ended {missing} bytes short of the requested range")
        return k


# Errors of the block file are the cache's, never the source's: no retry.
_FULL = "no space left on the cache filesystem while storing a block"


def _pipe_to_file(pipe_r: int, fd: int, count: int) -> None:
    with cache_full_on_enospc(_FULL):
        while count:
            count -= os.splice(pipe_r, fd, count)


def _write(fd: int, data: bytes) -> int:
    with cache_full_on_enospc(_FULL):
        return os.write(fd, data)
