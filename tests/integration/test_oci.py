"""``oci://`` against a real registry on loopback (Debian's docker-registry), read by real tools.

Images and artifacts are pushed through the Distribution API from Python
(tests/servers/registry.py); the dataset is pulled by a real agent and read
from its FUSE mount by umoci and skopeo as an OCI image layout.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest

from syncbit.errors import (
    AccessDenied,
    HostileName,
    MalformedURI,
    SourceError,
    SourceNotFound,
)
from syncbit.sources import open_source
from syncbit.sources.oci import parse_oci
from tests.servers.registry import (
    RegistryServer,
    StubRegistry,
    StubResponse,
    build_artifact,
    huge_body,
    sample_artifact,
    sample_image,
    sample_tags_sharing_layers,
)


@pytest.fixture
def registry(tmp_path):
    reg = RegistryServer(tmp_path / "reg").start()
    yield reg
    reg.close()


async def resolve(uri: str, **options):
    src = await open_source(uri, options)
    try:
        return await src.resolve()
    finally:
        await src.aclose()


def test_uri_parsing():
    assert parse_oci("oci://reg.example:5000/team/model:v1") == ("reg.example:5000", "team/model", "v1", None)
    assert parse_oci("oci://reg/model") == ("reg", "model", "latest", None)
    d = "sha256:" + "a" * 64
    assert parse_oci(f"oci://reg/a/b@{d}") == ("reg", "a/b", None, d)
    for bad in ("oci://reg", "oci://reg/UPPER", "oci://reg/a@sha256:short", "oci://reg/a:bad tag", "oci:///a"):
        with pytest.raises(MalformedURI):
            parse_oci(bad)


async def test_an_index_resolves_to_the_platform_as_an_image_layout(registry):
    index = sample_image(1)
    registry.push("team/app", index, "v1")
    arm = index.child("arm64")
    snap = await resolve(f"oci://{registry.address}/team/app:v1", platform="linux/arm64")
    assert snap.revision == index.digest.removeprefix("sha256:"), "pinned to what the tag named"
    paths = {f.path: f for f in snap.files}
    assert set(paths) == {"oci-layout", "index.json", f"blobs/sha256/{arm.digest[7:]}",
                          f"blobs/sha256/{index.digest[7:]}",  # the index as a blob, for runtimes
                          *(f"blobs/sha256/{d[7:]}" for d in arm.all_blobs())}
    assert await read_all(snap, f"blobs/sha256/{index.digest[7:]}", registry) == index.data
    layout = json.loads(await read_all(snap, "index.json", registry))
    assert layout["manifests"][0]["digest"] == arm.digest
    assert layout["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    for d, blob in arm.all_blobs().items():
        f = paths[f"blobs/sha256/{d[7:]}"]
        assert (f.size, f.digest) == (blob.size, d)
        assert await read_all(snap, f.path, registry) == blob.data
    assert await read_all(snap, f"blobs/sha256/{arm.digest[7:]}", registry) == arm.data
    # Another platform shares the base layer's file object: stored once.
    amd = await resolve(f"oci://{registry.address}/team/app:v1", platform="linux/amd64")
    shared = {f.file_object for f in snap.files} & {f.file_object for f in amd.files}
    assert len(shared) >= 2  # oci-layout and the base layer at least
    with pytest.raises(SourceNotFound, match=r"platform linux/s390x is not in the index \(it has: linux/amd64, "
                                             r"linux/arm64/v8\)"):
        await resolve(f"oci://{registry.address}/team/app:v1", platform="linux/s390x")


async def read_all(snap, path, registry) -> bytes:
    entry = next(f for f in snap.files if f.path == path)
    src = await open_source(snap.uri, dict(snap.options))
    out = bytearray()

    async def sink(b):
        out.extend(b)
    try:
        await src.read_range(entry, 0, entry.size, sink)
    finally:
        await src.aclose()
    return bytes(out)


async def test_artifacts_show_their_files_by_title(registry):
    art = sample_artifact(2)
    registry.push("models/tiny", art, "v1")
    snap = await resolve(f"oci://{registry.address}/models/tiny:v1")
    by_path = {f.path: f for f in snap.files}
    for layer in art.layers:
        title = layer.annotations["org.opencontainers.image.title"]
        assert by_path[title].file_object == by_path[f"blobs/sha256/{layer.digest[7:]}"].file_object
        assert await read_all(snap, title, registry) == layer.data


async def test_errors_users_can_act_on(registry, tmp_path, monkeypatch):
    registry.push("team/app", sample_image(3), "v1")
    with pytest.raises(SourceNotFound, match="unknown repository, tag or digest"):
        await resolve(f"oci://{registry.address}/team/app:nope")
    with pytest.raises(SourceNotFound, match="unknown repository"):
        await resolve(f"oci://{registry.address}/nobody/here:v1")
    hostile = build_artifact({"../escape.bin": b"x"})
    registry.push("team/hostile", hostile, "v1")
    with pytest.raises(HostileName, match="escape"):
        await resolve(f"oci://{registry.address}/team/hostile:v1")
    # A digest reference the registry answers with other bytes (a stub registry: a real one would not).
    stub = StubRegistry().start()
    try:
        good = sample_image(4).child("amd64")
        stub.serve("team/app", good, "v1")
        wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
        stub.manifests[("team/app", wrong)] = stub.manifests[("team/app", good.digest)]
        with pytest.raises(SourceError, match="digest mismatch"):
            await resolve(f"oci://{stub.address}/team/app@{wrong}")
        stub.manifests[("team/big", "v1")] = StubResponse(huge_body(100 * 2**20), "application/vnd.oci.image.manifest.v1+json")
        with pytest.raises(SourceError, match="refused"):
            await resolve(f"oci://{stub.address}/team/big:v1")
    finally:
        stub.stop()


@pytest.mark.parametrize("mode", ["basic", "token"])
async def test_basic_and_bearer_auth_with_an_auth_file(tmp_path, monkeypatch, mode):
    reg = RegistryServer(tmp_path / "reg", users={"alice": "s3cret"}, token=(mode == "token")).start()
    try:
        reg.push("private/app", sample_image(5), "v1")
        uri = f"oci://{reg.address}/private/app:v1"
        with pytest.raises(AccessDenied):
            await resolve(uri, platform="linux/amd64")
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.write_auth_file(tmp_path / "auth.json")))
        snap = await resolve(uri, platform="linux/amd64")
        layer = next(f for f in snap.files if f.path.startswith("blobs/") and f.size > 1000)
        assert len(await read_all(snap, layer.path, reg)) == layer.size
    finally:
        reg.close()


def test_pulled_image_is_a_layout_umoci_and_skopeo_read_from_the_mount(tmp_path, registry, agent_factory):
    """The dataset through a real agent's FUSE mount: umoci unpacks it, skopeo copies it digest for digest;
    a second tag sharing layers takes only its own layer from the registry."""
    v1, v2 = sample_tags_sharing_layers(6)
    registry.push("team/app", v1, "v1")
    registry.push("team/app", v2, "v2")
    agent = agent_factory()
    registry.reset_counters()
    agent.cli("pull", f"oci://{registry.address}/team/app:v1", "--name", "app-v1")
    layout = agent.mnt / "app-v1"
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True)
    for layer in v1.layers:
        for name, data in layer.files.items():
            assert (bundle / "rootfs" / name).read_bytes() == data
    copy = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:v1", f"oci:{copy}:v1"], check=True, capture_output=True)
    index = json.loads((copy / "index.json").read_text())
    manifest = json.loads((copy / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    assert [d["digest"] for d in manifest["layers"]] == [b.digest for b in v1.layers]
    for blob in v1.all_blobs().values():
        assert hashlib.sha256((copy / "blobs" / "sha256" / blob.digest[7:]).read_bytes()).hexdigest() == blob.digest[7:]
    first = registry.blob_bytes()
    assert all(first.get(b.digest) == b.size for b in v1.layers), first

    registry.reset_counters()
    agent.cli("pull", f"oci://{registry.address}/team/app:v2", "--name", "app-v2")
    second = registry.blob_bytes()
    shared = {b.digest for b in v1.layers} & {b.digest for b in v2.layers}
    assert len(shared) == 2 and not any(second.get(d) for d in shared), second
    assert second[v2.layers[-1].digest] == v2.layers[-1].size
    assert (agent.mnt / "app-v2" / "blobs" / "sha256" / v2.layers[-1].digest[7:]).read_bytes() == v2.layers[-1].data


def test_a_blob_that_does_not_match_its_digest_fails_the_pull(tmp_path, registry, agent_factory):
    """The registry serves other bytes under a layer's digest: the pull fails (DatasetFailed, exit 15)
    saying which blob and both digests, and the blob's cached blocks are dropped."""
    img = sample_tags_sharing_layers(7)[0]
    registry.push("team/app", img, "v1")
    victim = img.layers[-1]
    registry.tamper_blob(victim.digest, victim.data[:-1] + bytes([victim.data[-1] ^ 1]))
    agent = agent_factory()
    r = agent.cli("pull", f"oci://{registry.address}/team/app:v1", "--name", "app", check=False)
    assert r.returncode == 15, r.stderr
    assert f"blobs/sha256/{victim.digest[7:]}: whole-file sha256 of the fetched bytes is" in r.stderr
    assert f"the source's metadata says {victim.digest[7:]}" in r.stderr
    assert agent.dataset("app")["state"] == "failed"


