"""Unit tests for syncbit.model: hostile names, snapshot/manifest ids, block arithmetic."""

from __future__ import annotations

import pytest

from syncbit.errors import HostileName, SourceError
from syncbit.model import (
    NAME_MAX,
    PATH_MAX,
    FileEntry,
    Manifest,
    Snapshot,
    block_count,
    block_span,
    content_id,
    safe_relpath,
    short_hash,
    snapshot_id,
)

BS = 4 * 2**20


def entry(path: str, size: int = 10, fo: str | None = None, **kw) -> FileEntry:
    return FileEntry(path=path, size=size, locator=f"https://origin/{path}", validator="etag-1",
                     file_object=fo or short_hash(path, str(size)), **kw)


# -- content ids -------------------------------------------------------------


def test_content_id_is_blake3_hex():
    # Known BLAKE3-256 of the empty input (from the BLAKE3 test vectors).
    assert content_id(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert content_id(memoryview(b"abc")) == content_id(b"abc")
    assert content_id(b"abc") != content_id(b"abd")


def test_short_hash_separates_parts():
    # Tries to make two different part lists collide by moving the boundary between them.
    assert short_hash("ab", "c") != short_hash("a", "bc")
    assert short_hash("a") == short_hash("a")
    assert len(short_hash("x")) == 32


# -- safe_relpath ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",               # climbs out of the dataset root
        "a/../../etc/passwd",  # climbs out from a nested directory
        "..",                 # the parent itself
        "/etc/passwd",        # absolute path
        "/",                  # the filesystem root
        "a\0b",               # NUL would truncate the name in C APIs
        "\0",                 # NUL alone
        "",                   # empty name
        "a//b",               # empty component in the middle
        "a/",                 # trailing slash: empty last component (a directory posing as a file)
        "./a",                # '.' component: aliasing of names
        "a/./b",              # '.' component in the middle
        "a/.",                # '.' as the leaf
    ],
)
def test_safe_relpath_refuses_escaping_names(name):
    with pytest.raises(HostileName):
        safe_relpath(name)


def test_safe_relpath_refuses_non_strings():
    # A source handing over bytes or None instead of a str must not slip through.
    for bad in (b"a", None, 42):
        with pytest.raises(HostileName):
            safe_relpath(bad)  # type: ignore[arg-type]


def test_hostile_name_is_a_source_error_and_a_value_error():
    with pytest.raises(ValueError):
        safe_relpath("../x")
    with pytest.raises(SourceError):
        safe_relpath("../x")


def test_safe_relpath_component_length_is_counted_in_bytes():
    # 255 bytes per component is the kernel limit; 256 must be refused.
    assert safe_relpath("a" * NAME_MAX) == "a" * NAME_MAX
    with pytest.raises(HostileName):
        safe_relpath("a" * (NAME_MAX + 1))
    # Tries to pass a 256-byte component made of 128 two-byte characters.
    with pytest.raises(HostileName):
        safe_relpath("dir/" + "é" * 128)
    assert safe_relpath("é" * 127)  # 254 bytes is fine


def test_safe_relpath_refuses_a_single_4096_byte_name():
    # One 4096-byte component: too long both as a component and as a path.
    with pytest.raises(HostileName):
        safe_relpath("a" * PATH_MAX)


def test_safe_relpath_refuses_paths_longer_than_path_max():
    # 17 components of 240 bytes + 16 slashes + 1 = 4097 bytes, each component legal.
    name = "/".join(["a" * 240] * 17) + "b"
    assert len(name.encode()) == PATH_MAX + 1
    with pytest.raises(HostileName):
        safe_relpath(name)


def test_safe_relpath_refuses_a_4096_byte_path():
    # 17 components of 240 bytes joined by 16 slashes: exactly 4096 bytes, every component legal.
    name = "/".join(["a" * 240] * 17)
    assert len(name.encode()) == PATH_MAX
    with pytest.raises(HostileName):
        safe_relpath(name)


@pytest.mark.parametrize(
    "name",
    ["données/日本語 file.bin", "a b/c d", "model-00001-of-00002.safetensors", "🙂/x", "..hidden", "a..b", ".git"],
)
def test_safe_relpath_accepts_unicode_spaces_and_dots_inside_names(name):
    assert safe_relpath(name) == name


# -- snapshots ---------------------------------------------------------------


def snap(files, uri="https://origin/set/", revision="r1", **kw) -> Snapshot:
    return Snapshot(uri=uri, revision=revision, files=tuple(files), **kw)


def test_snapshot_id_is_stable_and_order_independent():
    a, b = entry("a.bin", 1), entry("dir/b.bin", 2)
    s1 = snap([a, b])
    s2 = snap([b, a], created=123.0)
    assert s1.id == s2.id == snapshot_id(s1.uri, s1.revision, [a, b])
    assert len(s1.id) == 64
    assert s1 == snap([a, b])


@pytest.mark.parametrize(
    "change",
    [
        dict(uri="https://origin/other/"),
        dict(revision="r2"),
        dict(files=[entry("a.bin", 2), entry("dir/b.bin", 2)]),           # size differs
        dict(files=[entry("a.bin", 1, fo="other-fo"), entry("dir/b.bin", 2)]),  # content differs
        dict(files=[entry("c.bin", 1), entry("dir/b.bin", 2)]),           # name differs
        dict(files=[entry("a.bin", 1)]),                                  # a file less
    ],
)
def test_snapshot_id_is_sensitive_to_content(change):
    base = dict(uri="https://origin/set/", revision="r1", files=[entry("a.bin", 1), entry("dir/b.bin", 2)])
    assert snap(**{**base, **change}).id != snap(**base).id


