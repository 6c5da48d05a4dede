"""A Hugging Face Hub look-alike for tests: huggingface_hub (2.4) works against it with no internet.

``HubServer`` keeps model and dataset repos in memory, git-like: commits with
real git object ids (blob, tree and commit sha1s are what git would compute),
branches, tags, and a history that ``squash`` rewrites. Files at or above
``lfs_threshold`` bytes are LFS files; their bytes are served by a separate
``BlobServer`` on another host (127.0.0.2), reached through a 302 with a
signed URL, the way the Hub sends clients to its CDN. Point the library at it
with ``HfApi(endpoint=hub.url)`` / ``hf_hub_download(..., endpoint=hub.url)``.

Endpoints, as huggingface_hub calls them (``{t}`` is ``models`` or ``datasets``,
``{rev}`` is percent-encoded with ``safe=""``, so ``a/b`` arrives as ``a%2Fb``):

* ``GET /api/{t}/{repo_id}`` and ``GET /api/{t}/{repo_id}/revision/{rev}``
  (``model_info``, ``dataset_info``, ``repo_info``, ``resolve_revision``,
  ``snapshot_download``). ``?blobs=true`` (``files_metadata=True``) adds
  size, blobId and lfs to the siblings; ``?expand=...`` keeps only those fields.
* ``GET /api/{t}/{repo_id}/tree/{rev}[/{path}]?recursive=&expand=&cursor=``
  (``list_repo_tree``, ``list_repo_files``, ``snapshot_download``), paginated
  by ``page_size`` with ``Link: <next>; rel="next"``.
* ``POST /api/{t}/{repo_id}/paths-info/{rev}`` form ``paths=..`` (``get_paths_info``).
* ``GET /api/{t}/{repo_id}/refs`` (``list_repo_refs``).
* ``GET|HEAD /{repo_id}/resolve/{rev}/{path}`` and ``/datasets/{repo_id}/resolve/...``
  (``hf_hub_download``, ``get_hf_file_metadata``, ``file_exists``): a regular
  file answers 200/206 with the bytes, ``ETag: "<git oid>"`` and ``X-Repo-Commit``;
  an LFS file answers 302 to the BlobServer with ``X-Repo-Commit``,
  ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` and ``ETag: "<sha256>"``.
* ``GET /api/whoami-v2`` (``whoami``) and ``GET /api/agent-harnesses`` (an empty
  registry: huggingface_hub fetches it from ``HF_ENDPOINT`` to build its
  User-Agent unless telemetry is disabled).

Errors carry ``X-Error-Code`` / ``X-Error-Message`` as on the Hub:
``RepoNotFound`` (401 without a token, 404 with one; also for private repos the
token may not read), ``GatedRepo`` (401 without a token, 403 with a token not
allowed), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with
``X-Repo-Commit`` on resolve). An unknown token gets 401 with
``X-Error-Message: Invalid credentials in Authorization header`` on any repo.
As on the Hub, a gated repo's metadata and listings are public; only its files
are gated (except ``gated_public_files``, README.md by default).

Test knobs: ``fail_next``, ``extra_tree_entries``, ``blob.ignore_range``,
``blob.reject_authorization``, ``blob.url_ttl``; counters ``blob_bytes_sent``,
``bytes_sent_by_path``, ``requests`` (both servers, in order; the blob server's
paths start with ``/lfs/``) and ``blob.requests`` (the blob server's only);
``server_errors`` collects handler crashes (answered with 500).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Self
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode

from syncbit.demo.httpserver import TrackedHTTPServer

REPO_TYPES = ("model", "dataset")
_PLURALS = {"models": "model", "datasets": "dataset"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Words that follow a repo id in URLs: "org/tree" is never read as a repo id when unknown.
_SUBPATHS = {"resolve", "tree", "revision", "refs", "paths-info", "commits", "blob", "raw"}
_CHUNK = 256 * 1024
_AUTHOR = b"Syncbit Tests <tests@syncbit.invalid>"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands for a blob in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes
    oid: str  # git blob sha1: of the content, or of the LFS pointer for LFS files
    sha256: str | None = None  # LFS files only
    pointer_size: int | None = None  # LFS files only

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    tree_sha: str
    files: Mapping[str, HubFile]
    dirs: Mapping[str, str]  # directory path -> git tree sha (the root is "")
    message: str
    timestamp: int


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False  # False, True (shown as "auto"), "auto" or "manual"
    created_at: float = field(default_factory=time.time)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    extra_entries: list[dict] = field(default_factory=list)
    uid: str = field(default_factory=lambda: secrets.token_hex(12))

    def resolve(self, revision: str | None) -> Commit | None:
        rev = revision or "main"
        if _HEX40.match(rev) and rev in self.commits:
            return self.commits[rev]
        for refs, prefix in ((self.branches, "refs/heads/"), (self.tags, "refs/tags/")):
            name = rev.removeprefix(prefix)
            if name in refs:
                return self.commits[refs[name]]
        return None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _parse_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """(start, end) to serve, None to ignore the header (200), False if unsatisfiable (416)."""
    m = _RANGE.match(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None  # not a single byte range we understand: ignore it, as RFC 9110 allows
    if m.group(1):
        start = int(m.group(1))
        if m.group(2) and int(m.group(2)) < start:
            return None  # invalid range-spec: ignore
        if start >= size:
            return False
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        return start, end
    suffix = int(m.group(2))
    if suffix == 0 or size == 0:
        return False
    return max(0, size - suffix), size - 1


class _Server(TrackedHTTPServer):
    def __init__(self, host: str, handler: type[BaseHTTPRequestHandler]) -> None:
        self._thread: threading.Thread | None = None
        # (method, raw path with query, headers): headers is an http.client.HTTPMessage, so
        # ``"authorization" in headers`` and ``headers.get("Range")`` are case-insensitive.
        self.requests: list[tuple[str, str, object]] = []
        super().__init__((host, 0), handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def _serve(self, name: str) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name=name, daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        """Stop listening and cut every open connection, keep-alive ones included."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
        self.cut_connections()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
    server: _Server

    def log_message(self, fmt, *args):  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        raise NotImplementedError

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method: str) -> None:
        srv, hub = self.server, self.hub
        record = (method, self.path, self.headers)
        with srv._lock:
            srv.requests.append(record)
        if srv is not hub:  # the hub's list has every request, in order; blob paths start with /lfs/
            with hub._lock:
                hub.requests.append(record)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        raw_path, _, query = self.path.partition("?")
        fault = hub._take_fault(unquote(raw_path))
        if fault is not None:
            status, headers = fault
            return self._send(status, b"simulated failure\n", "text/plain", headers, method == "HEAD")
        try:
            self.route(method, raw_path, query, body)
        except _HTTPError as e:
            self._send_error(e, method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a fixture bug: answer 500, keep it for the test to see
            with hub._lock:
                hub.server_errors.append(traceback.format_exc())
            self.close_connection = True
            self._send_error(_HTTPError(500, f"{type(e).__name__}: {e}"), method == "HEAD")

    def route(self, method: str, raw_path: str, query: str, body: bytes) -> None:
        raise NotImplementedError

    # -- responses ---------------------------------------------------------

    def _send(self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, obj, head: bool, headers: Mapping[str, str] | None = None) -> None:
        # ensure_ascii: hostile names ("a\x00b", lone surrogates) still make valid JSON.
        self._send(200, json.dumps(obj).encode(), "application/json; charset=utf-8", headers, head)

    def _send_error(self, e: _HTTPError, head: bool) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        # Header values must be latin-1: escape what a hostile revision or path may bring.
        headers["X-Error-Message"] = " ".join(e.message.split()).encode("ascii", "backslashreplace").decode()
        self._send(e.status, json.dumps({"error": e.message}).encode(), "application/json; charset=utf-8",
                   headers, head)

    def _send_bytes(self, data: bytes, headers: dict[str, str], head: bool, count_key: str, *,
                    ignore_range: bool = False, blob: bool = False) -> None:
        """A file body with single-range support (200, 206, 416), counted in the hub's counters."""
        size = len(data)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and not ignore_range:
            parsed = _parse_range(rng, size)
            if parsed is False:
                return self._send(416, b"", "text/plain", {**headers, "Content-Range": f"bytes */{size}"}, head)
            if parsed is not None:
                (start, end), status = parsed, 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if not ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        view = memoryview(data)
        pos = start
        while pos <= end:
            chunk = view[pos:min(end + 1, pos + _CHUNK)]
            self.wfile.write(chunk)
            pos += len(chunk)
            self.hub._count(count_key, len(chunk), blob)


# --------------------------------------------------------------------------- blob server


class _BlobHandler(_Handler):
    server: BlobServer

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def route(self, method: str, raw_path: str, query: str, body: bytes) -> None:
        srv = self.server
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            raise _HTTPError(405, "Method Not Allowed")
        if srv.reject_authorization and "Authorization" in self.headers:
            # What S3 says to a presigned URL that also carries an Authorization header.
            raise _HTTPError(400, "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                                  "Signature query string parameter or the Authorization header should be specified")
        m = re.fullmatch(r"/lfs/([0-9a-f]{64})", raw_path)
        if not m:
            raise _HTTPError(404, "NoSuchKey")
        sha256 = m.group(1)
        params = dict(parse_qsl(query))
        if not srv.check_signature(sha256, params.get("Expires", ""), params.get("Signature", "")):
            raise _HTTPError(403, "AccessDenied: missing, bad or expired signature")
        data = self.hub._lfs.get(sha256)
        if data is None:
            raise _HTTPError(404, "NoSuchKey")
        headers = {"ETag": f'"{sha256}"', "Cache-Control": "public, max-age=604800, immutable"}
        name = params.get("filename")
        if name:
            ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
            headers["Content-Disposition"] = (
                f"inline; filename*=UTF-8''{quote(name, safe='')}; filename=\"{ascii_name}\";")
        self._send_bytes(data, headers, head, unquote(raw_path), ignore_range=srv.ignore_range, blob=True)


class BlobServer(_Server):
    """The CDN: LFS bytes by sha256 behind signed URLs; never looks at Authorization."""

    def __init__(self, hub: HubServer, host: str = "127.0.0.2") -> None:
        self.hub = hub
        self.ignore_range = False  # answer 200 with the whole body to every Range request
        self.reject_authorization = False  # answer 400 to requests that carry Authorization (as S3 does)
        self.url_ttl = 3600.0  # seconds a signed URL stays valid
        self._secret = secrets.token_bytes(32)
        super().__init__(host, _BlobHandler)

    def _sig(self, sha256: str, expires: str) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, sha256: str, filename: str | None = None, ttl: float | None = None) -> str:
        expires = str(int(time.time() + (self.url_ttl if ttl is None else ttl)))
        params = {"Expires": expires, "Signature": self._sig(sha256, expires)}
        if filename:
            params["filename"] = filename
        return f"{self.url}/lfs/{sha256}?{urlencode(params, quote_via=quote)}"

    def check_signature(self, sha256: str, expires: str, signature: str) -> bool:
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(self._sig(sha256, expires), signature)


# --------------------------------------------------------------------------- hub


class _HubHandler(_Handler):
    server: HubServer

    @property
    def hub(self) -> HubServer:
        return self.server

    def route(self, method: str, raw_path: str, query: str, body: bytes) -> None:
        head = method == "HEAD"
        segs = raw_path.lstrip("/").split("/")
        if segs[0] == "api":
            if raw_path == "/api/agent-harnesses":
                return self._send_json({"standardEnvVars": [], "harnesses": {}}, head)
            if raw_path == "/api/whoami-v2":
                return self._whoami(head)
            if len(segs) >= 3 and segs[1] in _PLURALS:
                return self._api(method, _PLURALS[segs[1]], segs[2:], query, body)
            raise _HTTPError(404, "Not Found")
        repo_type, rest = ("dataset", segs[1:]) if segs[0] == "datasets" else ("model", segs)
        repo_id, rest = self.hub._split_repo(repo_type, rest)
        if len(rest) >= 3 and rest[0] == "resolve":
            if method not in ("GET", "HEAD"):
                raise _HTTPError(405, "Method Not Allowed")
            return self._resolve(repo_type, repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), head,
                                 unquote(raw_path))
        raise _HTTPError(404, "Not Found")

    # -- auth ----------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not self.hub._token_known(token):
            raise _HTTPError(401, INVALID_CREDENTIALS)
        return token

    def _repo_for(self, repo_type: str, repo_id: str, file_path: str | None = None) -> Repo:
        """The repo, if this request may see it; the Hub's errors otherwise."""
        hub = self.hub
        token = self._token()
        repo = hub.repos.get((repo_type, repo_id))
        allowed = repo is not None and token is not None and hub._token_allows(token, repo)
        if repo is None or (repo.private and not allowed):
            raise _HTTPError(401 if token is None else 404,
                             "Repository not found" if token is not None else "Invalid username or password.",
                             "RepoNotFound")
        if repo.gated and not allowed:
            gated = (not hub.gated_metadata_public) if file_path is None else file_path not in hub.gated_public_files
            if gated:
                url = f"{hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
                if token is None:
                    msg = (f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in.")
                else:
                    msg = (f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. "
                           f"Visit {url} to ask for access.")
                raise _HTTPError(401 if token is None else 403, msg, "GatedRepo")
        return repo

    def _commit_for(self, repo: Repo, revision: str | None, headers: dict | None = None) -> Commit:
        with self.hub._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound", headers)
        return commit

    def _whoami(self, head: bool) -> None:
        token = self._token()
        if token is None:
            raise _HTTPError(401, "Invalid username or password.")
        self._send_json({"type": "user", "id": hashlib.sha1(token.encode()).hexdigest()[:24], "name": "syncbit-test",
                         "fullname": "Syncbit Test", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "read"}}},
                        head)

    # -- /api/{models,datasets}/... ------------------------------------------

    def _api(self, method: str, repo_type: str, segs: list[str], query: str, body: bytes) -> None:
        head = method == "HEAD"
        repo_id, rest = self.hub._split_repo(repo_type, segs)
        params = parse_qs(query)
        action = rest[0] if rest else "info"
        if method == "POST" and action != "paths-info" or method != "POST" and action == "paths-info":
            raise _HTTPError(405, "Method Not Allowed")
        if action == "info" or action == "revision" and len(rest) >= 2:
            repo = self._repo_for(repo_type, repo_id)
            revision = unquote("/".join(rest[1:])) if rest else None
            commit = self._commit_for(repo, revision)
            blobs = params.get("blobs", ["false"])[0].lower() in ("1", "true")
            return self._send_json(self._info(repo, commit, blobs, params.get("expand")), head)
        if action == "tree" and len(rest) >= 2:
            repo = self._repo_for(repo_type, repo_id)
            commit = self._commit_for(repo, unquote(rest[1]))
            return self._tree(repo, commit, unquote("/".join(rest[2:])).strip("/"), query, head)
        if action == "paths-info" and len(rest) >= 2:
            repo = self._repo_for(repo_type, repo_id)
            commit = self._commit_for(repo, unquote("/".join(rest[1:])))
            form = parse_qs(body.decode("utf-8", "replace"))
            return self._send_json(self._paths_info(commit, form.get("paths", [])), head)
        if action == "refs" and len(rest) == 1:
            repo = self._repo_for(repo_type, repo_id)
            prs = params.get("include_prs", ["0"])[0].lower() in ("1", "true")
            return self._send_json(self._refs(repo, prs), head)
        raise _HTTPError(404, "Not Found")

    def _info(self, repo: Repo, commit: Commit, blobs: bool, expand: list[str] | None) -> dict:
        siblings = []
        for f in commit.files.values():
            s: dict = {"rfilename": f.path}
            if blobs:
                s["size"] = f.size
                s["blobId"] = f.oid
                if f.is_lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        gated = "auto" if repo.gated is True else repo.gated
        info = {
            "_id": repo.uid, "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha, "lastModified": _iso(commit.timestamp), "createdAt": _iso(repo.created_at),
            "private": repo.private, "gated": gated, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "cardData": {}, "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if expand:  # the Hub then answers with the requested properties only
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return info

    def _listing(self, commit: Commit, sub: str, recursive: bool) -> list[dict] | None:
        if sub and sub not in commit.dirs:
            return None
        prefix = f"{sub}/" if sub else ""
        out = []
        for d, sha in commit.dirs.items():
            if d and d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                out.append({"type": "directory", "oid": sha, "size": 0, "path": d})
        for p, f in commit.files.items():
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                out.append(f.tree_entry())
        out.sort(key=lambda e: e["path"])
        return out

    def _tree(self, repo: Repo, commit: Commit, sub: str, query: str, head: bool) -> None:
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        recursive = params.get("recursive", "false").lower() in ("1", "true")
        entries = self._listing(commit, sub, recursive)
        if entries is None:
            raise _HTTPError(404, f"{sub} does not exist on \"{commit.sha}\"", "EntryNotFound")
        with self.hub._lock:
            entries = entries + list(repo.extra_entries)
        offset = 0
        if "cursor" in params:
            try:
                offset = int(json.loads(base64.urlsafe_b64decode(params["cursor"].encode()))["offset"])
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise _HTTPError(400, "Invalid cursor") from None
        size = max(1, self.hub.page_size)
        page = entries[offset:offset + size]
        headers = {}
        if offset + size < len(entries):
            cursor = base64.urlsafe_b64encode(json.dumps({"offset": offset + size}).encode()).decode()
            rest = [(k, v) for k, v in pairs if k != "cursor"] + [("cursor", cursor)]
            raw_path = self.path.partition("?")[0]
            headers["Link"] = f'<{self.hub.url}{raw_path}?{urlencode(rest)}>; rel="next"'
        self._send_json(page, head, headers)

    def _paths_info(self, commit: Commit, paths: list[str]) -> list[dict]:
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(commit.files[p].tree_entry())
            elif p and p in commit.dirs:
                out.append({"type": "directory", "oid": commit.dirs[p], "size": 0, "path": p})
        return out

    def _refs(self, repo: Repo, prs: bool) -> dict:
        with self.hub._lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()]
        out = {"branches": branches, "converts": [], "tags": tags}
        if prs:
            out["pullRequests"] = []
        return out

    # -- /{repo_id}/resolve/{rev}/{path} -------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool, count_key: str) -> None:
        repo = self._repo_for(repo_type, repo_id, file_path=path)
        commit = self._commit_for(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        if f.is_lfs:
            location = self.hub.blob.signed_url(f.sha256, filename=path.rsplit("/", 1)[-1])
            body = f"Found. Redirecting to {location}".encode()
            return self._send(302, body, "text/plain; charset=utf-8", {
                "Location": location,
                "X-Repo-Commit": commit.sha,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "ETag": f'"{f.sha256}"',
                "Accept-Ranges": "bytes",
            }, head)
        self._send_bytes(f.data, {"ETag": f'"{f.oid}"', "X-Repo-Commit": commit.sha}, head, count_key)


class HubServer(_Server):
    """A Hub with model and dataset repos in memory, and its CDN (``self.blob``) on another host."""

    def __init__(self, *, lfs_threshold: int = 1024, page_size: int = 1000, host: str = "127.0.0.1",
                 blob_host: str = "127.0.0.2", gated_metadata_public: bool = True,
                 gated_public_files: Iterable[str] = ("README.md", ".gitattributes")) -> None:
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        # As on the Hub: a gated repo's info and tree listings are readable by anyone, its files are not
        # (except these). gated_metadata_public=False gates the /api endpoints too.
        self.gated_metadata_public = gated_metadata_public
        self.gated_public_files = frozenset(gated_public_files)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, list | None] = {}  # token -> allowed repos (None: every repo)
        self.blob_bytes_sent = 0
        self.bytes_sent_by_path: dict[str, int] = {}  # unquoted URL path (no query) -> file body bytes
        self.server_errors: list[str] = []  # tracebacks of handler crashes (answered with 500)
        self._lfs: dict[str, bytes] = {}  # sha256 -> bytes: what the CDN holds
        self._faults: list[list] = []  # [remaining, status, paths, headers]
        self._last_ts = 0
        super().__init__(host, _HubHandler)
        self.blob = BlobServer(self, blob_host)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> HubServer:
        if self._thread is None:
            self.blob._serve("hub-blobs")
            self._serve("hub")
        return self

    def stop(self) -> None:
        self._stop()
        self.blob._stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- repos -------------------------------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    gated: bool | str = False, exist_ok: bool = False) -> str:
        """A repo whose ``main`` holds one empty commit; returns that commit's sha."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise ValueError(f"bad repo id {repo_id!r}")
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                if exist_ok:
                    return self.repos[(repo_type, repo_id)].branches["main"]
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = Repo(repo_type, repo_id, private=private, gated=gated)
            c = self._new_commit(None, {}, "initial commit")
            repo.commits[c.sha] = c
            repo.branches["main"] = c.sha
            self.repos[(repo_type, repo_id)] = repo
            return c.sha

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            del self.repos[(repo_type, repo_id)]

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The repo record (``.private`` and ``.gated`` may be changed in place)."""
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha a revision (branch, tag or sha) resolves to now."""
        with self._lock:
            c = self.repo(repo_id, repo_type).resolve(revision)
        if c is None:
            raise KeyError(f"no revision {revision!r} in {repo_type} repo {repo_id}")
        return c.sha

    def commit(self, repo_id: str, files: Mapping[str, bytes | None], repo_type: str = "model",
               branch: str = "main", message: str = "") -> str:
        """Commit on ``branch`` (created from main if new): a path to bytes adds or replaces it, to None
        deletes it (a directory too); other files stay. Returns the new commit sha."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            base_sha = repo.branches.get(branch, repo.branches["main"])
            tree = dict(repo.commits[base_sha].files)
            for path, data in files.items():
                if data is None:
                    gone = [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]
                    if not gone:
                        raise KeyError(f"cannot delete {path!r}: not in {repo_id}@{branch}")
                    for p in gone:
                        del tree[p]
                else:
                    self._check_path(path)
                    tree[path] = self._make_file(path, bytes(data))
            self._check_tree(tree)
            c = self._new_commit(base_sha, tree, message or f"Update {len(files)} file(s)")
            repo.commits[c.sha] = c
            repo.branches[branch] = c.sha
            return c.sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", repo_type: str = "model") -> str:
        sha = self.head(repo_id, revision, repo_type)
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            if branch in repo.branches:
                raise ValueError(f"branch {branch!r} exists")
            repo.branches[branch] = sha
        return sha

    def tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model",
            force: bool = False) -> str:
        """Point ``tag`` at what ``revision`` resolves to (``force`` moves an existing tag)."""
        sha = self.head(repo_id, revision, repo_type)
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            if tag in repo.tags and not force:
                raise ValueError(f"tag {tag!r} exists")
            repo.tags[tag] = sha
        return sha

    def squash(self, repo_id: str, branch: str = "main", repo_type: str = "model", message: str = "") -> str:
        """Replace the branch's history by one commit with the same files (like ``super_squash_history``).
        Commits no branch or tag reaches any more are gone: their shas answer RevisionNotFound."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            old = repo.commits[repo.branches[branch]]
            c = self._new_commit(None, dict(old.files), message or f"Super-squash branch '{branch}'")
            repo.commits[c.sha] = c
            repo.branches[branch] = c.sha
            reachable: set[str] = set()
            for sha in [*repo.branches.values(), *repo.tags.values()]:
                while sha is not None and sha not in reachable:
                    reachable.add(sha)
                    sha = repo.commits[sha].parent
            repo.commits = {s: cm for s, cm in repo.commits.items() if s in reachable}
            return c.sha

    # -- auth and test knobs -----------------------------------------------

    def add_token(self, token: str, repos: Iterable[str | tuple[str, str]] | None = None) -> None:
        """Accept ``token``. ``repos`` limits which private/gated repos it may read: ids (any type) or
        (repo_type, repo_id) pairs; None: all of them. Public repos need no token."""
        with self._lock:
            self.tokens[token] = None if repos is None else list(repos)

    def fail_next(self, n: int, status: int = 503, paths: Iterable[str] | str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        """The next ``n`` requests (to the hub or the blob server) whose unquoted path contains one of
        ``paths`` (any request if None) answer ``status`` (with ``headers``, e.g. Retry-After)."""
        if isinstance(paths, str):
            paths = [paths]
        with self._lock:
            self._faults.append([n, status, None if paths is None else list(paths), dict(headers or {})])

    def extra_tree_entries(self, repo_id: str, entries: list[dict], repo_type: str = "model") -> None:
        """Append these raw entries, as given, to every tree listing of the repo (hostile-name tests)."""
        with self._lock:
            self.repo(repo_id, repo_type).extra_entries.extend(entries)

    @property
    def lfs_store(self) -> dict[str, bytes]:
        """sha256 -> bytes the BlobServer serves (replace a value to make the CDN lie)."""
        return self._lfs

    def lfs_url(self, sha256: str, ttl: float | None = None) -> str:
        """A signed BlobServer URL for an LFS blob, as the resolve redirect would give."""
        return self.blob.signed_url(sha256, ttl=ttl)

    # -- internals ---------------------------------------------------------

    def _take_fault(self, path: str) -> tuple[int, dict] | None:
        with self._lock:
            for f in self._faults:
                if f[0] > 0 and (f[2] is None or any(p in path for p in f[2])):
                    f[0] -= 1
                    if f[0] == 0:
                        self._faults.remove(f)
                    return f[1], f[3]
        return None

    def _count(self, path: str, n: int, blob: bool) -> None:
        with self._lock:
            self.bytes_sent_by_path[path] = self.bytes_sent_by_path.get(path, 0) + n
            if blob:
                self.blob_bytes_sent += n

    def _token_known(self, token: str) -> bool:
        with self._lock:
            return token in self.tokens

    def _token_allows(self, token: str, repo: Repo) -> bool:
        with self._lock:
            allowed = self.tokens.get(token, [])
        if allowed is None:
            return True
        return any(a == repo.repo_id or tuple(a) == (repo.repo_type, repo.repo_id) for a in allowed)

    def _split_repo(self, repo_type: str, segs: list[str]) -> tuple[str, list[str]]:
        """(repo id, the raw segments after it): known repos first, then "ns/name" unless the second
        segment is a word like "resolve"."""
        dec = [unquote(s) for s in segs[:2]]
        if len(dec) >= 2 and (repo_type, f"{dec[0]}/{dec[1]}") in self.repos:
            return f"{dec[0]}/{dec[1]}", segs[2:]
        if dec and (repo_type, dec[0]) in self.repos:
            return dec[0], segs[1:]
        if len(dec) >= 2 and dec[1] not in _SUBPATHS:
            return f"{dec[0]}/{dec[1]}", segs[2:]
        return (dec[0] if dec else ""), segs[1:]

    @staticmethod
    def _check_path(path: str) -> None:
        parts = path.split("/")
        if not path or any(p in ("", ".", "..") for p in parts) or "\x00" in path:
            raise ValueError(f"bad path in repo: {path!r} (use extra_tree_entries for hostile names)")

    @staticmethod
    def _check_tree(tree: Mapping[str, HubFile]) -> None:
        for path in tree:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in tree:
                    raise ValueError(f"{path!r} needs {'/'.join(parts[:i])!r} to be a directory, it is a file")

    def _make_file(self, path: str, data: bytes) -> HubFile:
        if len(data) >= self.lfs_threshold:
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = lfs_pointer(sha256, len(data))
            self._lfs[sha256] = data
            return HubFile(path, data, git_blob_oid(pointer), sha256, len(pointer))
        return HubFile(path, data, git_blob_oid(data))

    def _new_commit(self, parent: str | None, files: dict[str, HubFile], message: str) -> Commit:
        files = dict(sorted(files.items()))
        tree_sha, dirs = _git_trees(files)
        # Strictly increasing timestamps: two commits never share a sha, even with the same tree and parent.
        ts = self._last_ts = max(int(time.time()), self._last_ts + 1)
        body = b"tree %s\n" % tree_sha.encode()
        if parent:
            body += b"parent %s\n" % parent.encode()
        body += b"author %s %d +0000\ncommitter %s %d +0000\n\n%s\n" % (_AUTHOR, ts, _AUTHOR, ts, message.encode())
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        return Commit(sha, parent, tree_sha, files, dirs, message, ts)


def _git_trees(files: Mapping[str, HubFile]) -> tuple[str, dict[str, str]]:
    """The git tree sha of the root and of every directory, as git computes them."""
    root: dict = {}
    for path, f in files.items():
        node = root
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = f
    shas: dict[str, str] = {}

    def build(node: dict, prefix: str) -> bytes:
        entries = []
        for name, child in node.items():
            raw = name.encode()
            if isinstance(child, dict):
                digest = build(child, f"{prefix}{name}/")
                entries.append((raw + b"/", b"40000 " + raw + b"\0" + digest))
            else:
                entries.append((raw, b"100644 " + raw + b"\0" + bytes.fromhex(child.oid)))
        entries.sort(key=lambda e: e[0])
        content = b"".join(e[1] for e in entries)
        digest = hashlib.sha1(b"tree %d\0" % len(content) + content).digest()
        shas[prefix.rstrip("/")] = digest.hex()
        return digest

    build(root, "")
    return shas[""], shas
