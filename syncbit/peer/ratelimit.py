"""A byte-rate limiter shared by all transfers of one direction (pure trio, no threads).

A virtual clock: each ``take(n)`` books ``n / rate`` seconds after the last
booking (or now, less the burst allowance, if the limiter was idle) and
sleeps until its booking is due. Concurrent transfers share the rate.
"""

from __future__ import annotations

import trio


class RateLimit:
    def __init__(self, rate: float, burst_seconds: float = 0.25) -> None:
        self.rate = float(rate)
        self.burst_seconds = burst_seconds
        self._t = float("-inf")  # idle since forever: the first transfer gets the burst

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        self._t = max(self._t, now - self.burst_seconds) + n / self.rate
        if self._t > now:
            await trio.sleep(self._t - now)
