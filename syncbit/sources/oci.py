"""``oci://registry[:port]/repo[:tag|@sha256:digest]``: an image or artifact from an OCI registry.

The dataset is an OCI image layout that skopeo, umoci or containerd read
straight from the mount::

    oci-layout
    index.json                      the platform manifest, named by the tag
    blobs/sha256/<manifest>         the manifest, the config and every layer
    <title>                         artifacts: each layer annotated with a title, under that name

Blobs are content-addressed by the registry: a blob's file object is its
sha256 digest (and size), so a layer shared by images, tags or registries is
stored and transferred once, and every blob is checked against its digest
when complete. Manifests are hashed here, never taken from the registry's
``Docker-Content-Digest``; the snapshot's revision is the manifest digest the
reference resolved to, and the locators name digests only, so a tag that
moves later does not move the snapshot.

Registry access speaks the Distribution API: anonymous, basic, and bearer
tokens through the ``WWW-Authenticate`` challenge, with credentials from the
docker/podman auth files (``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``;
credential helpers are not run). HTTPS, except for registries on a loopback
address or listed in ``SYNCBIT_INSECURE_REGISTRIES`` (``host:port,...``).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import platform as _platform
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urljoin

import trio
import urllib3

from ..errors import (
    AccessDenied,
    ConfigError,
    HostileName,
    MalformedURI,
    SourceError,
    SourceNotFound,
)
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source
from .http import (
    _HEADERS,
    _RETRIES,
    _TIMEOUT,
    _status_error,
    deliver_range,
    in_thread,
    range_headers,
)
from .retry import retry_within

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEXES = (OCI_INDEX, DOCKER_LIST)
_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
# Without the OCI types listed, registries refuse or convert OCI content.
_ACCEPT = ", ".join((*_INDEXES, *_MANIFESTS))
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
MAX_MANIFEST = 4 * 2**20  # what registries accept; a larger "manifest" is refused unread
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RESOLVE_DEADLINE = 30.0
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def parse_oci(uri: str) -> tuple[str, str, str | None, str | None]:
    """(registry host[:port], repository, tag, digest) of an ``oci://`` URI; MalformedURI if it is not one."""
    rest = uri[len("oci://"):] if uri.startswith("oci://") else None
    if not rest or "/" not in rest:
        raise MalformedURI(f"{uri!r}: expected oci://registry[:port]/repository[:tag|@sha256:digest]")
    host, _, path = rest.partition("/")
    digest = tag = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.match(digest):
            raise MalformedURI(f"{uri!r}: the digest must be sha256:<64 hex digits>")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise MalformedURI(f"{uri!r}: {tag!r} is not a valid tag")
    if not host or not _REPO.match(path):
        raise MalformedURI(f"{uri!r}: {path!r} is not a valid repository name (lowercase, '/'-separated)")
    if digest is None and tag is None:
        tag = "latest"
    return host, path, tag, digest


