"""``http(s)://``: one file, or a directory shown by an index page.

Index pages of the kind nginx ``autoindex``, Apache ``mod_autoindex`` and
``python -m http.server`` produce are parsed for links. The parent-directory
and column-sorting links are skipped; a link that leaves the dataset root
(another host, ``../../x``, ``/etc/passwd``, encoded ``..``) is hostile and
refuses the whole listing: a listing that lies once cannot be trusted.

Each file is pinned by its ETag, else Last-Modified, and its size. Every
response is checked against them. Ranges are requested; an origin that answers
200 instead is read from the start and the unwanted prefix skipped.

Requests are made with urllib3 in worker threads, not with httpx on trio:
measured on loopback, httpx on trio streams a body at ~230 MB/s with the trio
thread busy, urllib3 in a thread at 3-4 GB/s with the GIL released in recv.
Bodies reach the fetcher in 4 MiB chunks (the default block size), so a
block usually arrives as one ``bytes`` without being copied again; over
plain HTTP, when the fetcher offers a ``Spool``, they are not read at all but
spliced from the socket into block files (``splice.py``).
"""

from __future__ import annotations

import http.client
import logging
import socket
import time
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit

import trio
import urllib3

from ..errors import (
    AccessDenied,
    HostileName,
    MalformedURI,
    SourceChanged,
    SourceError,
    SourceNotFound,
    TemporarySourceError,
    collapse_groups,
)
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source, Spool, chunk_size, spool_of
from .retry import retry_within
from .splice import splice_into

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 16 * 2**20
MAX_DEPTH = 64
_HEAD_CONCURRENCY = 16
_RESOLVE_DEADLINE = 30.0
_CHUNK = 4 * 2**20
# Socket-level limits for the blocking client; the fetch deadline is the
# caller's cancel scope, these only stop a thread waiting on a dead peer forever.
_TIMEOUT = urllib3.Timeout(connect=10.0, read=30.0)
# Redirects are followed; every other failure comes back to our own retries.
_RETRIES = urllib3.Retry(total=10, connect=0, read=0, status=0, other=0, redirect=10, raise_on_status=False)
_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "syncbit"}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for k, v in attrs:
                if k == "href" and v is not None:
                    self.hrefs.append(v)


def _segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def index_link(root, page: str, href: str) -> tuple[str, bool] | None:
    """Judge one link of an index page.

    Returns (path relative to the dataset root, is a directory) for a direct
    child of ``page``; None for links to skip (parent, self, column sorting);
    raises HostileName for anything else: index pages list their children,
    so a link elsewhere (``../../x``, ``/etc/passwd``, another host, an
    encoded ``/`` or ``..`` in a name) is a listing not to be trusted.
    """
    href = href.split("#", 1)[0]
    if not href or href.startswith("?"):
        return None  # fragments, Apache's column-sorting links
    parts = urlsplit(href)
    if parts.scheme or parts.netloc:
        if (parts.scheme, parts.netloc) != (root.scheme, root.netloc):
            raise HostileName(f"index page {page} links outside the origin: {href!r}")
    if parts.query:
        return None
    if parts.path in ("..", "../"):
        return None  # "Parent Directory": nginx writes it on the origin's root page too
    # Segments are compared unquoted: servers escape differently (Apache
    # leaves "(" and ":" alone and writes lowercase hex; page URLs here come
    # from quote()). Only a literal ".." navigates; an encoded one is a name
    # and refused below.
    page_segs = [unquote(s) for s in _segments(urlsplit(page).path)]
    stack = [] if parts.path.startswith("/") else list(page_segs)
    for seg in parts.path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not stack:
                raise HostileName(f"index page {page} links outside the dataset root (above the origin's root): {href!r}")
            stack.pop()
        else:
            stack.append(unquote(seg))
    if stack == page_segs or stack == page_segs[:-1]:
        return None  # self and "Parent Directory"
    if stack[:-1] != page_segs:
        raise HostileName(f"index page {page} links outside its directory (escaping the dataset root?): {href!r}")
    name = stack[-1]
    if "/" in name or name in (".", ".."):
        raise HostileName(f"index page {page} has a link escaping the dataset root: {href!r}")
    rel_dir = "/".join(page_segs[len(_segments(root.path)):])
    rel = f"{rel_dir}/{name}" if rel_dir else name
    safe_relpath(rel)
    return rel, parts.path.endswith("/")