def _copy_through(mirror: str, ref: str, dest) -> dict:
    """``skopeo copy`` from the mirror into an OCI directory; its manifest."""
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{mirror}/{ref}", f"oci:{dest}:x"],
                   check=True, capture_output=True, text=True)
    index = json.loads((dest / "index.json").read_text())
    return json.loads((dest / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())


def test_registry_mirror_serves_assigned_images_with_the_upstream_gone(tmp_path, registry, agent_factory):
    from tests.conftest import _free_port

    v1, _ = sample_tags_sharing_layers(8)
    registry.push("team/app", v1, "v1")
    mirror = f"127.0.0.1:{_free_port()}"
    agent = agent_factory(registry_mirror_listen=mirror)
    agent.cli("pull", f"oci://{registry.address}/team/app:v1", "--name", "app")
    registry.stop()  # air-gapped from here on

    manifest = _copy_through(mirror, "team/app:v1", tmp_path / "copy")
    assert manifest == json.loads(v1.data)
    for blob in v1.all_blobs().values():
        assert (tmp_path / "copy" / "blobs" / "sha256" / blob.digest[7:]).read_bytes() == blob.data
    # By digest too, HEAD and Range, as runtimes ask.
    import httpx

    with httpx.Client(base_url=f"http://{mirror}", timeout=10) as c:
        assert c.get("/v2/").status_code == 200
        r = c.head(f"/v2/team/app/manifests/{v1.digest}")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == v1.digest
        assert r.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
        layer = v1.layers[0]
        r = c.get(f"/v2/team/app/blobs/{layer.digest}", headers={"Range": "bytes=10-99"})
        assert r.status_code == 206 and r.content == layer.data[10:100]
        r = c.get("/v2/team/app/manifests/v2")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert c.get(f"/v2/team/app/blobs/sha256:{'0' * 64}").status_code == 404
        assert c.get("/v2/team/app/blobs/../../etc/passwd").status_code == 404
        assert c.get("/v2/team/app/blobs/sha256:nothex").status_code == 400


def test_registry_mirror_pulls_through_an_image_that_is_no_dataset(tmp_path, registry, agent_factory):
    import httpx

    from tests.conftest import _free_port

    v1, v2 = sample_tags_sharing_layers(9)
    registry.push("team/app", v1, "v1")
    registry.push("team/app", v2, "v2")
    mirror = f"127.0.0.1:{_free_port()}"
    agent = agent_factory(registry_mirror_listen=mirror, registry_mirror_pull_through=True)
    agent.cli("pull", f"oci://{registry.address}/team/app:v1", "--name", "app")
    registry.reset_counters()
    with httpx.Client(base_url=f"http://{mirror}", timeout=30) as c:
        # containerd names the upstream with ?ns=; without it the mirror cannot know where to pull from.
        assert c.get("/v2/team/app/manifests/v2").status_code == 404
        r = c.get("/v2/team/app/manifests/v2", params={"ns": registry.address})
        assert r.status_code == 200 and r.content == v2.data
        for blob in v2.layers:
            r = c.get(f"/v2/team/app/blobs/{blob.digest}", params={"ns": registry.address})
            assert r.status_code == 200 and r.content == blob.data
    served = registry.blob_bytes()
    shared = {b.digest for b in v1.layers} & {b.digest for b in v2.layers}
    assert not any(served.get(d) for d in shared), "shared layers came from the cache"
    names = [d["name"] for d in agent.status()["datasets"]]
    assert f"mirror-{registry.address.replace(':', '-')}-team-app-v2" in names


def test_plain_http_only_for_loopback_and_listed_registries(monkeypatch):
    from syncbit.sources.oci import OciSource

    assert OciSource("oci://127.0.0.1:5000/a").base == "http://127.0.0.1:5000/v2/a/"
    assert OciSource("oci://localhost/a").base == "http://localhost/v2/a/"
    assert OciSource("oci://reg.lan:5000/a").base == "https://reg.lan:5000/v2/a/"
    monkeypatch.setenv("SYNCBIT_INSECURE_REGISTRIES", "other:1, reg.lan:5000")
    assert OciSource("oci://reg.lan:5000/a").base == "http://reg.lan:5000/v2/a/"
    assert OciSource("oci://reg.lan/a").base == "https://reg.lan/v2/a/"


@pytest.fixture
def containerd(tmp_path):
    """A containerd daemon of its own (Debian's), on a private socket and root."""
    base = tmp_path / "containerd"
    base.mkdir()
    sock = base / "sock"
    log = open(base / "log", "wb")
    proc = subprocess.Popen(["containerd", "--root", str(base / "root"), "--state", str(base / "state"),
                             "--address", str(sock), "--config", "/dev/null"], stdout=log, stderr=log)
    try:
        for _ in range(100):
            if subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("containerd did not start: " + (base / "log").read_text()[-2000:])
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True)


