"""The OCI registry test fixture (tests/servers/registry.py) against real tools.

A real ``docker-registry`` on loopback, content pushed from Python, read back
with ``skopeo`` and unpacked with ``umoci``: what the ``oci://`` source and the
registry mirror tests will stand on. Also pins the registry behaviours those
tests depend on (Accept negotiation, HEAD, Range, the auth challenges).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.servers.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    TITLE,
    ChallengeAuth,
    RegistryServer,
    StubRegistry,
    StubResponse,
    build_artifact,
    huge_body,
    parse_challenge,
    sample_artifact,
    sample_image,
    sample_tags_sharing_layers,
    sha256,
    write_registries_conf,
)

TOOLS = ("docker-registry", "skopeo", "umoci")
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    # In CI a missing tool is an install bug (tools/install.sh), not a reason to skip.
    if os.environ.get("CI"):
        raise RuntimeError(f"missing {_missing}: apt-get install docker-registry skopeo umoci")
    pytest.skip(f"missing {_missing} (apt-get install docker-registry skopeo umoci)", allow_module_level=True)

ACCEPT_ALL = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"


@pytest.fixture
def registries(tmp_path):
    started: list[RegistryServer] = []

    def make(name: str = "reg", **kw) -> RegistryServer:
        reg = RegistryServer(tmp_path / name, **kw).start()
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.close()


def skopeo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def layout_manifest(layout: Path, tag: str) -> dict:
    """The index.json entry tagged ``tag`` in an OCI layout, after checking the layout's blobs."""
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    return entry


def layout_has(layout: Path, digest: str) -> bool:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()


