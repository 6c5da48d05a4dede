"""Pure data: snapshots, file entries, manifests. No I/O here."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import blake3

from .errors import ConfigError, HostileName

NAME_MAX = 255  # bytes per path component, as on ext4/xfs
PATH_MAX = 4096


def content_id(data: bytes | memoryview) -> str:
    """The id of a block: BLAKE3-256 of its bytes, hex."""
    return blake3.blake3(data).hexdigest()


def short_hash(*parts: str) -> str:
    """A 128-bit hex fingerprint of some strings (file-object ids, revisions)."""
    h = blake3.blake3()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest(length=16)


def safe_relpath(name: str) -> str:
    """Check that ``name`` (a source's path for a file) stays inside the dataset root.

    Returns the normalised POSIX relative path; raises HostileName for absolute
    paths, ``..`` or ``.`` components, NUL bytes, empty components and names
    longer than the kernel accepts.
    """
    if not isinstance(name, str) or not name:
        raise HostileName("empty file name from source")
    if "\0" in name:
        raise HostileName(f"file name with a NUL byte from source: {name!r}")
    if name.startswith("/"):
        raise HostileName(f"absolute file name from source: {name!r}")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise HostileName(f"file name escaping the dataset root from source: {name!r}")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise HostileName(f"file name component longer than {NAME_MAX} bytes from source: {part[:40]!r}...")
    if len(name.encode("utf-8", "surrogateescape")) >= PATH_MAX:  # PATH_MAX counts the NUL
        raise HostileName(f"path longer than {PATH_MAX} bytes from source: {name[:40]!r}...")
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot.

    ``locator`` tells the source where the bytes are (a URL, an absolute path);
    ``validator`` is what the source pinned (ETag, Last-Modified, mtime) and
    must still see when it serves bytes; ``file_object`` identifies the content
    so that snapshots sharing a file share its blocks.
    """

    path: str
    size: int
    locator: str
    validator: str
    file_object: str
    mode: int = 0o444
    mtime: float = 0.0
    digest: str | None = None  # a whole-file digest from the source, "sha256:<hex>"


@dataclass(frozen=True)
class Snapshot:
    """One immutable, resolved version of a source."""

    uri: str
    revision: str
    files: tuple[FileEntry, ...]
    created: float = 0.0
    id: str = field(default="", compare=False)
    # The per-dataset source options it was listed with ((key, value) pairs,
    # sorted): an S3 endpoint is part of where the bytes come from.
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise HostileName(f"source listed the same file twice in {self.uri}")
        for p in paths:
            safe_relpath(p)
        dirs = {p[:i] for p in paths for i, c in enumerate(p) if c == "/"}
        both = sorted(dirs.intersection(paths))
        if both:
            raise HostileName(f"source lists {both[0]!r} both as a file and as a directory in {self.uri}")
        if not self.id:
            object.__setattr__(self, "id", snapshot_id(self.uri, self.revision, self.files, self.options))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {"uri": self.uri, "revision": self.revision, "created": self.created, "id": self.id,
             "options": [list(kv) for kv in self.options], "files": [asdict(f) for f in self.files]},
            sort_keys=True, separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        d = json.loads(text)
        files = tuple(FileEntry(**f) for f in d["files"])
        options = tuple((str(k), str(v)) for k, v in d.get("options", ()))
        return cls(uri=d["uri"], revision=d["revision"], files=files, created=d.get("created", 0.0), id=d["id"],
                   options=options)


def snapshot_id(uri: str, revision: str, files: Iterable[FileEntry], options: tuple = ()) -> str:
    canon = {"uri": uri, "revision": revision, "files": sorted(([f.path, f.size, f.file_object] for f in files))}
    if options:  # absent when empty: ids of snapshots made before options existed stay the same
        canon["options"] = [list(kv) for kv in options]
    return content_id(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_span(size: int, block_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of block ``index`` of a file of ``size`` bytes."""
    start = index * block_size
    return start, max(0, min(block_size, size - start))


@dataclass(frozen=True)
class Manifest:
    """A snapshot plus the block ids known so far for each of its file objects.

    Ids are learnt progressively (DESIGN §3); ``None`` marks a block not yet
    hashed. Once complete its id is the hash of its canonical JSON.
    """

    snapshot: Snapshot
    block_size: int
    blocks: Mapping[str, tuple[str | None, ...]]

    @property
    def complete(self) -> bool:
        return all(
            len(self.blocks.get(f.file_object, ())) == block_count(f.size, self.block_size)
            and all(self.blocks.get(f.file_object, ()))
            for f in self.snapshot.files
        )

    @property
    def id(self) -> str | None:
        if not self.complete:
            return None
        canon = json.dumps(
            {"snapshot": self.snapshot.id, "block_size": self.block_size,
             "blocks": {k: list(v) for k, v in sorted(self.blocks.items())}},
            sort_keys=True, separators=(",", ":"),
        )
        return content_id(canon.encode())


# Block bitmaps (which blocks of a snapshot a node holds) on the wire:
# zlib-compressed, base64 in JSON.

def encode_bitmap(bits: bytes | bytearray) -> str:
    return base64.b64encode(zlib.compress(bytes(bits), 6)).decode()


def decode_bitmap(text: str, max_bytes: int = 1 << 24) -> bytes:
    try:
        d = zlib.decompressobj()
        raw = d.decompress(base64.b64decode(text, validate=True), max_bytes)
        if d.unconsumed_tail:
            raise ConfigError("bitmap too large")
        return raw
    except (ValueError, TypeError, zlib.error) as e:
        raise ConfigError(f"malformed bitmap: {e}") from None
