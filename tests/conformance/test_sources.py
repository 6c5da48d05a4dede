"""The conformance suite: every source behaves the same through the ``Source`` contract.

Each test runs against every bed (file, http, s3, versioned s3, hf model and
dataset repos) with real servers on loopback: the origin, moto's S3 behind a
fault-injecting proxy, and the Hub look-alike.
"""

from __future__ import annotations

import random

import pytest

from syncbit.errors import AccessDenied, HostileName, SourceChanged, SourceNotFound
from syncbit.model import block_count, block_span
from syncbit.sources import open_source
from syncbit.sources.retry import Retrier


MiB = 2**20
BS = MiB  # block size the tests cut files into


def tree() -> dict[str, bytes]:
    rnd = random.Random(7)
    return {
        "weights/model-00001.safetensors": rnd.randbytes(3 * BS + 12345),  # last block partial
        "weights/model-00002.safetensors": rnd.randbytes(2 * BS),  # exact multiple
        "config.json": b'{"hidden_size": 4096}\n',
        "data/train part é.csv": b"a,b\n1,2\n",  # space and non-ASCII
        "a/b/c/d/e/f/deep.txt": b"deep\n",
        "empty.txt": b"",
    }


async def read(src, entry, offset: int, length: int) -> bytes:
    out = bytearray()

    async def sink(chunk: bytes) -> None:
        out.extend(chunk)

    await src.read_range(entry, offset, length, sink)
    return bytes(out)


async def snapshot_of(bed, files):
    uri = bed.make(files)
    src = await open_source(uri, bed.options())
    return uri, src, await src.resolve()


async def test_listing_and_sizes(bed):
    files = tree()
    _, src, snap = await snapshot_of(bed, files)
    assert {f.path: f.size for f in snap.files} == {p: len(d) for p, d in files.items()}
    assert len({f.file_object for f in snap.files if f.size}) == len([d for d in files.values() if d])
    again = await src.resolve()
    assert again.id == snap.id, "listing the same content twice must give the same snapshot"
    await src.aclose()


async def test_exact_bytes_of_random_ranges(bed):
    files = tree()
    _, src, snap = await snapshot_of(bed, files)
    rnd = random.Random(11)
    for entry in snap.files:
        data = files[entry.path]
        for _ in range(4 if len(data) > 1 else 0):
            off = rnd.randrange(len(data))
            length = rnd.randint(1, len(data) - off)
            assert await read(src, entry, off, length) == data[off:off + length], (entry.path, off, length)
        if data:
            assert await read(src, entry, 0, len(data)) == data


async def test_last_partial_block_and_empty_file(bed):
    files = tree()
    _, src, snap = await snapshot_of(bed, files)
    by_path = {f.path: f for f in snap.files}
    entry = by_path["weights/model-00001.safetensors"]
    last = block_count(entry.size, BS) - 1
    off, length = block_span(entry.size, BS, last)
    assert length == 12345
    assert await read(src, entry, off, length) == files[entry.path][off:]
    empty = by_path["empty.txt"]
    assert empty.size == 0
    assert await read(src, empty, 0, 0) == b""


@pytest.mark.parametrize("new", ["same size", "longer", "shorter"])
async def test_change_under_a_pinned_snapshot(bed, new):
    """A changed file is served as pinned or refused, never mixed with the new bytes."""
    files = {"f.bin": random.Random(1).randbytes(2 * BS), "other.txt": b"x" * 2000}
    uri, src, snap = await snapshot_of(bed, files)
    entry = next(f for f in snap.files if f.path == "f.bin")
    first = await read(src, entry, 0, BS)  # half of it before the change
    assert first == files["f.bin"][:BS]
    replacement = {"same size": b"Z" * (2 * BS), "longer": b"Z" * (3 * BS), "shorter": b"Z" * 100}[new]
    bed.change(uri, "f.bin", replacement)
    if bed.on_change == "pinned":
        assert await read(src, entry, BS, BS) == files["f.bin"][BS:]
    else:
        with pytest.raises(SourceChanged):
            await read(src, entry, BS, BS)
    # A new snapshot sees the new content.
    fresh = await (await open_source(uri, bed.options())).resolve()
    new_entry = next(f for f in fresh.files if f.path == "f.bin")
    assert new_entry.size == len(replacement) and new_entry.file_object != entry.file_object


async def test_hostile_names_refused(bed, hostile_kind):
    uri = bed.hostile(hostile_kind)
    src = await open_source(uri, bed.options())
    with pytest.raises(HostileName):
        await src.resolve()


async def test_missing_dataset(bed):
    for uri in bed.missing():
        with pytest.raises(SourceNotFound):
            src = await open_source(uri, bed.options())
            await src.resolve()


def needs(capability: str):
    """Run a test only on the beds with this capability (see conftest.pytest_generate_tests)."""
    def mark(fn):
        fn.needs = capability
        return fn
    return mark


@needs("has_credentials")
async def test_bad_credentials(bed, monkeypatch):
    uri = bed.denied(monkeypatch)
    with pytest.raises(AccessDenied) as info:
        await (await open_source(uri, bed.options())).resolve()
    assert "not-the-secret" not in str(info.value) and "hf_wrong" not in str(info.value)


@needs("has_outages")
async def test_temporary_failures_then_recovery(bed):
    files = {"f.bin": random.Random(2).randbytes(BS + 5)}
    uri = bed.make(files)
    bed.outage(3)
    src = await open_source(uri, bed.options())
    snap = await src.resolve()  # retries inside resolve
    entry = snap.files[0]
    bed.outage(2)
    retrier = Retrier(src.is_temporary, what="test read")
    data = await retrier.run(lambda: read(src, entry, 0, entry.size))
    assert data == files["f.bin"]
    assert retrier.attempts == 3
