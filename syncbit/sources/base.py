"""The ``Source`` contract and the registry of sources by URI scheme.

A source lists a snapshot (``resolve``) and reads byte ranges of the files it
listed (``read_range``). It knows nothing about caches; retries live in
``retry.py`` and ask the source whether an error is temporary.
"""

from __future__ import annotations

import importlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import trio

from ..errors import ConfigError, MalformedURI, UnknownScheme
from ..model import FileEntry, Snapshot

if TYPE_CHECKING:
    from ..cache.store import SpooledBlock

log = logging.getLogger(__name__)

# Receives the bytes of a range in order, in chunks of any size (see also ``Spool``).
Sink = Callable[[bytes], Awaitable[None]]


def chunk_size(sink: Sink, default: int) -> int:
    """How much a source should read before handing it to ``sink``.

    A sink may ask for smaller pieces with a ``chunk_size`` attribute (the
    fetcher does, with peers: peers read each block while it arrives).
    """
    return getattr(sink, "chunk_size", default)


@dataclass(frozen=True)
class Spool:
    """A sink's offer to take whole blocks as files that the source fills itself.

    A source that can move bytes into a file without copying them through
    user space (``os.splice`` from a plain socket, see ``splice.py``) asks
    ``new()`` for a temp file per block, from its worker thread, writes
    ``size`` bytes into it (the last block of a range may be shorter), sets
    its ``size`` and passes it to ``deliver`` on the trio thread, which takes
    it over. A source that cannot do this ignores the offer and calls the sink with bytes.
    """

    size: int
    new: Callable[[], SpooledBlock]
    deliver: Callable[[SpooledBlock], Awaitable[None]]


def spool_of(sink: Sink) -> Spool | None:
    return getattr(sink, "spool", None)


# scheme -> (module, class, install hint). Imported lazily so that a missing
# optional dependency only matters to users of that scheme, and in a worker
# thread (``_import``) so that importing one does not stall the mount.
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "file": ("syncbit.sources.file", "FileSource", None),
    "http": ("syncbit.sources.http", "HttpSource", None),
    "https": ("syncbit.sources.http", "HttpSource", None),
    "s3": ("syncbit.sources.s3", "S3Source", "boto3"),
    "hf": ("syncbit.sources.hf", "HfSource", "huggingface_hub"),
    "oci": ("syncbit.sources.oci", "OciSource", None),
}

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class Source(ABC):
    schemes: ClassVar[tuple[str, ...]] = ()
    # Per-dataset settings this source accepts (``endpoint_url`` for S3...).
    option_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, uri: str, options: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self.options = dict(options or {})
        unknown = set(self.options) - self.option_keys
        if unknown:
            takes = ", ".join(sorted(self.option_keys)) or "no options"
            raise ConfigError(f"{uri}: unknown source option(s) {', '.join(sorted(unknown))} (this source takes {takes})")

    @classmethod
    async def create(cls, uri: str, options: Mapping[str, str] | None = None) -> Source:
        """Async factory: check the URI and open what the source needs."""
        return cls(uri, options)

    @abstractmethod
    async def resolve(self) -> Snapshot:
        """List the source now and pin what was listed."""

    @abstractmethod
    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        """Deliver exactly ``length`` bytes of ``entry`` from ``offset`` to ``sink``.

        Raises SourceChanged if the file no longer matches ``entry.validator``,
        and an error for which ``is_temporary`` is true for failures worth a
        retry. Bytes already given to ``sink`` stay valid when it fails.
        """

    def prefers_whole_file(self, entry: FileEntry) -> bool:
        """True when every request restarts at byte 0 (an origin that ignores Range)."""
        return False

    def is_temporary(self, error: BaseException) -> bool:
        from ..errors import TemporarySourceError

        return isinstance(error, TemporarySourceError)

    async def aclose(self) -> None:
        pass


def known_schemes() -> list[str]:
    return sorted(_REGISTRY)


def scheme_of(uri: str) -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise MalformedURI("empty source URI")
    if uri.startswith("/") or uri.startswith("."):
        return "file"
    m = _SCHEME.match(uri)
    if not m:
        raise MalformedURI(
            f"malformed source URI {uri!r}: expected SCHEME://... or an absolute path "
            f"(known schemes: {', '.join(known_schemes())})"
        )
    return m.group(1).lower()


def source_key(uri: str, options: Mapping[str, str] | tuple = ()) -> str:
    """One string per (URI, options): sources are shared by datasets with the same key."""
    items = sorted(dict(options).items())
    return uri if not items else uri + "\0" + "\0".join(f"{k}={v}" for k, v in items)


async def open_source(uri: str, options: Mapping[str, str] | None = None) -> Source:
    scheme = scheme_of(uri)
    try:
        module_name, class_name, hint = _REGISTRY[scheme]
    except KeyError:
        raise UnknownScheme(
            f"unknown source scheme {scheme!r} in {uri!r}; known schemes: {', '.join(known_schemes())}"
        ) from None
    try:
        module = await _import(module_name)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise UnknownScheme(f"source scheme {scheme!r} needs {hint or e.name}: {e}") from None
    cls: type[Source] = getattr(module, class_name)
    return await cls.create(uri, options)


async def preload_sources() -> None:
    """Import the HTTP source now (the agent does at start, in the background).

    Nearly every dataset is read over HTTP (http, https, hf, oci); its first
    import (urllib3) took 65 ms from a cold page cache on the development VM,
    which the first pull of an agent's life would otherwise wait for. A
    failed import is only logged here: the agent runs on, and datasets of
    that scheme get the error when they open their source.
    """
    module_name = _REGISTRY["http"][0]
    try:
        await _import(module_name)
    except Exception as e:  # a broken installation: not a reason to stop the agent
        log.warning("cannot import %s: %s: %s", module_name, type(e).__name__, e)


_imported: set[str] = set()


async def _import(module_name: str):
    """``importlib.import_module``, in a worker thread the first time.

    An import runs Python and reads files for tens of milliseconds (hundreds
    for a large dependency from a cold disk); on the trio thread it would
    stop every read of the mount meanwhile. Two first imports at once are
    safe: the import system serializes them per module.
    """
    if module_name in _imported:
        return importlib.import_module(module_name)
    module = await trio.to_thread.run_sync(importlib.import_module, module_name)
    _imported.add(module_name)
    return module
