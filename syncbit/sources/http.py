"""``http(s)://``: one file, or a directory shown by an index page.

Index pages of the kind nginx ``autoindex``, Apache ``mod_autoindex`` and
``python -m http.server`` produce are parsed for links. The parent-directory
and column-sorting links are skipped; a link that leaves the dataset root
(another host, ``../../x``, ``/etc/passwd``, encoded ``..``) is hostile and
refuses the whole listing: a listing that lies once cannot be trusted.

Each file is pinned by its ETag, else Last-Modified, and its size. Every
response is checked against them. Ranges are requested; an origin that answers
200 instead is read from the start and the unwanted prefix skipped.
"""

from __future__ import annotations

import logging
import time
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
import trio

from ..errors import (
    AccessDenied, HostileName, MalformedURI, SourceChanged, SourceError, SourceNotFound, TemporarySourceError,
    collapse_groups,
)
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source
from .retry import Retrier

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 16 * 2**20
MAX_DEPTH = 64
_HEAD_CONCURRENCY = 16
_RESOLVE_DEADLINE = 30.0


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
    page_segs = _segments(urlsplit(page).path)
    stack = [] if parts.path.startswith("/") else list(page_segs)
    for seg in parts.path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not stack:
                raise HostileName(f"index page {page} links outside the dataset root (above the origin's root): {href!r}")
            stack.pop()
        else:
            stack.append(seg)
    if stack == page_segs or stack == page_segs[:-1]:
        return None  # self and "Parent Directory"
    if stack[:-1] != page_segs:
        raise HostileName(f"index page {page} links outside its directory (escaping the dataset root?): {href!r}")
    name = unquote(stack[-1])
    if "/" in name or name in (".", ".."):
        raise HostileName(f"index page {page} has a link escaping the dataset root: {href!r}")
    rel_dir = "/".join(unquote(s) for s in page_segs[len(_segments(root.path)):])
    rel = f"{rel_dir}/{name}" if rel_dir else name
    safe_relpath(rel)
    return rel, parts.path.endswith("/")


def _status_error(status: int, url: str) -> Exception:
    if status == 404 or status == 410:
        return SourceNotFound(f"not found at the source: {url} (HTTP {status})")
    if status in (401, 403):
        return AccessDenied(f"access denied by the source: {url} (HTTP {status})")
    if status >= 500 or status in (408, 429):
        return TemporarySourceError(f"source answered HTTP {status} for {url}")
    return SourceError(f"source answered HTTP {status} for {url}")


def _validator(headers: httpx.Headers) -> str:
    etag = headers.get("etag")
    if etag:
        return f"etag={etag}"
    lm = headers.get("last-modified")
    if lm:
        return f"last-modified={lm}"
    return "none"


class HttpSource(Source):
    schemes = ("http", "https")

    def __init__(self, uri: str, client: httpx.AsyncClient) -> None:
        super().__init__(uri)
        self.client = client
        parts = urlsplit(uri)
        if not parts.netloc or not parts.hostname:
            raise MalformedURI(f"malformed URL {uri!r}: no host")
        if parts.query or parts.fragment:
            raise MalformedURI(f"URL {uri!r}: query strings and fragments are not supported in a source URI")

    @classmethod
    async def create(cls, uri: str) -> HttpSource:
        client = httpx.AsyncClient(
            follow_redirects=True,
            timeout=httpx.Timeout(30.0, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            headers={"Accept-Encoding": "identity", "User-Agent": "syncbit"},
        )
        try:
            return cls(uri, client)
        except BaseException:
            await client.aclose()
            raise

    async def aclose(self) -> None:
        await self.client.aclose()

    def is_temporary(self, error: BaseException) -> bool:
        return isinstance(error, (TemporarySourceError, httpx.TransportError))

    # -- listing ---------------------------------------------------------

    async def resolve(self) -> Snapshot:
        retrier = Retrier(self.is_temporary, what=f"listing {self.uri}")
        with trio.move_on_after(_RESOLVE_DEADLINE) as scope:
            return await retrier.run(self._resolve_once)
        assert scope.cancelled_caught
        raise SourceError(f"cannot list {self.uri}: {retrier.last_error}")

    async def _resolve_once(self) -> Snapshot:
        try:
            if self.uri.endswith("/"):
                urls = await self._walk_index(self.uri)
                root = self.uri
            else:
                head = await self._head(self.uri)
                final = str(head.url)
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
        except httpx.TransportError as e:
            raise TemporarySourceError(f"cannot reach {self.uri}: {e!r}") from e
        revision = short_hash(*(f"{f.path}\0{f.size}\0{f.validator}" for f in files))
        return Snapshot(uri=self.uri, revision=revision, files=tuple(files), created=time.time())

    async def _head(self, url: str) -> httpx.Response:
        r = await self.client.head(url)
        if r.status_code == 405:  # HEAD not allowed: a one-byte GET tells the same
            r = await self.client.get(url, headers={"Range": "bytes=0-0"})
        if r.status_code >= 400:
            raise _status_error(r.status_code, url)
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
        async with self.client.stream("GET", url) as r:
            if r.status_code >= 400:
                raise _status_error(r.status_code, url)
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise SourceError(f"index page {url} is larger than {MAX_INDEX_BYTES} bytes")
            return body.decode(r.encoding or "utf-8", errors="replace")

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
        if length <= 0:
            return
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            async with self.client.stream("GET", entry.locator, headers=headers) as r:
                if r.status_code >= 400:
                    if r.status_code == 404:
                        raise SourceChanged(f"{entry.locator} disappeared from the source since the snapshot")
                    raise _status_error(r.status_code, entry.locator)
                self._check(r, entry)
                if r.status_code == 206:
                    skip = offset - _range_start(r)
                elif r.status_code == 200:
                    skip = offset  # Range ignored: read from the start
                else:
                    raise SourceError(f"unexpected HTTP {r.status_code} for {entry.locator}")
                remaining = length
                async for chunk in r.aiter_raw():
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    if len(chunk) > remaining:
                        chunk = chunk[:remaining]
                    await sink(chunk)
                    remaining -= len(chunk)
                    if not remaining:
                        return
                raise TemporarySourceError(
                    f"{entry.locator}: body ended {remaining} bytes short of the requested range"
                )
        except httpx.TransportError as e:
            raise TemporarySourceError(f"{entry.locator}: {type(e).__name__}: {e}") from e

    @staticmethod
    def _check(r: httpx.Response, entry: FileEntry) -> None:
        now = _validator(r.headers)
        size = _size_of(r)
        if (now != entry.validator and entry.validator != "none") or (size is not None and size != entry.size):
            raise SourceChanged(
                f"{entry.locator} changed since the snapshot was pinned "
                f"({entry.validator}, {entry.size} bytes -> {now}, {size} bytes)"
            )


def _size_of(r: httpx.Response) -> int | None:
    cr = r.headers.get("content-range")
    if r.status_code == 206 and cr and "/" in cr:
        total = cr.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    cl = r.headers.get("content-length")
    return int(cl) if cl and cl.isdigit() else None


def _range_start(r: httpx.Response) -> int:
    cr = r.headers.get("content-range", "")
    try:
        return int(cr.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise SourceError(f"malformed Content-Range {cr!r} from {r.url}") from None


def _mtime(headers: httpx.Headers) -> float:
    from email.utils import parsedate_to_datetime

    lm = headers.get("last-modified")
    try:
        return parsedate_to_datetime(lm).timestamp() if lm else 0.0
    except (TypeError, ValueError):
        return 0.0
