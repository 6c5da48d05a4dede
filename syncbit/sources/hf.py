"""``hf://[models/|datasets/]org/repo[@revision][/subdir]``: a Hugging Face Hub repo.

Listing goes through huggingface_hub (in worker threads): the revision (a
branch, tag or commit) is resolved to a commit sha once, at pull time, and the
file list with sizes, git blob ids and LFS sha256 comes from the tree API at
that sha. The snapshot pins the sha, so a later push to the branch does not
touch it; a rewritten history that drops the sha makes reads fail with
SourceChanged.

Bytes come from range requests on each file's resolve URL at the pinned sha,
made with urllib3 like the HTTP source. Large files redirect to a CDN (or a
mirror's blob store); the redirect target is remembered for a while so that
each range does not cost a Hub round trip, and asked for again when it
expires. The token goes to the Hub only: urllib3 drops ``Authorization`` on a
redirect to another host.

Every file has a whole-file digest from the listing: the LFS sha256, or the
git blob sha1 for small files. The fetcher verifies it when the file is
complete. File-object ids are made of that digest, so revisions and repos on
one Hub endpoint that share a file share its blocks; they are scoped to the
endpoint because a mirror is a different authority on what a digest names.

``HF_TOKEN`` or the token file (``hf auth login``) authenticate, ``HF_ENDPOINT``
selects a mirror; both are read when the source is opened.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from urllib.parse import quote, urljoin, urlsplit

import trio
import urllib3

from ..errors import (
    AccessDenied, MalformedURI, RevisionNotFound, SourceChanged, SourceError, SourceNotFound, TemporarySourceError,
)
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source
from .http import _HEADERS, _RETRIES, _TIMEOUT, deliver_range, range_headers, stream_range
from .retry import retry_within

log = logging.getLogger(__name__)

_LIMITER = trio.CapacityLimiter(32)  # threads in Hub calls and range reads, all hf sources together
_RESOLVE_DEADLINE = 60.0
_REDIRECT_TTL = 600.0  # seconds a CDN URL from a redirect is reused; real ones are signed for longer
DEFAULT_ENDPOINT = "https://huggingface.co"


def parse_hf(uri: str):
    """(repo type, repo id, revision or None, subdir) of an ``hf://`` URI."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        parsed = parse_hf_uri(uri)
    except (HfUriError, ValueError) as e:
        raise MalformedURI(f"malformed hf:// URI {uri!r}: {e} "
                           "(expected hf://[models/|datasets/]ORG/REPO[@REVISION][/SUBDIR])") from None
    if parsed.type not in ("model", "dataset"):
        raise MalformedURI(f"hf:// URI {uri!r}: {parsed.type} repositories are not supported (models and datasets are)")
    subdir = parsed.path_in_repo.strip("/")
    if subdir:
        safe_relpath(subdir)
    return parsed.type, parsed.id, parsed.revision, subdir


