"""Relays (``GET /v1/relay/<file object>/<index>``): a block passed on while it arrives from the source.

A real peer server (hypercorn on loopback) over a real block cache, and the
real peer client in its worker threads; the block "arriving from the source"
is a PartialBlock this test fills by hand, so that what is sent before the
block is whole can be observed.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import trio

from syncbit.cache import BlockCache
from syncbit.cache.store import BlockStore
from syncbit.errors import BlockCorrupt
from syncbit.fetch.partial import PartialBlock
from syncbit.metrics import PEER_BYTES
from syncbit.model import content_id
from syncbit.peer.auth import auth_headers
from syncbit.peer.client import PeerClient
from syncbit.peer.server import RELAYS_PER_SLOT, PeerServer
from tests.conftest import _free_port

SECRET = b"relay test secret, 32 bytes long"
FO = "0123456789abcdef0123456789abcdef"
SIZE = 3 * 2**20 + 12345
DATA = bytes((i * 7 + i // 4096) % 251 for i in range(SIZE))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(BlockStore, "sync", lambda self: None)
    c = BlockCache(tmp_path / "cache", quota=2**30)
    c.open()
    yield c
    c.index.close()


async def serve(nursery, cache, partials, **kw) -> tuple[PeerServer, str]:
    server = PeerServer(cache, SECRET, partials=partials, **kw)
    address = f"127.0.0.1:{_free_port()}"
    await nursery.start(server.run, address)
    return server, address


def ask(nursery, client: PeerClient, address: str, idx: int) -> list:
    """Ask for block ``idx`` by relay in the background; the answer lands in the list returned."""
    got: list = []

    async def fetch():
        got.append(await client.fetch_relay(address, FO, idx, SIZE))

    nursery.start_soon(fetch)
    return got


async def answer(got: list):
    with trio.fail_after(10):
        while not got:
            await trio.sleep(0.01)
    return got[0]


def uploaded_to(peer: str) -> float:
    return PEER_BYTES.labels(direction="upload", peer=peer)._value.get()


async def test_a_block_is_relayed_while_it_arrives_then_checked_against_the_relays_id(cache):
    partials = {(FO, 3): (p := PartialBlock(SIZE))}
    client = PeerClient(SECRET, "relay-asker-1")
    async with trio.open_nursery() as nursery:
        _, address = await serve(nursery, cache, partials)
        got = ask(nursery, client, address, 3)
        before = uploaded_to("relay-asker-1")
        p.write(memoryview(DATA)[:2**20])
        # Cut-through: the first MiB reaches the asker while the rest has not arrived here yet.
        with trio.fail_after(10):
            while uploaded_to("relay-asker-1") - before < 2**20:
                await trio.sleep(0.01)
        assert not got
        p.write(memoryview(DATA)[2**20:])
        await trio.sleep(0.2)
        assert not got, "the asker waits for the id, sent once the relay has stored the block"
        p.stored(content_id(DATA))
        assert await answer(got) == (DATA, content_id(DATA))
        nursery.cancel_scope.cancel()
    await client.aclose()


async def test_a_relay_that_flips_a_byte_is_banned_and_its_bytes_refused(cache):
    partials = {(FO, 0): (p := PartialBlock(SIZE))}
    p.write(memoryview(DATA))
    p.stored(content_id(DATA))
    client = PeerClient(SECRET, "relay-asker-2")
    async with trio.open_nursery() as nursery:
        server, address = await serve(nursery, cache, partials)
        server.corrupt = True  # the test-only fault switch: first byte flipped on the wire
        with pytest.raises(BlockCorrupt):
            await client.fetch_relay(address, FO, 0, SIZE)
        assert not client.usable(address), "banned"
        nursery.cancel_scope.cancel()
    await client.aclose()


async def test_a_relay_whose_source_fetch_fails_ends_short_and_gives_nothing(cache, caplog):
    partials = {(FO, 1): (p := PartialBlock(SIZE))}
    client = PeerClient(SECRET, "relay-asker-3")
    async with trio.open_nursery() as nursery:
        _, address = await serve(nursery, cache, partials)
        got = ask(nursery, client, address, 1)
        p.write(memoryview(DATA)[:100_000])
        await trio.sleep(0.3)
        p.fail()  # the source broke off: the relay must not pass on a block that never completed
        assert await answer(got) is None
        nursery.cancel_scope.cancel()
    assert client.usable(address), "a failed source is not the relay's fault: not banned"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "ended cleanly, not as a server error"
    await client.aclose()


async def test_a_block_stored_before_the_relay_was_asked_comes_whole_with_its_id(cache):
    bid = await cache.put(FO, 5, DATA, None)
    client = PeerClient(SECRET, "relay-asker-4")
    async with trio.open_nursery() as nursery:
        _, address = await serve(nursery, cache, {})
        assert await client.fetch_relay(address, FO, 5, SIZE) == (DATA, bid)
        assert await client.fetch_relay(address, FO, 6, SIZE) is None, "neither arriving nor held: 404"
        nursery.cancel_scope.cancel()
    await client.aclose()


async def test_relay_requests_need_the_cluster_secret_and_a_well_formed_path(cache):
    partials = {(FO, 0): PartialBlock(SIZE)}
    async with trio.open_nursery() as nursery:
        _, address = await serve(nursery, cache, partials)

        def get(path: str, secret: bytes | None = SECRET) -> int:
            headers = auth_headers(secret, "GET", path, time.time(), "t") if secret else {}
            return httpx.get(f"http://{address}{path}", headers=headers, timeout=5).status_code

        tries = {
            f"/v1/relay/{FO}/0": None,  # no signature
            f"/v1/relay/{FO}/1": b"another secret of 32 bytes length",
            "/v1/relay/..%2F..%2Fetc%2Fpasswd/0": SECRET,  # not a file object
            f"/v1/relay/{FO}/-1": SECRET,
            f"/v1/relay/{FO}/99999999999": SECRET,
            f"/v1/relay/{FO.upper()}/0": SECRET,
        }
        codes = [await trio.to_thread.run_sync(get, path, secret) for path, secret in tries.items()]
        nursery.cancel_scope.cancel()
    assert codes == [401, 401, 404, 400, 400, 400]


async def test_relay_slots_are_their_own_and_answer_429_when_full(cache):
    partials = {(FO, i): PartialBlock(SIZE) for i in range(RELAYS_PER_SLOT + 1)}
    client = PeerClient(SECRET, "relay-asker-5")
    async with trio.open_nursery() as nursery:
        server, address = await serve(nursery, cache, partials, upload_slots=1)
        for i in range(RELAYS_PER_SLOT):  # relays waiting for bytes hold every relay slot
            nursery.start_soon(client.fetch_relay, address, FO, i, SIZE)
        with trio.fail_after(10):
            while server.relay_slots.value:
                await trio.sleep(0.01)
        status = await trio.to_thread.run_sync(lambda: httpx.get(
            f"http://{address}/v1/relay/{FO}/{RELAYS_PER_SLOT}", timeout=5,
            headers=auth_headers(SECRET, "GET", f"/v1/relay/{FO}/{RELAYS_PER_SLOT}", time.time(), "t")).status_code)
        assert status == 429
        assert server.slots.value == 1, "whole-block upload slots untouched by relays"
        nursery.cancel_scope.cancel()
    await client.aclose()
