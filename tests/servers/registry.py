"""A real OCI registry for tests, content to push to it without docker, and fakes around it.

``RegistryServer`` runs Debian's ``docker-registry`` (the CNCF distribution
registry 2.8.x) as a subprocess on loopback: filesystem storage under a
directory the test owns, a port the kernel picks (kept across ``restart()``),
and one of: no auth, htpasswd basic auth (``users=``), or bearer tokens
(``users=``, ``token=True``) from the in-process ``TokenServer``; optional TLS
with a throwaway CA (``tls=True``). Its access log (combined log format, the
registry's stdout) goes to a file, so a test can ask how many body bytes the
registry served per blob (``blob_bytes()``): "shared layers moved once".
``tamper_blob()`` swaps stored bytes (a blob that no longer matches its digest).

Content is built in Python (``build_layer``, ``build_image``, ``build_index``,
``build_artifact`` and the ready-made ``sample_image``, ``sample_artifact``,
``sample_tags_sharing_layers``) and pushed through the Distribution API with
httpx (HEAD, POST + PUT blob upload, PUT manifest). ``ChallengeAuth`` is the
client side of the ``WWW-Authenticate`` flow (basic and bearer) for httpx.
``StubRegistry`` serves what a real registry will not (a 100 MB manifest, a
manifest whose bytes do not match its digest) and records request headers.

    with RegistryServer(tmp_path / "reg", users={"alice": "s3cret"}) as reg:
        index = sample_image(seed=1)             # linux/amd64 + linux/arm64
        reg.push("lib/app", index, tag="v1")
        reg.reset_counters()
        ...                                      # pull oci://{reg.address}/lib/app:v1
        assert reg.blob_bytes()[layer.digest] == layer.size

Needs the Debian package ``docker-registry`` (tests/unit/test_registry_fixture.py
also uses ``skopeo`` and ``umoci``). docs/oci-research.md has the background.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import ssl
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx

from syncbit.demo.httpserver import TrackedHTTPServer

REGISTRY_BIN = "docker-registry"

# -- media types ----------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"  # the 2-byte "{}" config of artifacts
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# CNCF ModelPack (modelpack/model-spec, specs-go/v1/mediatype.go)
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MODEL_WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
MODEL_DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"

TITLE = "org.opencontainers.image.title"  # the file name of an artifact layer (ORAS sets it)
MODEL_FILEPATH = "org.cncf.model.filepath"  # ModelPack's own file path annotation

_EPOCH = 1700000000  # mtime of every tar entry: builds are reproducible


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# -- content ------------------------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    """A config or layer blob and how a manifest refers to it."""

    data: bytes
    media_type: str
    annotations: dict[str, str] | None = None
    diff_id: str | None = None  # sha256 of the uncompressed tar (layers only)
    files: dict[str, bytes] | None = None  # what the tar holds (layers built here)

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as pushed: its exact bytes and what it refers to."""

    data: bytes
    media_type: str
    blobs: tuple[Blob, ...] = ()  # config first, then layers (manifests)
    children: tuple[Manifest, ...] = ()  # the platform manifests (indexes)
    platform: dict | None = None  # for an index entry

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def json(self) -> dict:
        return json.loads(self.data)

    @property
    def config(self) -> Blob:
        return self.blobs[0]

    @property
    def layers(self) -> tuple[Blob, ...]:
        return self.blobs[1:]

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = dict(self.platform)
        return d

    def all_blobs(self) -> dict[str, Blob]:
        """Every blob below this manifest (children included), by digest."""
        out = {b.digest: b for b in self.blobs}
        for c in self.children:
            out.update(c.all_blobs())
        return out

    def child(self, architecture: str, os_: str = "linux") -> Manifest:
        for c in self.children:
            if c.platform and c.platform.get("architecture") == architecture and c.platform.get("os") == os_:
                return c
        raise KeyError(f"{os_}/{architecture}")