class HfSource(Source):
    schemes = ("hf",)

    def __init__(self, uri: str, options=None) -> None:
        super().__init__(uri, options)
        self.repo_type, self.repo_id, self.revision, self.subdir = parse_hf(uri)
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.token: str | None = None
        self.api = None
        self.pool = urllib3.PoolManager(num_pools=8, maxsize=32, headers=_HEADERS, timeout=_TIMEOUT,
                                        retries=_RETRIES)
        self._cdn: dict[str, tuple[str, float]] = {}  # resolve URL -> (redirect target, when learnt)
        self._cdn_lock = threading.Lock()

    @classmethod
    async def create(cls, uri: str, options=None) -> HfSource:
        src = cls(uri, options)
        await trio.to_thread.run_sync(src._open, limiter=_LIMITER)
        return src

    def _open(self) -> None:
        from huggingface_hub import HfApi, get_token

        self.token = get_token()  # HF_TOKEN, else the token file; never logged
        self.api = HfApi(endpoint=self.endpoint, token=self.token or False)

    async def aclose(self) -> None:
        self.pool.clear()

    @property
    def _web_name(self) -> str:
        return f"{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"

    def _headers(self) -> dict[str, str]:
        headers = dict(_HEADERS)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _call(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=_LIMITER)
        except Exception as e:
            raise self._translate(e) from e

    def _translate(self, e: Exception) -> Exception:
        from huggingface_hub import errors as hx

        if isinstance(e, SourceError):
            return e
        repo = f"{self.repo_type} repo {self.repo_id!r} at {self.endpoint}"
        if isinstance(e, hx.GatedRepoError):
            return self._refusal(403, "GatedRepo")
        if isinstance(e, hx.RepositoryNotFoundError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401 and self.token:
                return AccessDenied(f"the Hub rejected the token for {repo} (HTTP 401): check HF_TOKEN "
                                    "or the token file; if the repo is private, the token needs read access")
            hint = "" if self.token else "; if it is private, set HF_TOKEN (or run 'hf auth login')"
            return SourceNotFound(f"{repo} not found{hint}")
        if isinstance(e, hx.RevisionNotFoundError):
            return RevisionNotFound(f"revision {self.revision!r} not found in {repo}")
        if isinstance(e, hx.EntryNotFoundError | hx.RemoteEntryNotFoundError):
            return SourceNotFound(f"{self.subdir!r} not found in {repo} at revision {self.revision or 'main'}")
        if isinstance(e, hx.DisabledRepoError):
            return AccessDenied(f"{repo} is disabled on the Hub")
        if isinstance(e, hx.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", 0) or 0
            if status in (401, 403):
                return AccessDenied(f"access denied to {repo} (HTTP {status}): set HF_TOKEN with a token that "
                                    "can read it")
            if status >= 500 or status in (408, 429):
                return TemporarySourceError(f"the Hub answered HTTP {status} for {repo}")
            return SourceError(f"the Hub answered HTTP {status} for {repo}: {_first_line(e)}")
        if _is_transport_error(e):
            return TemporarySourceError(f"cannot reach {self.endpoint} for {repo}: {type(e).__name__}: {e}")
        return e

    # -- listing ---------------------------------------------------------

    async def resolve(self) -> Snapshot:
        return await retry_within(_RESOLVE_DEADLINE, self.is_temporary, self._resolve_once, what=f"listing {self.uri}")

    async def _resolve_once(self) -> Snapshot:
        info = await self._call(lambda: self.api.repo_info(self.repo_id, repo_type=self.repo_type,
                                                           revision=self.revision))
        sha = info.sha
        if not sha:
            raise SourceError(f"the Hub did not give a commit for {self.repo_id}@{self.revision or 'main'}")
        items = await self._call(self._list, sha)
        entries = [self._entry(item, sha) for item in items]
        if not entries:
            raise SourceNotFound(f"no files in {self.uri} at commit {sha}")
        entries.sort(key=lambda f: f.path)
        if getattr(info, "gated", False):
            await self._check_gate(max(entries, key=lambda f: f.size))
        return Snapshot(uri=self.uri, revision=sha, files=tuple(entries), created=time.time())

    def _list(self, sha: str) -> list:
        from huggingface_hub.hf_api import RepoFile

        if self.subdir:
            # The subdir may name one file rather than a directory.
            infos = self.api.get_paths_info(self.repo_id, [self.subdir], revision=sha, repo_type=self.repo_type)
            if not infos:
                from huggingface_hub.errors import EntryNotFoundError

                raise EntryNotFoundError(f"{self.subdir} not found")
            if isinstance(infos[0], RepoFile):
                return [infos[0]]
        tree = self.api.list_repo_tree(self.repo_id, path_in_repo=self.subdir or None, revision=sha,
                                       repo_type=self.repo_type, recursive=True)
        return [item for item in tree if isinstance(item, RepoFile)]

    def _entry(self, item, sha: str) -> FileEntry:
        path = item.path
        if not isinstance(path, str):
            raise SourceError(f"the Hub listed a file without a path in {self.uri}")
        if self.subdir and path == self.subdir:  # the URI names one file
            rel = path.rsplit("/", 1)[-1]
        elif self.subdir:
            if not path.startswith(self.subdir + "/"):
                safe_relpath(path)  # hostile names get their own error first
                raise SourceError(f"the Hub listed {path!r} outside {self.subdir!r} in {self.uri}")
            rel = path[len(self.subdir) + 1:]
        else:
            rel = path
        rel = safe_relpath(rel)
        safe_relpath(path)
        size = int(item.size)
        if item.lfs is not None:
            sha256 = item.lfs.sha256
            digest = f"sha256:{sha256}"
            fo = short_hash("hf-lfs", self.endpoint, sha256, str(size))
        else:
            digest = f"git-sha1:{item.blob_id}"
            fo = short_hash("hf-git", self.endpoint, item.blob_id, str(size))
        url = (f"{self.endpoint}/{self._web_name}/resolve/{sha}/"
               f"{quote(path, safe='/')}")
        return FileEntry(path=rel, size=size, locator=url, validator=f"commit={sha}", file_object=fo,
                         digest=digest)

    # -- bytes -----------------------------------------------------------

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        if length > 0:
            await self._call(self._read_range_sync, entry, offset, length, sink)

    def _read_range_sync(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        def check(r) -> None:
            total = _total_size(r)
            if total is not None and total != entry.size:
                raise SourceChanged(f"{entry.locator} is {total} bytes at the source, {entry.size} in the snapshot")

        cdn = self._cached_redirect(entry.locator)
        if cdn is not None:
            try:
                stream_range(self.pool, cdn, self._headers_for(cdn), offset, length, sink, check=check)
                return
            except (SourceChanged, AccessDenied, SourceNotFound):
                # Expired or revoked: forget it and go through the Hub again,
                # which tells whether the file is really gone.
                self._forget_redirect(entry.locator)
        # Follow the redirect by hand to learn (and reuse) its target.
        r = self.pool.request("GET", entry.locator, headers=range_headers(self._headers(), offset, length),
                              redirect=False, preload_content=False, decode_content=False)
        location = r.headers.get("location") if r.status in (301, 302, 303, 307, 308) else None
        if location is None and r.status < 400:
            deliver_range(r, entry.locator, offset, length, sink, check=check)  # a small file, served by the Hub
            return
        status, code = r.status, r.headers.get("x-error-code", "")
        r.close()
        r.release_conn()
        if location:
            location = urljoin(entry.locator, location)
            self._remember_redirect(entry.locator, location)
            stream_range(self.pool, location, self._headers_for(location), offset, length, sink, check=check)
        elif status == 404:
            raise SourceChanged(f"{entry.locator} is gone from the Hub (commit {entry.validator[7:]} rewritten "
                                "or deleted?); pull again for a new snapshot")
        elif status in (401, 403):
            raise self._refusal(status, code)
        elif status >= 500 or status == 429:
            raise TemporarySourceError(f"the Hub answered HTTP {status} for {entry.locator}")
        else:
            raise SourceError(f"the Hub answered HTTP {status} for {entry.locator}")

    def _refusal(self, status: int, code: str) -> AccessDenied:
        repo = f"{self.repo_type} repo {self.repo_id!r} at {self.endpoint}"
        if code == "GatedRepo":
            return AccessDenied(
                f"{repo} is gated: accept its conditions at {self.endpoint}/{self._web_name} with your account, "
                "then set HF_TOKEN (or run 'hf auth login') with a token of that account")
        if self.token:
            return AccessDenied(f"the Hub refused the token for {repo} (HTTP {status}): check HF_TOKEN or the "
                                "token file; a private repo needs a token with read access")
        return AccessDenied(f"{repo} needs a token (HTTP {status}): set HF_TOKEN or run 'hf auth login'")

    async def _check_gate(self, entry: FileEntry) -> None:
        """On a gated repo, try one file now: pull fails with the gate's message, not the prefetch later."""
        def probe() -> tuple[int, str]:
            r = self.pool.request("HEAD", entry.locator, headers=self._headers(), redirect=False)
            return r.status, r.headers.get("x-error-code", "")

        status, code = await self._call(probe)
        if status in (401, 403):
            raise self._refusal(status, code)

    def _headers_for(self, url: str) -> dict[str, str]:
        """The token goes to the Hub's own host only, never to a CDN a redirect points at."""
        same_host = urlsplit(url).netloc == urlsplit(self.endpoint).netloc
        return self._headers() if same_host else dict(_HEADERS)

    def _cached_redirect(self, url: str) -> str | None:
        with self._cdn_lock:
            hit = self._cdn.get(url)
        if hit is None or time.monotonic() - hit[1] > _REDIRECT_TTL:
            return None
        return hit[0]

    def _remember_redirect(self, url: str, target: str) -> None:
        with self._cdn_lock:
            self._cdn[url] = (target, time.monotonic())

    def _forget_redirect(self, url: str) -> None:
        with self._cdn_lock:
            self._cdn.pop(url, None)


def _total_size(r) -> int | None:
    cr = r.headers.get("content-range")
    if r.status == 206 and cr and "/" in cr:
        total = cr.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    cl = r.headers.get("content-length")
    return int(cl) if r.status == 200 and cl and cl.isdigit() else None


def _is_transport_error(e: BaseException) -> bool:
    if isinstance(e, ConnectionError | TimeoutError | urllib3.exceptions.HTTPError):
        return True
    try:
        import httpx2
    except ImportError:  # pragma: no cover - depends on the huggingface_hub version
        httpx2 = None
    import httpx

    return isinstance(e, httpx.TransportError) or (httpx2 is not None and isinstance(e, httpx2.TransportError))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
