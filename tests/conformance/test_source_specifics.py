"""What one source does that the others have no counterpart for: S3 pagination, AWS profiles and
endpoint variables, versioned pins; Hub revisions, subdirs, cross-repo and cross-revision file objects."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from syncbit.errors import RevisionNotFound, SourceChanged, SourceNotFound
from syncbit.sources import open_source

pytestmark = pytest.mark.usefixtures("source_env")


async def test_s3_listing_past_1000_keys(s3_server):
    c = s3_server.client()
    c.create_bucket(Bucket="many-keys")
    keys = [f"set/part-{i:05d}.txt" for i in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: c.put_object(Bucket="many-keys", Key=k, Body=k.encode()), keys))
    snap = await (await open_source("s3://many-keys/set/", {"endpoint_url": s3_server.url})).resolve()
    assert [f.path for f in snap.files] == [k.removeprefix("set/") for k in keys]


async def test_s3_credentials_from_a_profile_and_endpoint_from_the_environment(s3_server, tmp_path, monkeypatch):
    c = s3_server.client()
    c.create_bucket(Bucket="profiled")
    c.put_object(Bucket="profiled", Key="d/a.bin", Body=b"abc")
    creds = tmp_path / "aws-credentials"
    creds.write_text(f"[research]\naws_access_key_id = {s3_server.credentials.access_key}\n"
                     f"aws_secret_access_key = {s3_server.credentials.secret_key}\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "research")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    src = await open_source("s3://profiled/d/")
    snap = await src.resolve()
    assert [f.path for f in snap.files] == ["a.bin"]
    out = bytearray()

    async def sink(b):
        out.extend(b)

    await src.read_range(snap.files[0], 0, 3, sink)
    assert out == b"abc"


async def test_s3_versioned_object_deleted_under_the_snapshot_still_reads_its_version(s3_server):
    c = s3_server.client()
    c.create_bucket(Bucket="versions")
    c.put_bucket_versioning(Bucket="versions", VersioningConfiguration={"Status": "Enabled"})
    c.put_object(Bucket="versions", Key="v/a.bin", Body=b"first")
    src = await open_source("s3://versions/v/", {"endpoint_url": s3_server.url})
    snap = await src.resolve()
    assert ",version=" in snap.files[0].validator
    c.delete_object(Bucket="versions", Key="v/a.bin")  # a delete marker on top
    out = bytearray()

    async def sink(b):
        out.extend(b)

    await src.read_range(snap.files[0], 0, 5, sink)
    assert out == b"first"
    with pytest.raises(SourceNotFound):  # the latest version is a delete marker: nothing to list
        await src.resolve()


async def test_s3_single_object_uri(s3_server):
    c = s3_server.client()
    c.create_bucket(Bucket="single")
    c.put_object(Bucket="single", Key="models/one.bin", Body=b"1" * 10)
    c.put_object(Bucket="single", Key="models/one.bin.sha256", Body=b"x")
    snap = await (await open_source("s3://single/models/one.bin", {"endpoint_url": s3_server.url})).resolve()
    assert [(f.path, f.size) for f in snap.files] == [("one.bin", 10)]


async def test_hf_revisions_resolve_to_commits_and_share_file_objects(hub):
    hub.create_repo("org/revs")
    big = b"W" * 5000
    sha1 = hub.commit("org/revs", {"w.bin": big, "cfg.json": b"{}", "sub/x.txt": b"x"})
    hub.tag("org/revs", "v1", sha1)
    sha2 = hub.commit("org/revs", {"cfg.json": b'{"a": 1}'})
    by_tag = await (await open_source("hf://org/revs@v1")).resolve()
    by_sha = await (await open_source(f"hf://org/revs@{sha1}")).resolve()
    head = await (await open_source("hf://org/revs")).resolve()
    assert by_tag.revision == by_sha.revision == sha1 and head.revision == sha2
    assert by_tag.id != head.id
    fo = {s.revision: {f.path: f.file_object for f in s.files} for s in (by_tag, head)}
    assert fo[sha1]["w.bin"] == fo[sha2]["w.bin"] and fo[sha1]["cfg.json"] != fo[sha2]["cfg.json"]
    w = next(f for f in head.files if f.path == "w.bin")
    assert w.digest.startswith("sha256:") and next(f for f in head.files if f.path == "cfg.json").digest \
        .startswith("git-sha1:")
    # Another repo holding the same LFS file shares its file object (same endpoint).
    hub.create_repo("other/fork")
    hub.commit("other/fork", {"renamed.bin": big})
    fork = await (await open_source("hf://other/fork")).resolve()
    assert fork.files[0].file_object == fo[sha1]["w.bin"]
    # A subdir, and a subdir naming one file.
    sub = await (await open_source("hf://org/revs/sub")).resolve()
    assert [f.path for f in sub.files] == ["x.txt"]
    one = await (await open_source("hf://org/revs/w.bin")).resolve()
    assert [(f.path, f.size) for f in one.files] == [("w.bin", 5000)]
    with pytest.raises(SourceNotFound):
        await (await open_source("hf://org/revs/no/such/dir")).resolve()
    with pytest.raises(RevisionNotFound):
        await (await open_source("hf://org/revs@v9")).resolve()


async def test_hf_history_rewritten_under_the_snapshot(hub):
    hub.create_repo("org/squashed")
    hub.commit("org/squashed", {"w.bin": b"A" * 3000})
    old = hub.commit("org/squashed", {"w.bin": b"B" * 3000})
    src = await open_source("hf://org/squashed")
    snap = await src.resolve()
    assert snap.revision == old
    hub.squash("org/squashed")  # the pinned sha is gone
    with pytest.raises(SourceChanged):
        await src.read_range(snap.files[0], 0, 10, _discard)


async def _discard(b):
    pass


async def test_http_server_root_without_a_trailing_slash_is_its_index(tmp_path):
    """``http://host:port`` (no path) once failed every retry with urllib3's "No host specified"."""
    from syncbit.demo.origin import OriginServer

    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_bytes(b"de")
    origin = OriginServer(tmp_path).start()
    try:
        src = await open_source(origin.url.rstrip("/"))
        snap = await src.resolve()
        assert sorted(f.path for f in snap.files) == ["a.txt", "d/b.txt"]
        await src.aclose()
    finally:
        origin.stop()
