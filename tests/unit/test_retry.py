"""Unit tests for syncbit.sources.retry.Retrier: backoff with jitter, under trio's virtual clock."""

from __future__ import annotations

import pytest
import trio

from syncbit.errors import SourceNotFound, TemporarySourceError
from syncbit.sources.retry import Retrier


def is_temp(e: BaseException) -> bool:
    return isinstance(e, TemporarySourceError)


class Flaky:
    """An operation that fails ``n`` times with ``error`` and then returns ``value``."""

    def __init__(self, n: int, error=TemporarySourceError("503"), value="ok"):
        self.n, self.error, self.value = n, error, value
        self.calls: list[float] = []

    async def __call__(self):
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.n:
            raise self.error
        return self.value


async def test_success_first_time_does_not_sleep(autojump_clock):
    r = Retrier(is_temp, what="test")
    t0 = trio.current_time()
    assert await r.run(Flaky(0)) == "ok"
    assert r.attempts == 1 and r.last_error is None
    assert trio.current_time() == t0


async def test_temporary_errors_are_retried_until_success(autojump_clock):
    op = Flaky(3)
    r = Retrier(is_temp, what="test")
    assert await r.run(op) == "ok"
    assert len(op.calls) == 4 and r.attempts == 4
    assert isinstance(r.last_error, TemporarySourceError)


async def test_permanent_error_is_raised_at_once(autojump_clock):
    op = Flaky(5, error=SourceNotFound("gone"))
    r = Retrier(is_temp, what="test")
    t0 = trio.current_time()
    with pytest.raises(SourceNotFound):
        await r.run(op)
    assert len(op.calls) == 1 and trio.current_time() == t0


async def test_permanent_error_after_temporary_ones(autojump_clock):
    errors = [TemporarySourceError("503"), TemporarySourceError("reset"), SourceNotFound("deleted")]

    async def op():
        raise errors.pop(0)

    r = Retrier(is_temp, what="test")
    with pytest.raises(SourceNotFound):
        await r.run(op)
    assert r.attempts == 3 and str(r.last_error) == "reset"


async def test_the_source_decides_what_is_temporary(autojump_clock):
    seen = []

    def classify(e):
        seen.append(e)
        return isinstance(e, KeyError)

    op = Flaky(2, error=KeyError("k"))
    assert await Retrier(classify, what="test").run(op) == "ok"
    assert len(seen) == 2 and all(isinstance(e, KeyError) for e in seen)


async def test_backoff_is_exponential_with_jitter_and_capped(autojump_clock):
    op = Flaky(7)
    r = Retrier(is_temp, what="test", initial_delay=1.0, max_delay=8.0)
    await r.run(op)
    gaps = [b - a for a, b in zip(op.calls, op.calls[1:])]
    nominal = [1, 2, 4, 8, 8, 8, 8]
    assert len(gaps) == len(nominal)
    for gap, d in zip(gaps, nominal):
        # Jitter takes each delay down to at most half, never above the nominal one.
        assert 0.5 * d - 1e-9 <= gap <= d + 1e-9, (gaps, nominal)


async def test_jitter_spreads_retries(autojump_clock):
    # Many clients failing at once must not retry in lockstep.
    firsts = set()
    for _ in range(10):
        op = Flaky(1)
        await Retrier(is_temp, what="test", initial_delay=1.0).run(op)
        firsts.add(round(op.calls[1] - op.calls[0], 9))
    assert len(firsts) > 1


async def test_caller_bounds_the_retries_with_a_cancel_scope(autojump_clock):
    op = Flaky(10**9)
    r = Retrier(is_temp, what="test", initial_delay=0.1, max_delay=5.0)
    with trio.move_on_after(60) as scope:
        await r.run(op)
    assert scope.cancelled_caught
    assert r.attempts == len(op.calls) > 10
    assert isinstance(r.last_error, TemporarySourceError)  # the caller can say why
    assert trio.current_time() == pytest.approx(60)


async def test_cancellation_is_not_treated_as_an_error(autojump_clock):
    classified = []

    async def op():
        await trio.sleep_forever()

    r = Retrier(lambda e: classified.append(e) or True, what="test")
    with trio.move_on_after(1):
        await r.run(op)
    assert classified == [] and r.attempts == 1


async def test_retrying_for_hours_does_not_overflow(autojump_clock):
    # A source that stays down for two hours of (virtual) time.
    op = Flaky(10**9)
    r = Retrier(is_temp, what="test", initial_delay=0.1, max_delay=5.0)
    with trio.move_on_after(2 * 3600) as scope:
        await r.run(op)
    assert scope.cancelled_caught and r.attempts > 1025