def test_snapshot_refuses_duplicate_paths():
    # A source listing the same path twice (two different contents for one name).
    with pytest.raises(HostileName):
        snap([entry("a.bin", 1), entry("a.bin", 2, fo="x")])


@pytest.mark.parametrize("paths", [["a", "a/b"], ["x/a/b/c", "x/a"], ["x/a", "x/a/b", "y"]])
def test_snapshot_refuses_a_name_that_is_a_file_and_a_directory(paths):
    # An index page listing both "a" and "a/" (with "b" inside): the tree
    # cannot hold both, so the listing is refused as the source's lie, with
    # the name in the message, rather than failing later in the mount.
    with pytest.raises(HostileName, match="both as a file and as a directory"):
        snap([entry(p, 1, fo=p) for p in paths])
    snap([entry("a.bin", 1), entry("a/b", 1, fo="y"), entry("ab/c", 1, fo="z")])  # prefixes, not collisions


def test_snapshot_refuses_hostile_paths():
    # A listing smuggling a path out of the root must not produce a snapshot.
    with pytest.raises(HostileName):
        snap([entry("ok.bin"), entry("../../etc/shadow")])


def test_snapshot_json_round_trip():
    s = snap([entry("a.bin", 5, digest="sha256:00"), entry("d/e.bin", 0, mode=0o555, mtime=3.5)], created=7.0)
    back = Snapshot.from_json(s.to_json())
    assert back == s
    assert back.id == s.id
    assert back.files[0].digest == "sha256:00"
    assert back.total_size == 5


def test_snapshot_from_json_checks_paths():
    # A stored snapshot edited to carry a hostile path must be refused on load.
    text = snap([entry("a.bin")]).to_json().replace('"path":"a.bin"', '"path":"../a.bin"')
    with pytest.raises(HostileName):
        Snapshot.from_json(text)


# -- block arithmetic --------------------------------------------------------


@pytest.mark.parametrize(
    "size,count",
    [(0, 0), (1, 1), (BS - 1, 1), (BS, 1), (BS + 1, 2), (3 * BS, 3), (3 * BS + 5, 4)],
)
def test_block_count(size, count):
    assert block_count(size, BS) == count


def test_block_span_edges():
    assert block_span(0, BS, 0) == (0, 0)                        # empty file
    assert block_span(3 * BS, BS, 2) == (2 * BS, BS)             # exact multiple: last block full
    assert block_span(3 * BS + 5, BS, 3) == (3 * BS, 5)          # last partial block
    assert block_span(3 * BS + 5, BS, 0) == (0, BS)
    assert block_span(3 * BS, BS, 3) == (3 * BS, 0)              # past the end: nothing
    assert block_span(10, BS, 5) == (5 * BS, 0)                  # far past the end: never negative


def test_block_spans_tile_the_file():
    for size in (0, 1, 7, 8, 9, 64, 65):
        spans = [block_span(size, 8, i) for i in range(block_count(size, 8))]
        pos = 0
        for off, length in spans:
            assert off == pos and 0 < length <= 8
            pos += length
        assert pos == size


# -- manifests ---------------------------------------------------------------


def manifest_for(files, blocks, bs=8):
    return Manifest(snapshot=snap(files), block_size=bs, blocks=blocks)


def test_manifest_complete_and_id():
    a, b = entry("a", 20, fo="fa"), entry("b", 8, fo="fb")
    m = manifest_for([a, b], {"fa": ("x0", "x1", "x2"), "fb": ("y0",)})
    assert m.complete
    assert m.id is not None and len(m.id) == 64
    assert m.id == manifest_for([b, a], {"fb": ("y0",), "fa": ("x0", "x1", "x2")}).id
    assert m.id != manifest_for([a, b], {"fa": ("x0", "x1", "xX"), "fb": ("y0",)}).id
    assert m.id != Manifest(snapshot=m.snapshot, block_size=16, blocks=m.blocks).id


@pytest.mark.parametrize(
    "blocks",
    [
        {"fa": ("x0", None, "x2"), "fb": ("y0",)},   # one id not learnt yet
        {"fa": ("x0", "x1"), "fb": ("y0",)},         # too few blocks
        {"fa": ("x0", "x1", "x2", "x3"), "fb": ("y0",)},  # too many blocks
        {"fa": ("x0", "x1", "x2")},                  # a file object missing
        {"fa": ("x0", "x1", "x2"), "fb": ("",)},     # empty id
    ],
)
def test_manifest_incomplete_has_no_id(blocks):
    m = manifest_for([entry("a", 20, fo="fa"), entry("b", 8, fo="fb")], blocks)
    assert not m.complete
    assert m.id is None


def test_manifest_with_empty_file_listed():
    m = manifest_for([entry("a", 8, fo="fa"), entry("empty", 0, fo="fe")], {"fa": ("x0",), "fe": ()})
    assert m.complete and m.id


def test_manifest_empty_file_needs_no_block_entry():
    # An empty file has no blocks, so a manifest need not mention its file object.
    m = manifest_for([entry("a", 8, fo="fa"), entry("empty", 0, fo="fe")], {"fa": ("x0",)})
    assert m.complete
    assert m.id is not None