def test_image_index_round_trip_through_skopeo_and_umoci(registries, tmp_path):
    reg = registries()
    index = sample_image(seed=1)
    assert reg.push("lib/app", index, tag="v1") == index.digest

    assert ok(skopeo("inspect", "--raw", *reg.skopeo_args(""), reg.ref("lib/app", "v1"))).encode() == index.data
    info = json.loads(ok(skopeo("inspect", *reg.skopeo_args(""), reg.ref("lib/app", "v1"))))
    assert info["Digest"] == index.digest and info["Architecture"] == "amd64"

    for arch in ("amd64", "arm64"):
        child = index.child(arch)
        out = tmp_path / f"oci-{arch}"
        ok(skopeo("copy", "--override-arch", arch, *reg.skopeo_args(), reg.ref("lib/app", "v1"), f"oci:{out}:v1"))
        entry = layout_manifest(out, "v1")
        assert entry["digest"] == child.digest  # the platform manifest, byte for byte
        assert all(layout_has(out, b.digest) for b in child.blobs)

        bundle = tmp_path / f"bundle-{arch}"
        r = subprocess.run(["umoci", "unpack", "--image", f"{out}:v1", str(bundle)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        for layer in child.layers:
            for path, data in layer.files.items():
                assert (bundle / "rootfs" / path).read_bytes() == data

    # --all keeps the index; its blobs are the union of both platforms'.
    out = tmp_path / "oci-all"
    ok(skopeo("copy", "--all", *reg.skopeo_args(), reg.ref("lib/app", "v1"), f"oci:{out}:v1"))
    assert layout_manifest(out, "v1")["digest"] == index.digest
    assert all(layout_has(out, d) for d in index.all_blobs())


def test_basic_auth_and_an_artifact(registries, tmp_path):
    reg = registries(users={"alice": "s3cret", "bob": "hunter2"})
    art = sample_artifact(seed=2)
    reg.push("models/tiny", art, tag="1.0")

    r = httpx.get(f"{reg.url}/v2/models/tiny/manifests/1.0", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 401
    assert parse_challenge(r.headers["WWW-Authenticate"]) == ("basic", {"realm": "syncbit-test"})
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    with reg.client(auth=("bob", "wrong")) as c:
        assert c.get("/v2/models/tiny/manifests/1.0", headers={"Accept": OCI_MANIFEST}).status_code == 401
    with reg.client(auth=("bob", "hunter2")) as c:
        got = c.get("/v2/models/tiny/manifests/1.0", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200 and got.content == art.data
        assert got.headers["Docker-Content-Digest"] == art.digest

    # skopeo without credentials is refused; with them (flags or an auth file) it copies.
    assert skopeo("inspect", "--raw", "--tls-verify=false", reg.ref("models/tiny", "1.0")).returncode != 0
    authfile = reg.write_auth_file(tmp_path / "auth.json")
    out = tmp_path / "art"
    ok(skopeo("copy", "--src-tls-verify=false", f"--src-authfile={authfile}", reg.ref("models/tiny", "1.0"),
              f"oci:{out}:1.0"))
    assert layout_manifest(out, "1.0")["digest"] == art.digest
    manifest = json.loads((out / "blobs" / "sha256" / art.digest.removeprefix("sha256:")).read_bytes())
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    titles = {layer["annotations"][TITLE]: layer["digest"] for layer in manifest["layers"]}
    assert set(titles) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                           "config.json", "README.md"}
    for blob in art.layers:
        assert (out / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")).read_bytes() == blob.data

    # An ORAS-style artifact (empty config) goes up and comes back the same.
    oras = build_artifact({"weights.bin": b"\x00" * 1000, "../escape": b"hostile"}, modelpack=False,
                          artifact_type="application/vnd.example.thing")
    assert oras.config.media_type == OCI_EMPTY and oras.config.data == b"{}"
    reg.push("models/oras", oras, tag="v1")
    assert ok(skopeo("inspect", "--raw", *reg.skopeo_args(""), reg.ref("models/oras", "v1"))).encode() == oras.data


def test_token_auth_challenge_flow(registries, tmp_path):
    reg = registries(users={"alice": "s3cret"}, token=True)
    index = sample_image(seed=3)
    reg.push("lib/app", index, tag="v1")

    r = httpx.get(f"{reg.url}/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL})
    assert r.status_code == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params == {"realm": reg.token_server.realm, "service": "syncbit-test-registry",
                      "scope": "repository:lib/app:pull"}

    # Anonymous tokens grant nothing here; alice's grant pull.
    anon = ChallengeAuth()
    with httpx.Client(base_url=reg.url, auth=anon) as c:
        assert c.get("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL}).status_code == 401
    alice = ChallengeAuth("alice", "s3cret")
    with httpx.Client(base_url=reg.url, auth=alice) as c:
        for _ in range(3):
            assert c.get("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL}).content == index.data
    assert alice.token_requests == 1  # cached per scope
    # Bad credentials: the token server says 401 and so does the flow.
    with httpx.Client(base_url=reg.url, auth=ChallengeAuth("alice", "nope")) as c:
        assert c.get("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL}).status_code == 401

    out = tmp_path / "oci"
    ok(skopeo("copy", *reg.skopeo_args(), reg.ref("lib/app", "v1"), f"oci:{out}:v1"))
    assert layout_manifest(out, "v1")["digest"] == index.child("amd64").digest
    assert ("alice", [{"type": "repository", "name": "lib/app", "actions": ["pull"]}]) in reg.token_server.issued


def test_token_auth_anonymous_pull(registries):
    reg = registries(users={"alice": "s3cret"}, token=True, anonymous_pull=True)
    reg.push("lib/app", sample_image(seed=4), tag="v1")
    ok(skopeo("inspect", "--raw", "--tls-verify=false", reg.ref("lib/app", "v1")))
    with reg.client(auth=None) as c:
        assert c.post("/v2/lib/app/blobs/uploads/").status_code == 401  # no anonymous push


def test_shared_layers_counted_once(registries, tmp_path):
    reg = registries()
    v1, v2 = sample_tags_sharing_layers(seed=5)
    reg.push("lib/app", v1, tag="v1")
    reg.push("lib/app", v2, tag="v2")
    shared = {b.digest for b in v1.layers} & {b.digest for b in v2.layers}
    assert len(shared) == 2

    reg.reset_counters()
    out = tmp_path / "layout"  # one layout: skopeo skips blobs it already has there
    ok(skopeo("copy", *reg.skopeo_args(), reg.ref("lib/app", "v1"), f"oci:{out}:v1"))
    ok(skopeo("copy", *reg.skopeo_args(), reg.ref("lib/app", "v2"), f"oci:{out}:v2"))
    served = reg.blob_bytes()
    every = {**v1.all_blobs(), **v2.all_blobs()}
    assert served == {d: b.size for d, b in every.items()}  # each blob exactly once
    assert reg.served_bytes("/v2/lib/app/blobs/") == sum(b.size for b in every.values())
    assert reg.served_bytes("/v2/lib/app/manifests/") >= v1.size + v2.size


def test_skopeo_through_a_mirror(registries, tmp_path):
    """How the mirror tests point skopeo at a mirror: registries.conf, upstream down."""
    upstream, mirror = registries("up"), registries("mirror")
    index = sample_image(seed=10)
    upstream.push("lib/app", index, tag="v1")
    mirror.push("lib/app", index, tag="v1")  # same path: a host-only mirror
    mirror.push("up.example/lib/app", index, tag="v1")  # a mirror serving several upstreams by path
    upstream.stop()

    conf = write_registries_conf(tmp_path / "a.conf", upstream.address, [mirror.address])
    out = tmp_path / "a"
    ok(skopeo("--registries-conf", str(conf), "copy", f"docker://{upstream.address}/lib/app:v1", f"oci:{out}:v1"))
    assert layout_manifest(out, "v1")["digest"] == index.child("amd64").digest

    conf = write_registries_conf(tmp_path / "b.conf", "up.example", [f"{mirror.address}/up.example"])
    mirror.reset_counters()
    ok(skopeo("--registries-conf", str(conf), "copy", "docker://up.example/lib/app:v1", f"oci:{tmp_path / 'b'}:v1"))
    paths = [a.path for a in mirror.access_log()]
    assert paths[0] == "/v2/" and "/v2/up.example/lib/app/manifests/v1" in paths


def test_registry_behaviour_the_source_relies_on(registries):
    reg = registries()
    index = sample_image(seed=6)
    reg.push("lib/app", index, tag="v1")
    docker = sample_image(seed=7, docker=True)
    reg.push("lib/docker", docker, tag="v1")
    layer = index.child("amd64").layers[1]
    with reg.client() as c:
        # Without an Accept that names the index type, 2.8 refuses it (404), and a Docker
        # list is even down-converted to schema 1: always send Accept.
        r = c.get("/v2/lib/app/manifests/v1")
        assert r.status_code == 404 and "OCI index found" in r.text
        assert c.get("/v2/lib/docker/manifests/v1").headers["Content-Type"].endswith("v1+prettyjws")
        r = c.get("/v2/lib/docker/manifests/v1", headers={"Accept": ACCEPT_ALL})
        assert r.headers["Content-Type"] == DOCKER_LIST and r.content == docker.data
        h = c.head("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL})
        assert h.status_code == 200 and h.headers["Docker-Content-Digest"] == index.digest
        assert int(h.headers["Content-Length"]) == index.size and h.headers["Content-Type"] == OCI_INDEX

        h = c.head(f"/v2/lib/app/blobs/{layer.digest}")
        assert h.headers["Docker-Content-Digest"] == layer.digest and int(h.headers["Content-Length"]) == layer.size
        r = c.get(f"/v2/lib/app/blobs/{layer.digest}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == layer.data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{layer.size}"
        # Blobs are per repository: the same digest is unknown under another name.
        assert c.get(f"/v2/lib/docker/blobs/{layer.digest}").json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        # Error codes: unknown tag, unknown repository (only tags/list says NAME_UNKNOWN).
        assert c.get("/v2/lib/app/manifests/nope", headers={"Accept": ACCEPT_ALL}).json()["errors"][0]["code"] \
            == "MANIFEST_UNKNOWN"
        assert c.get("/v2/no/such/tags/list").json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert c.get("/v2/lib/app/tags/list").json() == {"name": "lib/app", "tags": ["v1"]}

        # Stored bytes can be swapped: the registry then serves them under the old digest.
        reg.tamper_blob(layer.digest, b"X" * layer.size)
        r = c.get(f"/v2/lib/app/blobs/{layer.digest}")
        assert r.headers["Docker-Content-Digest"] == layer.digest and sha256(r.content) != layer.digest

    # Stopped, then started again: same port, same content.
    port = reg.port
    reg.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{reg.url}/v2/")
    reg.start()
    assert reg.port == port
    with reg.client() as c:
        assert c.get("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL}).content == index.data


def test_tls_registry(registries, tmp_path):
    reg = registries(tls=True, users={"alice": "s3cret"})
    index = sample_image(seed=8)
    reg.push("lib/app", index, tag="v1")
    assert reg.url.startswith("https://")
    with pytest.raises(httpx.ConnectError):  # not trusted without the test CA
        httpx.get(f"{reg.url}/v2/")
    with reg.client() as c:
        assert c.get("/v2/lib/app/manifests/v1", headers={"Accept": ACCEPT_ALL}).content == index.data
    out = ok(skopeo("inspect", "--raw", *reg.skopeo_args(""), reg.ref("lib/app", "v1")))
    assert out.encode() == index.data


def test_stub_registry_for_what_a_real_one_will_not_serve(tmp_path):
    index = sample_image(seed=9)
    with StubRegistry() as stub:
        stub.serve("lib/app", index, "v1")
        out = tmp_path / "oci"
        ok(skopeo("copy", "--src-tls-verify=false", f"docker://{stub.address}/lib/app:v1", f"oci:{out}:v1"))
        assert layout_manifest(out, "v1")["digest"] == index.child("amd64").digest

        stub.manifests[("lib/app", "huge")] = StubResponse(huge_body(100 << 20), OCI_MANIFEST, length=100 << 20)
        with httpx.stream("GET", f"{stub.url}/v2/lib/app/manifests/huge") as r:
            assert int(r.headers["Content-Length"]) == 100 << 20
            assert len(next(r.iter_bytes())) > 0  # a client should stop reading here
        stub.manifests[("lib/app", "lying")] = StubResponse(b'{"schemaVersion":2}', OCI_MANIFEST,
                                                             digest=index.digest)
        r = httpx.get(f"{stub.url}/v2/lib/app/manifests/lying")
        assert r.headers["Docker-Content-Digest"] == index.digest != sha256(r.content)
