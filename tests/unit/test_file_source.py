"""The file source against real files changed behind its back (no mount needed)."""

from __future__ import annotations

import os

import pytest
import trio

from syncbit.errors import MalformedURI, SourceChanged, SourceError, SourceNotFound
from syncbit.sources.file import FileSource

MiB = 2**20


async def snapshot(path):
    src = FileSource(str(path))
    return src, await src.resolve()


async def test_a_file_changed_in_place_during_a_read_is_never_handed_on(tmp_path):
    # A writer rewrites the rest of the file while a long range is being
    # read: the pieces read after the write must not reach the sink (they
    # used to, and were stored; only the end of the range was checked).
    path = tmp_path / "big.bin"
    old = os.urandom(4 * MiB)
    path.write_bytes(old)
    src, snap = await snapshot(path)
    (entry,) = snap.files
    got = []

    async def sink(chunk: bytes) -> None:
        got.append(chunk)
        if len(got) == 1:
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"\xff" * MiB, 2 * MiB)
            os.close(fd)
            st = os.stat(path)  # a timestamp tick later, whatever the filesystem's granularity
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**6))

    with pytest.raises(SourceChanged, match="changed since the snapshot"):
        await src.read_range(entry, 0, entry.size, sink)
    assert b"".join(got) == old[:len(b"".join(got))] and len(got) == 1


async def test_a_file_replaced_with_the_same_size_and_mtime_is_detected(tmp_path):
    # `cp -p` / `rsync -a` of new content, renamed over the old name.
    path = tmp_path / "model.bin"
    path.write_bytes(b"A" * 1000)
    src, snap = await snapshot(path)
    (entry,) = snap.files
    new = tmp_path / "model.bin.new"
    new.write_bytes(b"B" * 1000)
    st = os.stat(path)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(new, path)

    async def sink(chunk: bytes) -> None:
        raise AssertionError(f"bytes of another file handed on: {chunk[:4]!r}")

    with pytest.raises(SourceChanged, match="replaced by another file"):
        await src.read_range(entry, 0, 1000, sink)


async def test_a_file_that_became_a_fifo_is_refused_not_waited_on(tmp_path):
    # A thread blocked opening a FIFO cannot be cancelled: reads hung past
    # the fetch deadline and the agent could not stop.
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100)
    src, snap = await snapshot(path)
    (entry,) = snap.files
    path.unlink()
    os.mkfifo(path)

    async def sink(chunk: bytes) -> None:
        raise AssertionError("no bytes expected")

    with trio.fail_after(5):
        with pytest.raises(SourceChanged, match="no longer a regular file"):
            await src.read_range(entry, 0, 100, sink)


async def test_a_tree_a_thousand_levels_deep_is_listed(tmp_path):
    # os.walk recurses in Python 3.11: RecursionError, an HTTP 500 from the agent.
    deep = tmp_path / "set"
    parts = ["d"] * 1100
    leaf = deep
    for part in parts:  # Path.mkdir(parents=True) and os.makedirs recurse as well
        leaf = leaf / part
        leaf.mkdir(parents=not leaf.parent.exists())
    try:
        (leaf / "f.txt").write_bytes(b"bottom")
        (deep / "top.txt").write_bytes(b"top")
        _, snap = await snapshot(deep)
        assert sorted(f.path for f in snap.files) == sorted(["/".join(parts) + "/f.txt", "top.txt"])
    finally:  # pytest's own clean-up of tmp_path recurses too
        (leaf / "f.txt").unlink(missing_ok=True)
        d = leaf
        while d != deep:
            d.rmdir()
            d = d.parent


async def test_listing_order_is_depth_first_in_name_order(tmp_path):
    # The snapshot's revision hashes the files in listing order: keep os.walk's order.
    for rel in ["b/x", "a/z/y", "a/b", "c", "a/a/q"]:
        (tmp_path / "set" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "set" / rel).write_bytes(b".")
    _, snap = await snapshot(tmp_path / "set")
    assert [f.path for f in snap.files] == ["c", "a/b", "a/a/q", "a/z/y", "b/x"]


@pytest.mark.parametrize("kind", ["file-in-path", "symlink-loop"])
async def test_bad_paths_are_source_errors_not_crashes(tmp_path, kind):
    (tmp_path / "a.txt").write_bytes(b"x")
    if kind == "file-in-path":
        uri, err = str(tmp_path / "a.txt" / "sub"), SourceNotFound  # ENOTDIR
    else:
        os.symlink(tmp_path / "loop", tmp_path / "loop")
        uri, err = str(tmp_path / "loop"), SourceError  # ELOOP
    with pytest.raises(err):
        await FileSource(uri).resolve()


def test_a_file_uri_without_a_path_is_malformed():
    # It used to list the agent's working directory.
    with pytest.raises(MalformedURI):
        FileSource("file://")