def random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def build_layer(files: dict[str, bytes], *, compress: bool = True, media_type: str | None = None,
                annotations: dict[str, str] | None = None) -> Blob:
    """A filesystem layer: a tar (gzipped unless ``compress=False``) holding ``files``.

    Parent directories get their own entries (mode 0755); files are 0644, root-owned,
    with a fixed mtime, so the same files always give the same digest.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, _EPOCH
                    tar.addfile(ti)
            ti = tarfile.TarInfo(path.strip("/"))
            ti.size, ti.mode, ti.mtime = len(files[path]), 0o644, _EPOCH
            tar.addfile(ti, io.BytesIO(files[path]))
    raw = buf.getvalue()
    data = gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw
    mt = media_type or (OCI_LAYER_GZIP if compress else OCI_LAYER_TAR)
    return Blob(data, mt, annotations, diff_id=sha256(raw), files=dict(files))


def random_layer(rng: random.Random, name: str, *, nfiles: int = 3, size: int = 16 << 10,
                 docker: bool = False) -> Blob:
    """A gzipped layer with ``nfiles`` random files under ``opt/<name>/`` plus a small text file."""
    files = {f"opt/{name}/part-{i}.bin": random_bytes(rng, size) for i in range(nfiles)}
    files[f"etc/syncbit-{name}.txt"] = f"layer {name}\n".encode()
    return build_layer(files, media_type=DOCKER_LAYER_GZIP if docker else None)


def build_image(layers: list[Blob], *, architecture: str = "amd64", os_: str = "linux",
                variant: str | None = None, docker: bool = False,
                annotations: dict[str, str] | None = None) -> Manifest:
    """An image manifest (OCI, or Docker schema 2 with ``docker=True``) with a real config."""
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": architecture,
        "os": os_,
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"syncbit test layer {i}"}
                    for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    cfg = Blob(canonical_json(config), DOCKER_CONFIG if docker else OCI_CONFIG)
    m = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": cfg.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    if annotations:
        m["annotations"] = dict(annotations)
    platform = {"architecture": architecture, "os": os_}
    if variant:
        platform["variant"] = variant
    return Manifest(canonical_json(m), m["mediaType"], (cfg, *layers), platform=platform)


def build_index(manifests: list[Manifest], *, docker: bool = False,
                annotations: dict[str, str] | None = None) -> Manifest:
    """An image index (or Docker manifest list) over platform manifests."""
    idx = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST if docker else OCI_INDEX,
        "manifests": [m.descriptor() for m in manifests],
    }
    if annotations:
        idx["annotations"] = dict(annotations)
    return Manifest(canonical_json(idx), idx["mediaType"], children=tuple(manifests))


def build_artifact(files: dict[str, bytes], *, artifact_type: str | None = MODEL_ARTIFACT,
                   media_types: dict[str, str] | None = None, modelpack: bool = True,
                   config_media_type: str | None = None,
                   annotations: dict[str, str] | None = None) -> Manifest:
    """An OCI artifact: one raw layer per file, named by its ``org.opencontainers.image.title``.

    With ``modelpack=True`` (the default) the config is a ModelPack model config and
    the layers carry ModelPack media types (weights for ``*.safetensors``/``*.bin``/
    ``*.gguf``, weight config for ``*.json``, docs for the rest) and the ModelPack file
    path annotation too. With ``modelpack=False`` it looks like ``oras push`` (ORAS CLI 1.x):
    the empty config ``{}`` and ``application/vnd.oci.image.layer.v1.tar`` layers; the
    Python ``oras`` package (0.2.x) instead pushes no ``artifactType`` and a ``{}`` config of
    type ``application/vnd.unknown.config.v1+json``: ``artifact_type=None,
    config_media_type="application/vnd.unknown.config.v1+json"``. File names are taken as
    given (hostile ones included: the registry does not look at annotations).
    """
    media_types = media_types or {}
    layers = []
    for name, data in files.items():
        if name in media_types:
            mt = media_types[name]
        elif not modelpack:
            mt = OCI_LAYER_TAR
        elif name.endswith((".safetensors", ".bin", ".gguf", ".pt")):
            mt = MODEL_WEIGHT_RAW
        elif name.endswith(".json"):
            mt = MODEL_WEIGHT_CONFIG_RAW
        else:
            mt = MODEL_DOC_RAW
        ann = {TITLE: name}
        if modelpack:
            ann[MODEL_FILEPATH] = name
        layers.append(Blob(data, mt, ann))
    if modelpack:
        config = {
            "descriptor": {"name": "syncbit-test-model", "version": "1.0"},
            "config": {"format": "safetensors"},
            "modelfs": {"type": "layers", "diffIds": [b.digest for b in layers]},
        }
        cfg = Blob(canonical_json(config), config_media_type or MODEL_CONFIG)
    else:
        cfg = Blob(b"{}", config_media_type or OCI_EMPTY)
    m = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        **({"artifactType": artifact_type} if artifact_type else {}),
        "config": cfg.descriptor(),
        "layers": [b.descriptor() for b in layers],
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z", **(annotations or {})},
    }
    return Manifest(canonical_json(m), OCI_MANIFEST, (cfg, *layers))


# -- ready-made sets ------------------------------------------------------------------

def sample_image(seed: int = 0, *, layer_size: int = 16 << 10, docker: bool = False) -> Manifest:
    """An index with linux/amd64 and linux/arm64 (v8): a shared base layer and one layer each."""
    rng = random.Random(seed)
    base = random_layer(rng, f"base{seed}", size=layer_size, docker=docker)
    amd = build_image([base, random_layer(rng, f"amd64-{seed}", size=layer_size, docker=docker)],
                      architecture="amd64", docker=docker)
    arm = build_image([base, random_layer(rng, f"arm64-{seed}", size=layer_size, docker=docker)],
                      architecture="arm64", variant="v8", docker=docker)
    return build_index([amd, arm], docker=docker)


def sample_artifact(seed: int = 0, *, weight_size: int = 64 << 10, modelpack: bool = True) -> Manifest:
    """Model weights as an OCI artifact: two weight shards, a config.json and a README."""
    rng = random.Random(seed)
    files = {
        "model-00001-of-00002.safetensors": random_bytes(rng, weight_size),
        "model-00002-of-00002.safetensors": random_bytes(rng, weight_size // 2 + 7),
        "config.json": json.dumps({"model_type": "test", "seed": seed}).encode(),
        "README.md": b"# a test model\n",
    }
    return build_artifact(files, modelpack=modelpack)


def sample_tags_sharing_layers(seed: int = 0, *, layer_size: int = 64 << 10) -> tuple[Manifest, Manifest]:
    """Two single-platform images (push as two tags) sharing their first two layers."""
    rng = random.Random(seed)
    base = [random_layer(rng, f"shared{seed}-{i}", size=layer_size) for i in range(2)]
    v1 = build_image([*base, random_layer(rng, f"v1-{seed}", size=layer_size)])
    v2 = build_image([*base, random_layer(rng, f"v2-{seed}", size=layer_size)])
    return v1, v2


# -- htpasswd without apache2-utils -----------------------------------------------------

def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A bcrypt hash for htpasswd, from libcrypt (libxcrypt, always on Debian) or ``bcrypt``.

    The registry checks the hash on every request: keep the cost low (Go's minimum is 4).
    """
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", cost, os.urandom(16), 16)
    out = lib.crypt(password.encode(), salt) if salt else None
    if not out or not out.startswith(b"$2"):
        raise RuntimeError("libcrypt cannot make bcrypt hashes; pip install bcrypt")
    return out.decode()