def default_platform() -> str:
    return f"linux/{_ARCH.get(_platform.machine().lower(), _platform.machine().lower())}"


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from the docker/podman auth files, if any."""
    candidates = [os.environ.get("REGISTRY_AUTH_FILE")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    candidates.append(os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"),
                                   "config.json"))
    for path in filter(None, candidates):
        try:
            auths = json.loads(Path(path).read_text()).get("auths") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for key, entry in auths.items():
            bare = key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
            if bare == registry and isinstance(entry, dict) and entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise ConfigError(f"{path}: the auth entry for {key} is not base64 of user:password") from None
                return user, password
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _inline(data: bytes) -> str:
    return "inline:" + base64.b64encode(data).decode()


class OciSource(Source):
    schemes = ("oci",)
    option_keys = frozenset({"platform"})

    def __init__(self, uri: str, options=None) -> None:
        super().__init__(uri, options)
        self.registry, self.repo, self.tag, self.digest = parse_oci(uri)
        self.platform = self.options.get("platform") or default_platform()
        if self.platform.count("/") not in (1, 2):
            raise ConfigError(f"platform {self.platform!r}: expected os/arch or os/arch/variant")
        insecure = {h.strip() for h in os.environ.get("SYNCBIT_INSECURE_REGISTRIES", "").split(",") if h.strip()}
        scheme = "http" if _is_loopback(self.registry) or self.registry in insecure else "https"
        self.base = f"{scheme}://{self.registry}/v2/{self.repo}/"
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=32, headers=_HEADERS, timeout=_TIMEOUT,
                                        retries=_RETRIES)
        self.limiter = trio.CapacityLimiter(32)
        self._creds = _credentials(self.registry)
        self._auth_lock = threading.Lock()
        self._authorization: str | None = None

    async def aclose(self) -> None:
        self.pool.clear()

    # -- HTTP with the registry's auth challenge (worker threads) ---------------

    def _request(self, method: str, url: str, headers: dict | None = None, *, stream: bool = False):
        for attempt in range(2):
            h = dict(headers or {})
            if self._authorization:
                h["Authorization"] = self._authorization
            r = self.pool.request(method, url, headers={**_HEADERS, **h}, preload_content=not stream,
                                  decode_content=False)
            if r.status != 401 or attempt:
                return r
            challenge = r.headers.get("www-authenticate", "")
            r.drain_conn()
            r.release_conn()
            self._login(challenge, url)
        return r

    def _login(self, challenge: str, url: str) -> None:
        scheme, params = _challenge(challenge)
        with self._auth_lock:
            if scheme == "basic":
                if self._creds is None:
                    raise AccessDenied(f"{self.registry} wants a login: add it to ~/.docker/config.json "
                                       f"or $REGISTRY_AUTH_FILE (e.g. 'skopeo login {self.registry}')")
                token = base64.b64encode(f"{self._creds[0]}:{self._creds[1]}".encode()).decode()
                self._authorization = f"Basic {token}"
            elif scheme == "bearer" and params.get("realm"):
                query = {k: params[k] for k in ("service", "scope") if params.get(k)}
                query.setdefault("scope", f"repository:{self.repo}:pull")
                headers = dict(_HEADERS)
                if self._creds is not None:
                    headers["Authorization"] = "Basic " + base64.b64encode(
                        f"{self._creds[0]}:{self._creds[1]}".encode()).decode()
                realm = urljoin(url, params["realm"])
                r = self.pool.request("GET", f"{realm}?{urlencode(query)}", headers=headers)
                if r.status in (401, 403):
                    raise AccessDenied(f"{self.registry}: the token service refused "
                                       f"{'these credentials' if self._creds else 'an anonymous pull'} "
                                       f"for {self.repo} (HTTP {r.status})")
                if r.status >= 400:
                    raise _status_error(r.status, realm)
                try:
                    body = json.loads(r.data)
                    token = body.get("token") or body["access_token"]
                except (ValueError, KeyError, AttributeError):
                    raise SourceError(f"{self.registry}: the token service answered without a token") from None
                self._authorization = f"Bearer {token}"
            else:
                raise AccessDenied(f"{self.registry}: unsupported authentication challenge {challenge!r}")

    async def _in_thread(self, fn, *args):
        return await in_thread(self.uri, self.limiter, fn, *args)

    # -- listing ---------------------------------------------------------------

    async def resolve(self) -> Snapshot:
        return await retry_within(_RESOLVE_DEADLINE, self.is_temporary, self._resolve_once,
                                  what=f"listing {self.uri}")

    def _manifest_sync(self, ref: str) -> tuple[str, str, bytes]:
        """(media type, sha256 digest, bytes) of the manifest or index at ``ref``, hashed here."""
        url = self.base + f"manifests/{ref}"
        r = self._request("GET", url, {"Accept": _ACCEPT}, stream=True)
        try:
            if r.status == 404:
                raise SourceNotFound(f"{self.registry}/{self.repo}:{ref} not found: unknown repository, tag "
                                     f"or digest ({_registry_error(r)})")
            if r.status in (401, 403):
                raise AccessDenied(f"{self.registry} refused {self.repo}:{ref} (HTTP {r.status}: unauthorized)")
            if r.status >= 400:
                raise _status_error(r.status, url)
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_MANIFEST:
                raise SourceError(f"{url}: a manifest of {int(declared)} bytes (over {MAX_MANIFEST}): refused")
            body = r.read(MAX_MANIFEST + 1)
            if len(body) > MAX_MANIFEST:
                raise SourceError(f"{url}: a manifest over {MAX_MANIFEST} bytes: refused")
            media_type = r.headers.get("content-type", "").split(";")[0].strip()
        finally:
            if r.length_remaining or not r.isclosed():
                r.close()  # a body we did not read to the end: drop the connection, not reuse it
            r.release_conn()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise SourceError(f"digest mismatch: {self.registry}/{self.repo}@{ref} served bytes hashing to {digest}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise SourceError(f"{url}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{url}: the manifest is not a JSON object")
        return doc.get("mediaType") or media_type, digest, body

    async def _resolve_once(self) -> Snapshot:
        ref = self.digest or self.tag
        media_type, digest, body = await self._in_thread(self._manifest_sync, ref)
        top, top_size = digest, len(body)
        if media_type in _INDEXES:
            entry = self._pick_platform(json.loads(body))
            media_type, digest, body = await self._in_thread(self._manifest_sync, entry["digest"])
        if media_type not in _MANIFESTS:
            raise SourceError(f"{self.uri}: unsupported manifest type {media_type!r}")
        manifest = json.loads(body)
        files = self._layout(manifest, media_type, digest, body)
        if top != digest:
            # The index too, as a blob: a runtime that resolved the tag upstream asks the mirror for it.
            files.append(FileEntry(path=f"blobs/sha256/{top[7:]}", size=top_size, locator=f"manifest:{top}",
                                   validator=top, file_object=short_hash("oci-blob", top, str(top_size)),
                                   digest=top, mode=0o444))
            files.sort(key=lambda f: f.path)
        return Snapshot(uri=self.uri, revision=top.removeprefix("sha256:"), files=tuple(files), created=time.time(),
                        options=tuple(sorted(self.options.items())))

    def _pick_platform(self, index: dict) -> dict:
        want = self.platform.split("/")
        offered = []
        for m in index.get("manifests") or []:
            p = m.get("platform") or {}
            have = [p.get("os", ""), p.get("architecture", "")] + ([p["variant"]] if p.get("variant") else [])
            offered.append("/".join(have))
            if have[:2] == want[:2] and (len(want) < 3 or have[2:] == want[2:]):
                _descriptor(m, self.uri)
                return m
        raise SourceNotFound(f"{self.uri}: platform {self.platform} is not in the index (it has: "
                             f"{', '.join(o for o in offered if o) or 'none'}); set the dataset option 'platform'")

    def _layout(self, manifest: dict, media_type: str, digest: str, body: bytes) -> list[FileEntry]:
        name = self.tag or digest.removeprefix("sha256:")[:12]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": media_type, "digest": digest, "size": len(body), "annotations": {REF_NAME: name}}]}
        files: dict[str, FileEntry] = {}

        def add(path: str, size: int, locator: str, blob_digest: str) -> None:
            safe_relpath(path)
            if path in files:
                return
            files[path] = FileEntry(path=path, size=size, locator=locator, validator=blob_digest,
                                    file_object=short_hash("oci-blob", blob_digest, str(size)),
                                    digest=blob_digest, mode=0o444)

        for path, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("index.json", json.dumps(index, separators=(",", ":")).encode())):
            add(path, len(data), _inline(data), "sha256:" + hashlib.sha256(data).hexdigest())
        add(f"blobs/sha256/{digest[7:]}", len(body), f"manifest:{digest}", digest)
        descriptors = [manifest.get("config")] + list(manifest.get("layers") or [])
        if manifest.get("config") is None:
            raise SourceError(f"{self.uri}: the manifest has no config")
        titled: dict[str, str] = {}
        for d in descriptors:
            d = _descriptor(d, self.uri)
            add(f"blobs/sha256/{d['digest'][7:]}", d["size"], f"blob:{d['digest']}", d["digest"])
            title = (d.get("annotations") or {}).get(TITLE)
            if title is not None:
                try:
                    path = safe_relpath(str(title))
                except HostileName as e:
                    raise HostileName(f"{self.uri}: layer {d['digest']} is titled {title!r}: {e}") from None
                if path in titled and titled[path] != d["digest"] or path in ("oci-layout", "index.json") \
                        or path.startswith("blobs/"):
                    raise HostileName(f"{self.uri}: layer title {title!r} collides with another file")
                titled[path] = d["digest"]
                add(path, d["size"], f"blob:{d['digest']}", d["digest"])
        return [files[k] for k in sorted(files)]

    # -- bytes -------------------------------------------------------------------

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        if length <= 0:
            return
        kind, _, ref = entry.locator.partition(":")
        if kind == "inline":
            await sink(base64.b64decode(ref)[offset:offset + length])
            return
        if kind not in ("blob", "manifest"):
            raise SourceError(f"{entry.path}: unknown locator {entry.locator[:40]!r}")
        await self._in_thread(self._read_sync, kind, ref, offset, length, sink)

    def _read_sync(self, kind: str, ref: str, offset: int, length: int, sink: Sink) -> None:
        url = self.base + ("blobs/" if kind == "blob" else "manifests/") + ref
        headers = range_headers({"Accept": _ACCEPT} if kind == "manifest" else {}, offset, length)
        r = self._request("GET", url, headers, stream=True)
        deliver_range(r, url, offset, length, sink, check=lambda _r: None)


def _descriptor(d, uri: str) -> dict:
    """A manifest's descriptor, checked: a sha256 digest (it becomes a path) and a size."""
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not _DIGEST.match(d["digest"]):
        raise HostileName(f"{uri}: a descriptor with digest {d.get('digest') if isinstance(d, dict) else d!r}: "
                          f"only sha256:<64 hex> digests are accepted")
    if not isinstance(d.get("size"), int) or isinstance(d.get("size"), bool) or d["size"] < 0:
        raise SourceError(f"{uri}: descriptor {d['digest']} has no valid size")
    return d


def _registry_error(r) -> str:
    try:
        errors = json.loads(r.data or b"{}").get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or f"HTTP {r.status}"
    except (ValueError, AttributeError):
        return f"HTTP {r.status}"
