"""The peer protocol's request signatures: what verifies and what does not."""

import pytest

from syncbit.errors import ConfigError
from syncbit.peer.auth import auth_headers, load_secret, verify

SECRET = b"0123456789abcdef-cluster"
PATH = "/v1/blocks/" + "a" * 64


def test_a_signed_request_verifies_within_the_skew():
    h = auth_headers(SECRET, "GET", PATH, 1000.0, "n1")
    assert verify(SECRET, "GET", PATH, h, 1000.0)
    assert verify(SECRET, "GET", PATH, h, 1299.0)


@pytest.mark.parametrize("what,secret,method,path,now", [
    ("another secret", b"another-secret-of-16-bytes", "GET", PATH, 1000.0),
    ("another method", SECRET, "POST", PATH, 1000.0),
    ("another path", SECRET, "GET", "/v1/blocks/" + "b" * 64, 1000.0),
    ("too old (replay)", SECRET, "GET", PATH, 1301.0),
    ("from the future", SECRET, "GET", PATH, 699.0),
])
def test_what_does_not_verify(what, secret, method, path, now):
    h = auth_headers(SECRET, "GET", PATH, 1000.0, "n1")
    assert not verify(secret, method, path, h, now), what


@pytest.mark.parametrize("headers", [{}, {"x-syncbit-time": "1000"}, {"x-syncbit-auth": "ab"},
                                     {"x-syncbit-time": "-5", "x-syncbit-auth": "ab"},
                                     {"x-syncbit-time": "1000", "x-syncbit-auth": "not hex"}])
def test_missing_or_malformed_headers_do_not_verify(headers):
    assert not verify(SECRET, "GET", PATH, headers, 1000.0)


def test_secrets_shorter_than_16_bytes_or_missing_are_refused(tmp_path):
    (tmp_path / "short").write_text("tiny\n")
    with pytest.raises(ConfigError):
        load_secret(str(tmp_path / "short"))
    with pytest.raises(ConfigError):
        load_secret(str(tmp_path / "missing"))
    (tmp_path / "ok").write_text("  a secret that is long enough \n")
    assert load_secret(str(tmp_path / "ok")) == b"a secret that is long enough"


async def test_rate_limit_paces_bytes_across_callers(autojump_clock):
    import trio

    from syncbit.peer.ratelimit import RateLimit

    limit = RateLimit(1_000_000, burst_seconds=0.25)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(limit.take, 1_000_000)
    # 4 MB at 1 MB/s, less the 0.25 s burst allowance of an idle limiter.
    assert trio.current_time() - start == pytest.approx(3.75)
    unlimited = RateLimit(0)
    t = trio.current_time()
    await unlimited.take(10**12)
    assert trio.current_time() == t