def urlsplit_checked(uri: str):
    """``urlsplit`` for a source URL, with its host and port checked (MalformedURI otherwise)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise MalformedURI(f"malformed URL {uri!r}: {e}") from None
    if not parts.netloc or not parts.hostname:
        raise MalformedURI(f"malformed URL {uri!r}: no host")
    return parts


def _status_error(status: int, url: str) -> Exception:
    if status == 404 or status == 410:
        return SourceNotFound(f"not found at the source: {url} (HTTP {status})")
    if status in (401, 403):
        return AccessDenied(f"access denied by the source: {url} (HTTP {status})")
    if status >= 500 or status in (408, 429):
        return TemporarySourceError(f"source answered HTTP {status} for {url}")
    return SourceError(f"source answered HTTP {status} for {url}")


async def in_thread(uri: str, limiter: trio.CapacityLimiter, fn, *args):
    """Run a blocking urllib3 request in a worker thread, its errors translated once, here."""
    try:
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
    except urllib3.exceptions.LocationValueError as e:  # a URL no retry can fix
        raise SourceError(f"{uri}: {type(e).__name__}: {e}") from e
    except urllib3.exceptions.HTTPError as e:
        raise TemporarySourceError(f"{uri}: {type(e).__name__}: {e}") from e


def _validator(headers) -> str:
    etag = headers.get("etag")
    if etag:
        return f"etag={etag}"
    lm = headers.get("last-modified")
    if lm:
        return f"last-modified={lm}"
    return "none"


class HttpSource(Source):
    schemes = ("http", "https")

    def __init__(self, uri: str, options=None) -> None:
        super().__init__(uri, options)
        parts = urlsplit_checked(uri)
        if parts.username is not None or parts.password is not None:
            # Neither sent nor kept: they would reach error messages and logs.
            shown = parts._replace(netloc=f"***@{parts.netloc.rsplit('@', 1)[1]}").geturl()
            raise MalformedURI(f"URL {shown}: credentials in the URL are not supported")
        if parts.query or parts.fragment:
            raise MalformedURI(f"URL {uri!r}: query strings and fragments are not supported in a source URI")
        self.pool = urllib3.PoolManager(num_pools=8, maxsize=32, headers=_HEADERS, timeout=_TIMEOUT,
                                        retries=_RETRIES)
        self.limiter = trio.CapacityLimiter(32)  # threads with a request of this source in flight
        self._ranges_ignored: set[str] = set()

    async def aclose(self) -> None:
        self.pool.clear()

    def prefers_whole_file(self, entry: FileEntry) -> bool:
        """True once the origin answered 200 to a Range request for this file."""
        return entry.locator in self._ranges_ignored

    async def _in_thread(self, fn, *args):
        return await in_thread(self.uri, self.limiter, fn, *args)

    # -- listing ---------------------------------------------------------

    async def resolve(self) -> Snapshot:
        return await retry_within(_RESOLVE_DEADLINE, self.is_temporary, self._resolve_once, what=f"listing {self.uri}")

    async def _resolve_once(self) -> Snapshot:
        if self.uri.endswith("/") or not urlsplit(self.uri).path:
            # A server's root is a directory (its index page), with or without the slash.
            root = self.uri if self.uri.endswith("/") else self.uri + "/"
            urls = await self._walk_index(root)
        else:
            head = await self._head(self.uri)
            # After redirects urllib3 may give only the path: resolve it against the request.
            final = urljoin(self.uri, head.geturl() or self.uri)
            if final.endswith("/") and head.headers.get("content-type", "").startswith("text/html"):
                # /dir redirected to /dir/: a directory after all.
                urls = await self._walk_index(final)
                root = final
            else:
                name = unquote(urlsplit(self.uri).path.rsplit("/", 1)[-1])
                safe_relpath(name)
                urls = {name: self.uri}
                root = None
        files = await self._stat_all(urls, root)
        revision = short_hash(*(f"{f.path}\0{f.size}\0{f.validator}" for f in files))
        return Snapshot(uri=self.uri, revision=revision, files=tuple(files), created=time.time())

    async def _head(self, url: str) -> urllib3.BaseHTTPResponse:
        return await self._in_thread(self._head_sync, url)

    def _head_sync(self, url: str) -> urllib3.BaseHTTPResponse:
        r = self.pool.request("HEAD", url)
        if r.status == 405:  # HEAD not allowed: a one-byte GET tells the same
            r = self.pool.request("GET", url, headers={**_HEADERS, "Range": "bytes=0-0"}, preload_content=False)
            r.close()  # only the headers matter; do not read a body an origin might send whole
        if r.status >= 400:
            raise _status_error(r.status, url)
        return r

    async def _walk_index(self, root: str) -> dict[str, str]:
        """Map relative path -> URL for every file under the index page ``root``."""
        root_parts = urlsplit(root)
        found: dict[str, str] = {}
        pending = [(root, 0)]
        seen = {root}
        while pending:
            page, depth = pending.pop()
            if depth > MAX_DEPTH:
                raise SourceError(f"index pages under {root} nest deeper than {MAX_DEPTH} levels")
            parser = _Links()
            parser.feed(await self._get_index(page))
            for href in parser.hrefs:
                link = index_link(root_parts, page, href)
                if link is None:
                    continue
                rel, is_dir = link
                target = urljoin(root, quote(rel) + ("/" if is_dir else ""))
                if is_dir:
                    if target not in seen:
                        seen.add(target)
                        pending.append((target, depth + 1))
                else:
                    found[rel] = target
        return found

    async def _get_index(self, url: str) -> str:
        return await self._in_thread(self._get_index_sync, url)

    def _get_index_sync(self, url: str) -> str:
        r = self.pool.request("GET", url, preload_content=False)
        try:
            if r.status >= 400:
                raise _status_error(r.status, url)
            body = bytearray()
            for chunk in r.stream(1 << 16):
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise SourceError(f"index page {url} is larger than {MAX_INDEX_BYTES} bytes")
        finally:
            r.release_conn()
        charset = "utf-8"
        ctype = r.headers.get("content-type", "")
        if "charset=" in ctype:
            charset = ctype.split("charset=", 1)[1].split(";")[0].strip() or "utf-8"
        try:
            return body.decode(charset, errors="replace")
        except LookupError:
            return body.decode("utf-8", errors="replace")

    async def _stat_all(self, urls: dict[str, str], root: str | None) -> list[FileEntry]:
        entries: dict[str, FileEntry] = {}
        limiter = trio.CapacityLimiter(_HEAD_CONCURRENCY)

        async def stat_one(rel: str, url: str) -> None:
            async with limiter:
                r = await self._head(url)
            size = _size_of(r)
            if size is None:
                raise SourceError(f"{url}: the origin does not tell the size (no Content-Length)")
            validator = _validator(r.headers)
            if validator == "none":
                log.warning("%s has neither ETag nor Last-Modified: changes can only be detected by size", url)
            entries[rel] = FileEntry(
                path=rel, size=size, locator=url, validator=validator,
                file_object=short_hash("http", url, validator, str(size)),
                mtime=_mtime(r.headers),
            )

        with collapse_groups():
            async with trio.open_nursery() as nursery:
                for rel, url in urls.items():
                    nursery.start_soon(stat_one, rel, url)
        return [entries[k] for k in sorted(entries)]

    # -- bytes -----------------------------------------------------------

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        if length > 0:
            await self._in_thread(self._read_range_sync, entry, offset, length, sink)

    def _read_range_sync(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        # Runs in a worker thread; chunks go back to the trio thread's sink.
        if not stream_range(self.pool, entry.locator, _HEADERS, offset, length, sink,
                            check=lambda r: self._check(r, entry)):
            self._ranges_ignored.add(entry.locator)

    @staticmethod
    def _check(r, entry: FileEntry) -> None:
        now = _validator(r.headers)
        size = _size_of(r)
        if (now != entry.validator and entry.validator != "none") or (size is not None and size != entry.size):
            raise SourceChanged(
                f"{entry.locator} changed since the snapshot was pinned "
                f"({entry.validator}, {entry.size} bytes -> {now}, {size} bytes)"
            )


def stream_range(pool: urllib3.PoolManager, url: str, headers: dict, offset: int, length: int, sink: Sink,
                 *, check) -> bool:
    """GET ``length`` bytes of ``url`` from ``offset`` into ``sink`` (in a worker thread).

    ``check(response)`` vets the response before any byte is delivered (a
    changed validator or size raises SourceChanged). Returns False when the
    origin ignored the Range header and the prefix had to be read and skipped.
    """
    r = pool.request("GET", url, headers=range_headers(headers, offset, length), preload_content=False,
                     decode_content=False)
    return deliver_range(r, url, offset, length, sink, check=check)


def range_headers(headers: dict, offset: int, length: int) -> dict:
    return {**headers, "Range": f"bytes={offset}-{offset + length - 1}"}


def deliver_range(r, url: str, offset: int, length: int, sink: Sink, *, check) -> bool:
    """Read the answer ``r`` to a range request into ``sink``; see ``stream_range``.

    Under a pinned snapshot 404 and 412/416 mean the file changed or went away.
    """
    try:
        if r.status >= 400:
            if r.status == 404:
                raise SourceChanged(f"{url} disappeared from the source since the snapshot")
            if r.status in (412, 416):  # a range past the end: the file shrank
                raise SourceChanged(f"{url} changed since the snapshot was pinned (HTTP {r.status})")
            raise _status_error(r.status, url)
        check(r)
        if r.status == 206:
            skip = offset - _range_start(r)
            if skip < 0:  # nothing to skip to: the bytes asked for are not in this answer
                raise SourceError(f"{url}: asked for bytes from {offset}, the origin answered a range "
                                  f"starting at {offset - skip} ({r.headers.get('content-range')!r})")
        elif r.status == 200:
            skip = offset  # Range ignored: read from the start
        else:
            raise SourceError(f"unexpected HTTP {r.status} for {url}")
        remaining = length
        piece = chunk_size(sink, _CHUNK)
        while skip:
            chunk = r.read(min(skip, _CHUNK))
            if not chunk:
                break
            skip -= len(chunk)
        spool = spool_of(sink)
        if spool is not None and _splice_body(r, url, length, spool):
            return r.status == 206
        while remaining:
            chunk = r.read(min(remaining, piece))
            if not chunk:
                raise TemporarySourceError(f"{url}: body ended {remaining} bytes short of the requested range")
            trio.from_thread.run(sink, chunk)
            remaining -= len(chunk)
        return r.status == 206
    finally:
        if r.length_remaining:
            r.close()  # a body we stopped reading (errors, a 200 longer than wanted): drop the connection
        r.release_conn()


def _splice_body(r, url: str, length: int, spool: Spool) -> bool:
    """Splice the next ``length`` bytes of ``r`` into spooled blocks, if its body comes off a plain socket.

    False (nothing read) for TLS, chunked bodies, or a response whose bytes
    urllib3 has started to decode; the caller then reads it as usual.
    urllib3 keeps the http.client response in ``_fp``: its buffered file
    may already hold the first body bytes, read along with the headers.
    """
    hr = getattr(r, "_fp", None)
    if not isinstance(hr, http.client.HTTPResponse) or hr.chunked or hr.length is None or hr.length < length:
        return False
    sock = getattr(getattr(hr.fp, "raw", None), "_sock", None)
    if type(sock) is not socket.socket or r.length_remaining != hr.length:
        return False  # TLS (an SSLSocket), or urllib3 holds bytes of its own
    try:
        head = hr.fp.peek(1)[:length]  # one read from the socket only if nothing is buffered
        hr.fp.read(len(head))
    except OSError as e:
        raise TemporarySourceError(f"{url}: {e}") from e
    splice_into(sock, head, length, spool, url)
    # Count the bytes as read, so that a finished response gives its
    # connection back to the pool (``deliver_range`` closes it otherwise).
    r.length_remaining -= length
    return True


def _size_of(r) -> int | None:
    cr = r.headers.get("content-range")
    if r.status == 206 and cr and "/" in cr:
        total = cr.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    cl = r.headers.get("content-length")
    return int(cl) if cl and cl.isdigit() else None


def _range_start(r) -> int:
    cr = r.headers.get("content-range", "")
    try:
        return int(cr.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise SourceError(f"malformed Content-Range {cr!r} from {r.geturl()}") from None


def _mtime(headers) -> float:
    from email.utils import parsedate_to_datetime

    lm = headers.get("last-modified")
    try:
        return parsedate_to_datetime(lm).timestamp() if lm else 0.0
    except (TypeError, ValueError):
        return 0.0