def test_containerd_pulls_through_the_mirror_with_the_registry_gone(tmp_path, registry, agent_factory, containerd):
    """containerd's hosts.toml from docs/oci.md, the mirror as the only server: the image was
    assigned (pulled) ahead of time, the registry is stopped, and `ctr images pull` unpacks it."""
    from tests.conftest import _free_port

    v1, _ = sample_tags_sharing_layers(10)
    registry.push("team/app", v1, "v1")
    mirror = f"127.0.0.1:{_free_port()}"
    agent = agent_factory(registry_mirror_listen=mirror)
    agent.cli("pull", f"oci://{registry.address}/team/app:v1", "--name", "app")
    registry.stop()
    hosts = tmp_path / "certs.d" / registry.address
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{mirror}"\n\n[host."http://{mirror}"]\n'
                                      f'  capabilities = ["pull", "resolve"]\n')
    r = subprocess.run(["ctr", "--address", str(containerd), "images", "pull", "--hosts-dir",
                        str(tmp_path / "certs.d"), f"{registry.address}/team/app:v1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + agent.log()[-3000:]
    listed = subprocess.run(["ctr", "--address", str(containerd), "images", "ls"], capture_output=True,
                            text=True, check=True).stdout
    assert v1.digest in listed, listed


def test_an_image_assigned_by_the_control_plane_is_served_by_the_mirror_air_gapped(
        tmp_path, registry, server_factory, agent_factory):
    from tests.conftest import _free_port
    from tests.integration.test_control_plane import cli, wait_until

    v1, _ = sample_tags_sharing_layers(11)
    registry.push("team/app", v1, "v1")
    server = server_factory()
    mirror = f"127.0.0.1:{_free_port()}"
    agent_factory("n0", node_name="n0", server=server.url, heartbeat_interval="0.5s",
                  registry_mirror_listen=mirror)
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="node registered")
    cli(server, "dataset", "add", "app", f"oci://{registry.address}/team/app:v1")
    cli(server, "assign", "app", "--nodes", "n0")
    cli(server, "wait", "app", "--timeout", "60")
    registry.stop()
    manifest = _copy_through(mirror, "team/app:v1", tmp_path / "copy")
    assert manifest == json.loads(v1.data)
    for blob in v1.all_blobs().values():
        assert (tmp_path / "copy" / "blobs" / "sha256" / blob.digest[7:]).read_bytes() == blob.data
