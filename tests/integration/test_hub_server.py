"""The Hub look-alike in tests/servers/hub.py, checked with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import urllib3

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import (
    HfApi,
    RepoFile,
    RepoFolder,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.servers.hub import HubServer

TOKEN = "hf_test_reader"


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer_oid(data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    return _git_oid(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode())


# 7 files, 4 of them LFS (>= 1024 bytes), in two directory levels.
FILES = {
    "README.md": b"# test model\n",
    "config.json": b'{"hidden": 8}',
    "model.safetensors": _data(1, 5000),
    "tokenizer.json": b'{"vocab": {}}',
    "sub/a.bin": _data(2, 2048),
    "sub/b.txt": b"bee",
    "sub/deeper/c.bin": _data(3, 1024),
}


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """huggingface_hub isolated from the machine: no token, no offline mode, HF_HOME in tmp_path."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    # huggingface_hub reads these once, at import: set its copies too.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    yield tmp_path / "hf" / "hub"
    huggingface_hub.close_session()  # its pooled keep-alive connections point at stopped servers


@pytest.fixture
def hub(hf_cache):
    with HubServer(page_size=3) as srv:
        yield srv
        assert not srv.server_errors, srv.server_errors[0]


@pytest.fixture
def model(hub) -> str:
    hub.create_repo("org/model")
    return hub.commit("org/model", FILES, message="add files")


def _blob_auth_headers(hub) -> list:
    return [h for _, _, h in hub.blob.requests if "authorization" in h]