# -- TLS --------------------------------------------------------------------------------

def make_tls(dirpath: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host`` signed by it: (ca.crt, cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dirpath.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = dirpath / "ca.crt", dirpath / "server.crt", dirpath / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# -- auth: the WWW-Authenticate challenge flow, client side --------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


_REPO_PATH = re.compile(r"^/v2/(.+)/(manifests|blobs|tags)/")


def scope_for(method: str, path: str) -> str | None:
    """The token scope a Distribution API request needs (None for ``/v2/`` itself)."""
    m = _REPO_PATH.match(path)
    if not m:
        return None
    actions = "pull" if method in ("GET", "HEAD") else "pull,push"
    return f"repository:{m.group(1)}:{actions}"


class ChallengeAuth(httpx.Auth):
    """Registry auth for httpx (sync and async): answer the 401 challenge, then remember.

    Basic: resend with the credentials, and send them up front from then on. Bearer:
    GET ``realm?service=..&scope=..`` (with basic credentials if any, anonymous
    otherwise), take ``token`` (or ``access_token``) and resend with it; tokens are
    cached per scope. A reference for the real source, small enough to read.
    """

    requires_response_body = True  # the token answer is read inside the flow

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.creds = (username, password) if username is not None else None
        self.basic = False
        self.tokens: dict[str | None, str] = {}
        self.token_requests = 0

    def _basic_header(self) -> str:
        raw = f"{self.creds[0]}:{self.creds[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def auth_flow(self, request: httpx.Request):
        scope = scope_for(request.method, request.url.path)
        if self.basic and self.creds:
            request.headers["Authorization"] = self._basic_header()
        elif scope in self.tokens:
            request.headers["Authorization"] = f"Bearer {self.tokens[scope]}"
        response = yield request
        if response.status_code != 401 or "www-authenticate" not in response.headers:
            return
        scheme, params = parse_challenge(response.headers["www-authenticate"])
        if scheme == "basic":
            if not self.creds:
                return
            self.basic = True
            request.headers["Authorization"] = self._basic_header()
            yield request
        elif scheme == "bearer":
            query = {"service": params.get("service", "")}
            if params.get("scope") or scope:
                query["scope"] = params.get("scope") or scope
            token_req = httpx.Request("GET", params["realm"], params=query)
            if self.creds:
                token_req.headers["Authorization"] = self._basic_header()
            self.token_requests += 1
            token_resp = yield token_req
            if token_resp.status_code != 200:
                return
            body = token_resp.json()
            token = body.get("token") or body.get("access_token")
            self.tokens[scope] = token
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


# -- a token server (Docker registry token auth: JWT, ES256, x5c) ---------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(TrackedHTTPServer):
    """The token server of distribution's ``auth.token`` for tests; no Debian package has one.

    ``GET /token?service=S&scope=repository:NAME:pull,push`` with basic credentials
    from ``users`` returns ``{"token": JWT}`` granting what was asked; without
    credentials only ``pull`` and only if ``anonymous_pull``; bad credentials get 401.
    The JWT is ES256-signed and carries its certificate in ``x5c``; the registry
    trusts that certificate through ``rootcertbundle`` (``cert_path``).
    """

    thread_name, poll_interval = "token-server", 0.05

    def __init__(self, root: Path, users: dict[str, str], *, service: str = "syncbit-test-registry",
                 issuer: str = "syncbit-test-issuer", anonymous_pull: bool = False,
                 ttl: int = 300, host: str = "127.0.0.1") -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users, self.service, self.issuer = dict(users), service, issuer
        self.anonymous_pull, self.ttl = anonymous_pull, ttl
        self.issued: list[tuple[str, list[dict]]] = []  # (subject, access) per token
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbit test token signer")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .sign(self._key, hashes.SHA256()))
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        root.mkdir(parents=True, exist_ok=True)
        self.cert_path = root / "token-signer.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        super().__init__((host, 0), _TokenHandler)

    @property
    def realm(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/token"


    def make_token(self, subject: str, access: list[dict], ttl: int | None = None) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "iat": now, "nbf": now - 10,
                  "exp": now + (self.ttl if ttl is None else ttl), "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(canonical_json(header))}.{_b64url(canonical_json(claims))}".encode()
        r, s_ = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return f"{signing_input.decode()}.{_b64url(r.to_bytes(32, 'big') + s_.to_bytes(32, 'big'))}"

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user is not None else (["pull"] if self.anonymous_pull else [])
            access.append({"type": "repository", "name": name, "actions": [a for a in wanted if a in allowed]})
        return access


class _TokenHandler(BaseHTTPRequestHandler):
    server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        srv = self.server
        parts = urlsplit(self.path)
        if parts.path != "/token":
            return self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
        q = parse_qs(parts.query)
        user = None
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                u, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                u, pw = "", None
            if srv.users.get(u) != pw:
                return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                                  {"WWW-Authenticate": 'Basic realm="syncbit-test-token"'})
            user = u
        if q.get("service", [srv.service])[0] != srv.service:
            return self._send(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
        scopes = [s for v in q.get("scope", []) for s in v.split(" ")]
        access = srv.grant(user, scopes)
        token = srv.make_token(user or "", access)
        with srv._lock:
            srv.issued.append((user or "", access))
        self._send(200, {"token": token, "access_token": token, "expires_in": srv.ttl,
                         "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def do_POST(self) -> None:
        # containerd tries the OAuth2 POST form first and falls back to GET on 404/405.
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "use GET"}]})


# -- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """One access-log line (the registry logs no user name there)."""

    method: str
    path: str  # without the query string
    status: int
    size: int  # response body bytes written


_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')
_BLOB_PATH = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")


class RegistryError(RuntimeError):
    pass


@dataclass
class RegistryServer:
    """``docker-registry serve`` on loopback, its storage and logs under ``root``.

    Auth, one of: none (anonymous pull and push); ``users`` alone: htpasswd basic auth
    (every request needs credentials, ``WWW-Authenticate: Basic``); ``users`` with
    ``token=True``: bearer tokens from a ``TokenServer`` started alongside
    (``WWW-Authenticate: Bearer realm=..,service=..,scope=..``), anonymous pulls
    allowed if ``anonymous_pull``. ``auth`` is the first user's pair.
    ``tls=True`` serves https with a throwaway CA (``ca_file``; ``cert_dir`` is what
    skopeo's ``--src-cert-dir`` takes).
    """

    root: Path
    users: dict[str, str] | None = None
    token: bool = False
    anonymous_pull: bool = False
    tls: bool = False
    host: str = "127.0.0.1"
    port: int = 0  # 0: the kernel picks; kept across restart()
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    ca_file: Path | None = field(default=None, init=False)
    token_server: TokenServer | None = field(default=None, init=False, repr=False)
    _log_mark: int = field(default=0, init=False, repr=False)

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, as in ``oci://<address>/repo:tag`` and ``docker://<address>/repo:tag``."""
        return f"{self.host}:{self.port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    @property
    def cert_dir(self) -> Path:
        """Only ``ca.crt`` (skopeo takes any ``*.key`` in a cert dir for a client key)."""
        return self.root / "certs.d"

    @property
    def access_log_path(self) -> Path:
        return self.root / "access.log"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _config(self) -> str:
        # JSON is YAML: no need for a YAML writer.
        cfg: dict = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir)},
                        "delete": {"enabled": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{self.host}:{self.port}", "secret": "syncbit-test-secret",
                     "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        if self.token:
            if not self.users:
                raise ValueError("token auth needs users")
            if self.token_server is None:
                self.token_server = TokenServer(self.root / "token", self.users, host=self.host,
                                                anonymous_pull=self.anonymous_pull).start()
            ts = self.token_server
            cfg["auth"] = {"token": {"realm": ts.realm, "service": ts.service, "issuer": ts.issuer,
                                     "rootcertbundle": str(ts.cert_path)}}
        elif self.users:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in self.users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "syncbit-test", "path": str(htpasswd)}}
        if self.tls:
            if self.ca_file is None:
                ca, _, _ = make_tls(self.root / "tls", self.host)
                self.cert_dir.mkdir(exist_ok=True)
                self.ca_file = self.cert_dir / "ca.crt"
                shutil.copyfile(ca, self.ca_file)
            cfg["http"]["tls"] = {"certificate": str(self.root / "tls" / "server.crt"),
                                  "key": str(self.root / "tls" / "server.key")}
        return json.dumps(cfg, indent=1)

    def start(self, timeout: float = 10.0) -> RegistryServer:
        exe = shutil.which(REGISTRY_BIN)
        if exe is None:
            raise RegistryError(f"{REGISTRY_BIN} not found: apt-get install docker-registry")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(self._config())
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.access_log_path, "ab") as out, open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen([exe, "serve", str(config)], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.root)
        try:
            self._wait_up(log_start, timeout)
        except BaseException:
            self.close()
            raise
        self.reset_counters()
        return self

    def _wait_up(self, log_start: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.port == 0:
            m = re.search(rb"listening on \S+:(\d+)", self.log_path.read_bytes()[log_start:])
            if m:
                self.port = int(m.group(1))
            else:
                self._check_alive(deadline)
                time.sleep(0.02)
        with self._client(auth=None) as c:
            while True:
                try:
                    if c.get("/v2/").status_code in (200, 401):
                        break
                except httpx.TransportError:
                    pass
                self._check_alive(deadline)
                time.sleep(0.02)

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RegistryError(f"registry did not come up:\n{tail}")

    def stop(self) -> None:
        """Stop the registry process. Storage, port and token server stay: ``start()`` serves it all again."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """Stop the registry and the token server."""
        self.stop()
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None

    def restart(self) -> RegistryServer:
        self.stop()
        return self.start()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- clients

    def _client(self, auth: tuple[str, str] | None | bool = True) -> httpx.Client:
        if auth is True:
            auth = self.auth
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca_file) if self.tls else True
        flow = ChallengeAuth(*auth) if auth else ChallengeAuth()
        return httpx.Client(base_url=self.url, auth=flow, timeout=30, verify=verify)

    def client(self, auth: tuple[str, str] | None | bool = True) -> httpx.Client:
        """An httpx client that answers the registry's challenges (basic or bearer) with the
        first user's credentials, other ``(user, password)``, or none (``auth=None``)."""
        return self._client(auth)

    def skopeo_args(self, prefix: str = "src") -> list[str]:
        """Flags for ``skopeo copy`` (``prefix`` src/dest) or, with ``prefix=""``, ``skopeo inspect``."""
        p = f"--{prefix}-" if prefix else "--"
        out = [f"{p}tls-verify=false"] if not self.tls else [f"{p}cert-dir={self.cert_dir}"]
        if self.auth:
            out.append(f"{p}creds={self.auth[0]}:{self.auth[1]}")
        return out

    def write_auth_file(self, path: Path, user: str | None = None) -> Path:
        """A docker/podman auth file (``{"auths": {"host:port": {"auth": base64(user:pw)}}}``)
        holding one user's credentials for this registry (merged into an existing file)."""
        user = user or self.auth[0]
        data = json.loads(path.read_text()) if path.exists() else {}
        token = base64.b64encode(f"{user}:{self.users[user]}".encode()).decode()
        data.setdefault("auths", {})[self.address] = {"auth": token}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        return path

    def ref(self, repo: str, tag_or_digest: str) -> str:
        """``docker://host:port/repo:tag`` (or ``@sha256:...``) for skopeo."""
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"docker://{self.address}/{repo}{sep}{tag_or_digest}"

    # -- pushing

    def push_blob(self, repo: str, blob: Blob | bytes, client: httpx.Client | None = None) -> bool:
        """Upload a blob (monolithic: POST then PUT ?digest=). False if it was there already."""
        data = blob.data if isinstance(blob, Blob) else blob
        digest = sha256(data)
        with _maybe(client, self) as c:
            if c.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
                return False
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            _expect(r, 202)
            loc = urljoin(self.url + "/", r.headers["Location"])
            loc += ("&" if "?" in loc else "?") + "digest=" + quote(digest)
            r = c.put(loc, content=data, headers={"Content-Type": "application/octet-stream"})
            _expect(r, 201)
            if r.headers.get("Docker-Content-Digest") != digest:
                raise RegistryError(f"registry stored {r.headers.get('Docker-Content-Digest')}, sent {digest}")
            return True

    def push_manifest(self, repo: str, manifest: Manifest, ref: str | None = None,
                      client: httpx.Client | None = None) -> str:
        """PUT the manifest's exact bytes (by digest, or under tag ``ref``), blobs and children first."""
        with _maybe(client, self) as c:
            for child in manifest.children:
                self.push_manifest(repo, child, client=c)
            for b in manifest.blobs:
                self.push_blob(repo, b, client=c)
            r = c.put(f"/v2/{repo}/manifests/{ref or manifest.digest}", content=manifest.data,
                      headers={"Content-Type": manifest.media_type})
            _expect(r, 201)
            got = r.headers.get("Docker-Content-Digest")
            if got != manifest.digest:
                raise RegistryError(f"registry says {got}, pushed {manifest.digest}")
            return got

    def push(self, repo: str, manifest: Manifest, tag: str | None = None) -> str:
        """Push a manifest or index with everything below it; tag it if ``tag``. Returns its digest."""
        with self._client() as c:
            return self.push_manifest(repo, manifest, tag, client=c)

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest by digest (its tags go with it): the "gone upstream" case."""
        with self._client() as c:
            _expect(c.delete(f"/v2/{repo}/manifests/{digest}"), 202)

    # -- misbehaving on purpose

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (manifests are blobs there too)."""
        algo, hexd = digest.split(":", 1)
        return self.data_dir / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def tamper_blob(self, digest: str, data: bytes) -> None:
        """Replace a stored blob's bytes: the registry then serves ``data`` under the old digest
        (``Docker-Content-Digest`` and all; any length) until restored. Works for manifests up
        to a few MiB; past that the registry answers 500 (use ``StubRegistry`` for huge ones)."""
        self.blob_path(digest).write_bytes(data)

    # -- byte counts from the access log

    def _lines(self) -> list[str]:
        # A request is logged when its handler returns, a moment after the client
        # has the last byte: wait until the log stops growing for a bit.
        last = -1
        for _ in range(50):
            size = self.access_log_path.stat().st_size
            if size == last:
                break
            last = size
            time.sleep(0.03)
        with open(self.access_log_path, "rb") as f:
            f.seek(self._log_mark)
            return f.read().decode(errors="replace").splitlines()

    def access_log(self) -> list[Access]:
        """Requests since the last ``reset_counters()`` (or start)."""
        out = []
        for line in self._lines():
            m = _ACCESS.match(line)
            if m:
                method, target, status, size = m.groups()
                out.append(Access(method, target.split("?", 1)[0], int(status), 0 if size == "-" else int(size)))
        return out

    def reset_counters(self) -> None:
        self._lines()  # settle first
        self._log_mark = self.access_log_path.stat().st_size if self.access_log_path.exists() else 0

    def served_bytes(self, path_prefix: str = "/v2/", method: str = "GET") -> int:
        """Response body bytes the registry wrote for requests whose path starts with ``path_prefix``."""
        return sum(a.size for a in self.access_log() if a.method == method and a.path.startswith(path_prefix))

    def blob_bytes(self) -> dict[str, int]:
        """Body bytes served per blob digest (GET /v2/<any repo>/blobs/<digest>, 200 and 206)."""
        out: dict[str, int] = {}
        for a in self.access_log():
            m = _BLOB_PATH.match(a.path)
            if m and a.method == "GET" and a.status in (200, 206):
                out[m.group(2)] = out.get(m.group(2), 0) + a.size
        return out


class _maybe:
    """Use the given client, or open (and close) one of the registry's."""

    def __init__(self, client: httpx.Client | None, reg: RegistryServer) -> None:
        self.client, self.reg, self.own = client, reg, None

    def __enter__(self) -> httpx.Client:
        if self.client is not None:
            return self.client
        self.own = self.reg._client()
        return self.own

    def __exit__(self, *exc) -> None:
        if self.own is not None:
            self.own.close()


def _expect(r: httpx.Response, status: int) -> None:
    if r.status_code != status:
        raise RegistryError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")


def write_registries_conf(path: Path, prefix: str, mirrors: list[str], *, insecure: bool = True) -> Path:
    """A containers-registries.conf(5) that sends pulls of ``prefix`` (``host[:port][/ns]``) to
    ``mirrors`` first (``host:port[/path]`` each; the primary is the fallback). skopeo 1.9
    ignores ``CONTAINERS_REGISTRIES_CONF``: pass ``--registries-conf PATH`` (a global flag)."""
    lines = ["[[registry]]", f'prefix = "{prefix}"', f'location = "{prefix}"',
             f"insecure = {str(insecure).lower()}"]
    for m in mirrors:
        lines += ["", "[[registry.mirror]]", f'location = "{m}"', f"insecure = {str(insecure).lower()}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- a registry that serves what the test says ----------------------------------------------

@dataclass
class StubResponse:
    body: bytes | Callable[[], Iterator[bytes]]
    media_type: str = "application/octet-stream"
    digest: str | None = None  # the Docker-Content-Digest header; None: sha256 of bytes bodies
    length: int | None = None  # for generated bodies; None: no Content-Length, close-delimited
    status: int = 200


class StubRegistry(TrackedHTTPServer):
    """A fake Distribution API (anonymous, read-only) for what no real registry serves:
    a 100 MB manifest, a manifest whose bytes do not match its digest, an endless blob.

    ``serve(repo, manifest, tag)`` loads real content; ``manifests[(repo, ref)]`` and
    ``blobs[(repo, digest)]`` are ``StubResponse``s to overwrite. HEAD and single
    ``Range: bytes=a-b`` requests work for bytes bodies. Not 100% of the API: enough to
    point a source at it.
    """

    thread_name, poll_interval = "stub-registry", 0.05

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.manifests: dict[tuple[str, str], StubResponse] = {}
        self.blobs: dict[tuple[str, str], StubResponse] = {}
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []  # method, path+query, headers
        super().__init__((host, 0), _StubHandler)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def serve(self, repo: str, manifest: Manifest, tag: str | None = None) -> None:
        for child in manifest.children:
            self.serve(repo, child)
        for b in manifest.blobs:
            self.blobs[(repo, b.digest)] = StubResponse(b.data)
        resp = StubResponse(manifest.data, manifest.media_type)
        self.manifests[(repo, manifest.digest)] = resp
        if tag:
            self.manifests[(repo, tag)] = resp


    def __enter__(self) -> StubRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_STUB_PATH = re.compile(r"^/v2/(.+)/(manifests|blobs)/([^/]+)$")


class _StubHandler(BaseHTTPRequestHandler):
    server: StubRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _error(self, status: int, code: str) -> None:
        data = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        with srv._lock:
            srv.requests.append((self.command, self.path, list(self.headers.items())))
        if path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"{}")
            return
        m = _STUB_PATH.match(path)
        if not m:
            return self._error(404, "NAME_UNKNOWN")
        repo, kind, ref = m.groups()
        table = srv.manifests if kind == "manifests" else srv.blobs
        resp = table.get((repo, ref))
        if resp is None:
            return self._error(404, "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN")
        status, body, length = resp.status, resp.body, resp.length
        headers = {"Content-Type": resp.media_type, "Docker-Distribution-Api-Version": "registry/2.0"}
        if isinstance(body, bytes):
            headers["Docker-Content-Digest"] = resp.digest or sha256(body)
            length = len(body)
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if kind == "blobs" and rng and status == 200:
                start = int(rng.group(1))
                end = min(int(rng.group(2)) if rng.group(2) else len(body) - 1, len(body) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                body, status, length = body[start:end + 1], 206, end + 1 - start
            headers["Accept-Ranges"] = "bytes"
        elif resp.digest:
            headers["Docker-Content-Digest"] = resp.digest
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if isinstance(body, bytes):
                self.wfile.write(body)
            else:
                for chunk in body():
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_HEAD = do_GET


def huge_body(size: int, chunk: bytes = b" " * (1 << 20)) -> Callable[[], Iterator[bytes]]:
    """A generated body of ``size`` bytes (a JSON-ish 100 MB manifest without 100 MB of RAM)."""
    def gen() -> Iterator[bytes]:
        yield b'{"schemaVersion":2,"x":"'
        left = size - 24 - 2
        while left > 0:
            n = min(left, len(chunk))
            yield chunk[:n]
            left -= n
        yield b'"}'
    return gen
