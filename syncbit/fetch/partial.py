"""A block still arriving from the source, readable while it arrives.

With peers, the node the tracker sent to the source relays each block to the
nodes that want it while the bytes come in (``GET /v1/relay/...``), instead
of after the whole block is stored: with 4 MiB blocks and a source shared by
every node, store-and-forward left every node's link idle for the first
second or two of a swarm, and the last blocks crossed the swarm one whole
block after another at the end.

Everything here runs on the trio thread: a reader checks ``filled`` and
awaits ``changed()`` with no await in between, so it never misses a wake-up.
"""

from __future__ import annotations

import trio


class PartialBlock:
    def __init__(self, size: int) -> None:
        self.size = size
        self.buf: bytearray | None = None  # allocated at the first byte: a run's later blocks wait their turn
        self.filled = 0
        self.block_id: str | None = None  # set once the block is hashed and stored
        self.failed = False
        self._changed = trio.Event()

    def write(self, chunk: memoryview) -> int:
        """Append what fits of ``chunk``; returns how many bytes were taken."""
        if self.buf is None:
            self.buf = bytearray(self.size)
        n = min(len(chunk), self.size - self.filled)
        self.buf[self.filled:self.filled + n] = chunk[:n]
        self.filled += n
        self._wake()
        return n

    @property
    def full(self) -> bool:
        return self.filled == self.size

    def stored(self, block_id: str) -> None:
        self.block_id = block_id
        self._wake()

    def fail(self) -> None:
        """The fetch failed or restarted: relays of these bytes must end unfinished."""
        self.failed = True
        self._wake()

    async def changed(self) -> None:
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