def test_repo_info_resolves_branch_tag_and_sha(hub, model):
    hub.tag("org/model", "v1.0", "main")
    hub.create_branch("org/model", "feature/x")
    api = HfApi(endpoint=hub.url, token=False)
    for rev in (None, "main", "v1.0", model, "feature/x", "refs/heads/main"):
        info = api.repo_info("org/model", revision=rev)
        assert info.sha == model, rev
        assert info.id == "org/model" and info.private is False and info.gated is False
    assert sorted(s.rfilename for s in info.siblings) == sorted(FILES)
    # The slash in the branch name travels encoded, as the library sends it.
    assert any(p.startswith("/api/models/org/model/revision/feature%2Fx") for _, p, _ in hub.requests)
    # files_metadata=True asks for sizes and LFS metadata.
    info = api.model_info("org/model", revision="v1.0", files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["model.safetensors"].lfs.sha256 == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert sib["model.safetensors"].size == 5000 and sib["config.json"].lfs is None
    assert sib["config.json"].blob_id == _git_oid(FILES["config.json"])
    # A new commit moves the branch, not the tag.
    new = hub.commit("org/model", {"config.json": b"{}"})
    assert api.repo_info("org/model").sha == new != model
    assert api.repo_info("org/model", revision="v1.0").sha == model


def test_list_repo_tree_recursive_with_lfs_metadata_and_pagination(hub, model):
    api = HfApi(endpoint=hub.url, token=False)
    entries = list(api.list_repo_tree("org/model", recursive=True, revision=model))
    files = {e.path: e for e in entries if isinstance(e, RepoFile)}
    dirs = {e.path for e in entries if isinstance(e, RepoFolder)}
    assert set(files) == set(FILES) and dirs == {"sub", "sub/deeper"}
    for path, data in FILES.items():
        f = files[path]
        assert f.size == len(data)
        if len(data) >= 1024:
            assert f.lfs is not None and f.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert f.lfs.size == len(data) and f.lfs.pointer_size > 100
            assert f.blob_id == _pointer_oid(data)  # the git blob is the pointer file
        else:
            assert f.lfs is None and f.blob_id == _git_oid(data)
    # 9 entries at 3 a page: 3 requests, following Link: rel="next".
    tree_calls = [p for m, p, _ in hub.requests if "/tree/" in p]
    assert len(tree_calls) == 3
    assert "cursor=" not in tree_calls[0] and all("cursor=" in p for p in tree_calls[1:])
    # The same listing straight from the endpoint: the JSON the library parses.
    http = urllib3.PoolManager()
    r = http.request("GET", f"{hub.url}/api/models/org/model/tree/main?recursive=true")
    assert r.status == 200 and len(r.json()) == 3
    assert urlsplit(r.headers["Link"].split(";")[0].strip("<>")).netloc == urlsplit(hub.url).netloc
    assert r.headers["Link"].endswith('; rel="next"')


def test_list_repo_tree_subdir_and_missing_path(hub, model):
    api = HfApi(endpoint=hub.url, token=False)
    top = {e.path for e in api.list_repo_tree("org/model", path_in_repo="sub")}
    assert top == {"sub/a.bin", "sub/b.txt", "sub/deeper"}
    deep = {e.path for e in api.list_repo_tree("org/model", path_in_repo="sub", recursive=True)}
    assert deep == top | {"sub/deeper/c.bin"}
    assert {e.path for e in api.list_repo_tree("org/model", path_in_repo="sub/deeper")} == {"sub/deeper/c.bin"}
    root = {e.path for e in api.list_repo_tree("org/model")}
    assert root == {"README.md", "config.json", "model.safetensors", "tokenizer.json", "sub"}
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/model", path_in_repo="nope"))
    # path_in_repo is sent as one encoded segment.
    assert any("/tree/main/sub%2Fdeeper" in p for _, p, _ in hub.requests)


def test_hf_hub_download_lfs_and_regular_files(hub, model, hf_cache):
    for path in ("model.safetensors", "sub/deeper/c.bin", "config.json", "sub/b.txt"):
        local = hf_hub_download("org/model", path, endpoint=hub.url, cache_dir=hf_cache, token=False)
        assert Path(local).read_bytes() == FILES[path], path
    lfs_bytes = len(FILES["model.safetensors"]) + len(FILES["sub/deeper/c.bin"])
    assert hub.blob_bytes_sent == lfs_bytes
    assert hub.bytes_sent_by_path["/org/model/resolve/main/config.json"] == len(FILES["config.json"])
    assert {p.split("?")[0] for m, p, _ in hub.blob.requests if m == "GET"} == {
        f"/lfs/{hashlib.sha256(FILES[p]).hexdigest()}" for p in ("model.safetensors", "sub/deeper/c.bin")}
    # The library asks the hub with HEAD (metadata, redirect not followed), then GETs the CDN URL itself;
    # a regular file takes a HEAD and a GET on the hub.
    sha = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert [(m, p.split("?")[0]) for m, p, _ in hub.requests][:4] == [
        ("HEAD", "/org/model/resolve/main/model.safetensors"), ("GET", f"/lfs/{sha}"),
        ("HEAD", "/org/model/resolve/main/sub/deeper/c.bin"),
        ("GET", f"/lfs/{hashlib.sha256(FILES['sub/deeper/c.bin']).hexdigest()}")]
    assert [(m, p) for m, p, _ in hub.requests][4:6] == [
        ("HEAD", "/org/model/resolve/main/config.json"), ("GET", "/org/model/resolve/main/config.json")]
    # Cached now: with the commit sha as revision, nothing goes on the wire.
    n = len(hub.requests)
    hf_hub_download("org/model", "config.json", revision=model, endpoint=hub.url, cache_dir=hf_cache, token=False)
    assert len(hub.requests) == n


def test_resolve_redirect_headers_and_ranges_on_the_blob_server(hub, model):
    data = FILES["model.safetensors"]
    sha256 = hashlib.sha256(data).hexdigest()
    hub.add_token(TOKEN)
    http = urllib3.PoolManager()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    head = http.request("HEAD", f"{hub.url}/org/model/resolve/main/model.safetensors", headers=auth, redirect=False)
    assert head.status == 302
    assert head.headers["X-Repo-Commit"] == model
    assert head.headers["X-Linked-Etag"] == f'"{sha256}"' and head.headers["ETag"] == f'"{sha256}"'
    assert head.headers["X-Linked-Size"] == str(len(data))
    location = head.headers["Location"]
    assert urlsplit(location).hostname == "127.0.0.2" and urlsplit(location).hostname != urlsplit(hub.url).hostname
    # The CDN answers without Authorization (the URL is signed), with Range.
    r = http.request("GET", location, headers={"Range": "bytes=100-1099"})
    assert r.status == 206 and r.data == data[100:1100]
    assert r.headers["Content-Range"] == f"bytes 100-1099/{len(data)}" and r.headers["ETag"] == f'"{sha256}"'
    assert http.request("GET", location, headers={"Range": "bytes=-10"}).data == data[-10:]
    assert http.request("GET", location, headers={"Range": "bytes=4990-99999"}).data == data[4990:]
    bad = http.request("GET", location, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    h = http.request("HEAD", location)
    assert h.status == 200 and h.headers["Content-Length"] == str(len(data)) and h.data == b""
    full = http.request("GET", location)
    assert full.status == 200 and full.data == data
    assert not _blob_auth_headers(hub)
    # The signature is what opens the door.
    assert http.request("GET", location.replace("Signature=", "Signature=0")).status == 403
    assert http.request("GET", location.split("?")[0], headers=auth).status == 403
    assert http.request("GET", hub.lfs_url(sha256, ttl=-1)).status == 403
    # A CDN that ignores Range.
    hub.blob.ignore_range = True
    r = http.request("GET", location, headers={"Range": "bytes=0-9"})
    assert r.status == 200 and r.data == data and "Accept-Ranges" not in r.headers
    # Regular files come from the hub itself, with Range too.
    r = http.request("GET", f"{hub.url}/org/model/resolve/{model}/config.json", headers={"Range": "bytes=2-7"})
    assert r.status == 206 and r.data == FILES["config.json"][2:8]
    assert r.headers["ETag"] == f'"{_git_oid(FILES["config.json"])}"' and r.headers["X-Repo-Commit"] == model


def test_private_repo_needs_a_token_for_it(hub, hf_cache):
    hub.create_repo("org/secret", private=True)
    hub.create_repo("org/other", private=True)
    hub.commit("org/secret", {"w.bin": _data(4, 3000), "c.json": b"{}"})
    hub.add_token(TOKEN, repos=["org/secret"])
    hub.add_token("hf_other", repos=[("model", "org/other")])
    anon = HfApi(endpoint=hub.url, token=False)
    for call in (lambda: anon.repo_info("org/secret"), lambda: list(anon.list_repo_tree("org/secret")),
                 lambda: hf_hub_download("org/secret", "c.json", endpoint=hub.url, cache_dir=hf_cache, token=False)):
        with pytest.raises(RepositoryNotFoundError) as e:
            call()
        assert not isinstance(e.value, GatedRepoError) and e.value.response.status_code == 401
    # A valid token that may not read it: 404, still "not found".
    with pytest.raises(RepositoryNotFoundError) as e:
        HfApi(endpoint=hub.url, token="hf_other").repo_info("org/secret")
    assert e.value.response.status_code == 404
    # An unknown token is refused everywhere, public repos included (401, not RepoNotFound).
    hub.create_repo("org/public")
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="hf_bogus").repo_info("org/public")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.repo_info("org/secret").private is True
    assert {f.path for f in api.list_repo_tree("org/secret")} == {"w.bin", "c.json"}
    for name in ("w.bin", "c.json"):
        local = hf_hub_download("org/secret", name, endpoint=hub.url, cache_dir=hf_cache, token=TOKEN)
        assert Path(local).read_bytes() == (_data(4, 3000) if name == "w.bin" else b"{}")
    # The token went to the hub, never to the CDN.
    assert any(h.get("Authorization") == f"Bearer {TOKEN}" for _, p, h in hub.requests if "/resolve/" in p)
    assert hub.blob.requests and not _blob_auth_headers(hub)
    assert not [p for _, p, h in hub.requests if p.startswith("/lfs/") and "authorization" in h]


def test_gated_repo(hub, hf_cache):
    hub.create_repo("org/gated", gated=True)
    hub.commit("org/gated", {"README.md": b"# card\n", "w.bin": _data(5, 2000)})
    hub.add_token(TOKEN, repos=["org/gated"])
    hub.add_token("hf_not_approved", repos=[])
    # As on the Hub: the card and the listing are public, the files are not.
    anon = HfApi(endpoint=hub.url, token=False)
    assert anon.repo_info("org/gated").gated == "auto"
    assert {f.path for f in anon.list_repo_tree("org/gated")} == {"README.md", "w.bin"}
    assert Path(hf_hub_download("org/gated", "README.md", endpoint=hub.url, cache_dir=hf_cache,
                                token=False)).read_bytes() == b"# card\n"
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download("org/gated", "w.bin", endpoint=hub.url, cache_dir=hf_cache, token=False)
    assert e.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download("org/gated", "w.bin", endpoint=hub.url, cache_dir=hf_cache, token="hf_not_approved")
    assert e.value.response.status_code == 403
    local = hf_hub_download("org/gated", "w.bin", endpoint=hub.url, cache_dir=hf_cache, token=TOKEN)
    assert Path(local).read_bytes() == _data(5, 2000)
    # A stricter hub gates the API too.
    hub.gated_metadata_public = False
    with pytest.raises(GatedRepoError):
        anon.repo_info("org/gated")
    with pytest.raises(GatedRepoError):
        list(anon.list_repo_tree("org/gated"))


def test_unknown_repo_revision_and_file(hub, model, hf_cache):
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("org/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nothing", "x", endpoint=hub.url, cache_dir=hf_cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("org/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree("org/model", revision="0" * 40))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", "config.json", revision="nope", endpoint=hub.url, cache_dir=hf_cache,
                        token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "missing.txt", endpoint=hub.url, cache_dir=hf_cache, token=False)


def test_squash_makes_old_shas_unknown(hub, model, hf_cache):
    second = hub.commit("org/model", {"config.json": b"{}", "README.md": None})
    new = hub.squash("org/model")
    api = HfApi(endpoint=hub.url, token=False)
    assert api.repo_info("org/model").sha == new and new not in (model, second)
    for old in (model, second):
        with pytest.raises(RevisionNotFoundError):
            api.repo_info("org/model", revision=old)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download("org/model", "config.json", revision=old, endpoint=hub.url, cache_dir=hf_cache,
                            token=False)
    # Same files as before the squash.
    assert {f.path for f in api.list_repo_tree("org/model", recursive=True) if isinstance(f, RepoFile)} == \
        set(FILES) - {"README.md"}
    assert Path(hf_hub_download("org/model", "config.json", revision=new, endpoint=hub.url,
                                cache_dir=hf_cache, token=False)).read_bytes() == b"{}"


def test_dataset_repos(hub, hf_cache):
    hub.create_repo("org/model")  # same id, other type: must not be confused
    hub.create_repo("org/data", repo_type="dataset")
    rows = _data(6, 4000)
    sha = hub.commit("org/data", {"data/train.parquet": rows, "README.md": b"card"}, repo_type="dataset")
    hub.tag("org/data", "v1", sha, repo_type="dataset")
    api = HfApi(endpoint=hub.url, token=False)
    assert api.dataset_info("org/data", revision="v1").sha == sha
    assert api.repo_info("org/data", repo_type="dataset").sha == sha
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("org/data")  # no model of that name
    listing = {f.path: f for f in api.list_repo_tree("org/data", repo_type="dataset", recursive=True)}
    assert listing["data/train.parquet"].lfs.sha256 == hashlib.sha256(rows).hexdigest()
    for path, data in (("data/train.parquet", rows), ("README.md", b"card")):
        local = hf_hub_download("org/data", path, repo_type="dataset", revision="v1", endpoint=hub.url,
                                cache_dir=hf_cache, token=False)
        assert Path(local).read_bytes() == data
    paths = [p for _, p, _ in hub.requests]
    assert any(p.startswith("/api/datasets/org/data/tree/main") for p in paths)
    assert any(p.startswith("/datasets/org/data/resolve/v1/data/train.parquet") for p in paths)


def test_snapshot_download(hub, model, hf_cache):
    folder = snapshot_download("org/model", endpoint=hub.url, cache_dir=hf_cache, token=False)
    got = {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert got == FILES
    assert Path(folder).name == model


def test_fail_next(hub, model, hf_cache):
    http = urllib3.PoolManager(retries=False)
    url = f"{hub.url}/org/model/resolve/main/config.json"
    hub.fail_next(2)
    assert [http.request("GET", url).status for _ in range(3)] == [503, 503, 200]
    # Only matching paths fail; the blob server shares the knob.
    hub.fail_next(1, status=500, paths=["/lfs/"])
    assert http.request("GET", url).status == 200
    loc = http.request("HEAD", f"{hub.url}/org/model/resolve/main/model.safetensors", redirect=False).headers["Location"]
    assert [http.request("GET", loc).status for _ in range(2)] == [500, 200]
    # The library: model_info does not retry, the tree listing retries (http_backoff, 1 s), hf_hub_download
    # retries its HEAD once it has nothing cached, but not the GET of the body.
    api = HfApi(endpoint=hub.url, token=False)
    hub.fail_next(1, paths=["/api/models/"])
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info("org/model")
    assert e.value.response.status_code == 503
    hub.fail_next(1, paths=["/tree/"])
    t = time.monotonic()
    assert len(list(api.list_repo_tree("org/model"))) == 5
    assert 0.9 < time.monotonic() - t < 5
    hub.fail_next(1, paths=["/resolve/"])
    local = hf_hub_download("org/model", "tokenizer.json", endpoint=hub.url, cache_dir=hf_cache, token=False)
    assert Path(local).read_bytes() == FILES["tokenizer.json"]
    hub.fail_next(1, paths=["/lfs/"])
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download("org/model", "sub/a.bin", endpoint=hub.url, cache_dir=hf_cache, token=False)
    assert e.value.response.status_code == 503


def test_hostile_tree_entries_are_sent_as_given(hub, model):
    hostile = [
        {"type": "file", "path": p, "oid": "0" * 40, "size": 1}
        for p in ("../x", "/etc/passwd", "a\x00b", "n" * 4096, "sub/../../up")
    ]
    hub.extra_tree_entries("org/model", hostile)
    http = urllib3.PoolManager()
    body = json.loads(http.request("GET", f"{hub.url}/api/models/org/model/tree/main/sub?recursive=true").data)
    assert [e["path"] for e in body] == ["sub/a.bin", "sub/b.txt", "sub/deeper"]  # page 1 of 3
    listed = [e.path for e in HfApi(endpoint=hub.url, token=False).list_repo_tree("org/model", recursive=True)]
    assert listed[-5:] == [e["path"] for e in hostile]  # the library passes them on untouched


def test_stop_cuts_keep_alive_connections(hf_cache):
    srv = HubServer().start()
    srv.create_repo("o/r")
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/api/models/o/r")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["id"] == "o/r"
    assert not resp.will_close  # an idle keep-alive connection, its handler thread waiting for the next request
    t = time.monotonic()
    srv.stop()
    assert time.monotonic() - t < 2
    assert conn.sock.recv(1) == b""  # the server hung up
    conn.close()


def test_hf_endpoint_is_read_at_import(hub, model, tmp_path, monkeypatch):
    # Setting HF_ENDPOINT once huggingface_hub is imported changes nothing: pass endpoint= instead...
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert HfApi().endpoint == constants.ENDPOINT != hub.url
    # ...or set it before the import, as a fresh process does.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "proc"), HF_HUB_DISABLE_TELEMETRY="1")
    code = (
        "import json, pathlib\n"
        "from huggingface_hub import HfApi, hf_hub_download\n"
        "api = HfApi()\n"
        "out = {'endpoint': api.endpoint, 'sha': api.repo_info('org/model').sha,\n"
        "       'tree': sorted(f.path for f in api.list_repo_tree('org/model', recursive=True)),\n"
        "       'files': {p: pathlib.Path(hf_hub_download('org/model', p)).read_bytes().hex()\n"
        "                 for p in ('model.safetensors', 'config.json')}}\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["endpoint"] == hub.url and out["sha"] == model
    assert set(FILES) | {"sub", "sub/deeper"} == set(out["tree"])
    assert {p: bytes.fromhex(h) for p, h in out["files"].items()} == {
        p: FILES[p] for p in ("model.safetensors", "config.json")}
