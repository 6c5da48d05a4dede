"""Retries with exponential backoff and jitter, shared by every caller of a source.

There is no timeout parameter: the caller bounds the whole thing with
``trio.move_on_after``/``fail_after`` and reads ``last_error`` to explain why.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")


class Retrier:
    def __init__(
        self,
        is_temporary: Callable[[BaseException], bool],
        *,
        what: str,
        initial_delay: float = 0.1,
        max_delay: float = 5.0,
    ) -> None:
        self.is_temporary = is_temporary
        self.what = what
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.attempts = 0
        self.last_error: BaseException | None = None

    async def run(self, op: Callable[[], Awaitable[T]]) -> T:
        while True:
            self.attempts += 1
            try:
                return await op()
            except Exception as e:
                if not self.is_temporary(e):
                    raise
                self.last_error = e
                delay = min(self.max_delay, self.initial_delay * 2 ** min(self.attempts - 1, 30))
                delay *= random.uniform(0.5, 1.0)
                # One line per retry is fine: retries are rare and spaced out.
                log.warning("%s failed (attempt %d): %s; retrying in %.1fs", self.what, self.attempts, e, delay)
                await trio.sleep(delay)


async def retry_within(deadline: float, is_temporary: Callable[[BaseException], bool], op: Callable[[], Awaitable[T]],
                       *, what: str) -> T:
    """``op`` retried on temporary errors for at most ``deadline`` seconds (sources' listings)."""
    from ..errors import SourceError

    retrier = Retrier(is_temporary, what=what)
    with trio.move_on_after(deadline):
        return await retrier.run(op)
    raise SourceError(f"{what}: gave up after {deadline:.0f}s: {retrier.last_error}")
