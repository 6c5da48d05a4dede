"""S3 and Hugging Face datasets through the real agent and its mount.

moto's S3 in server mode behind a byte-counting, fault-injecting proxy, and
the Hub look-alike with its separate blob server, all on loopback.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest

BS = 256 * 1024
ENV = pytest.mark.usefixtures("source_env")


def shards(seed: int, n: int = 3, size: int = 5 * BS + 1000) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {f"model-{i:05d}-of-{n:05d}.safetensors": rnd.randbytes(size) for i in range(1, n + 1)}
    files["config.json"] = json.dumps({"seed": seed}).encode()
    files["tokenizer/vocab.txt"] = b"a\nb\nc\n"
    return files


def read_all(root, files) -> None:
    for rel, data in files.items():
        got = (root / rel).read_bytes()
        assert got == data, rel


# -- S3 ---------------------------------------------------------------------

@ENV
def test_s3_prefix_pull_and_read(s3_server, s3_proxy, agent_factory):
    c = s3_server.client()
    c.create_bucket(Bucket="models")
    files = shards(1)
    for rel, data in files.items():
        c.put_object(Bucket="models", Key=f"llama/{rel}", Body=data)
    c.put_object(Bucket="models", Key="llama/", Body=b"")  # a console's folder marker: not a file
    agent = agent_factory(block_size=BS)
    r = agent.cli("pull", "s3://models/llama/", "--endpoint-url", s3_proxy.url, "--region", "us-east-1")
    assert r.stdout.strip() == str(agent.mnt / "llama")
    read_all(agent.mnt / "llama", files)
    st = agent.dataset("llama")
    assert st["state"] == "ready" and st["options"] == {"endpoint_url": s3_proxy.url, "region": "us-east-1"}
    assert s3_proxy.body_bytes("/models/llama/") == sum(map(len, files.values()))
    # One object as a dataset; the endpoint from AWS_ENDPOINT_URL this time.
    r = agent.cli("pull", "s3://models/llama/config.json", "--name", "cfg", "--endpoint-url", s3_proxy.url)
    assert (agent.mnt / "cfg" / "config.json").read_bytes() == files["config.json"]


@ENV
def test_s3_two_prefixes_share_a_file_object(s3_server, s3_proxy, agent_factory):
    """Prefix v2 shares two of three shards with v1: only the changed shard is downloaded."""
    c = s3_server.client()
    c.create_bucket(Bucket="dedup")
    v1 = shards(2)
    v2 = dict(v1)
    v2["model-00002-of-00003.safetensors"] = random.Random(99).randbytes(5 * BS + 1000)
    for prefix, files in (("v1", v1), ("v2", v2)):
        for rel, data in files.items():
            c.put_object(Bucket="dedup", Key=f"{prefix}/{rel}", Body=data)
    agent = agent_factory(block_size=BS)
    agent.cli("pull", "s3://dedup/v1/", "--endpoint-url", s3_proxy.url)
    s3_proxy.reset_counters()
    agent.cli("pull", "s3://dedup/v2/", "--endpoint-url", s3_proxy.url)
    assert s3_proxy.body_bytes("/dedup/") == len(v2["model-00002-of-00003.safetensors"])
    read_all(agent.mnt / "v2", v2)
    assert s3_proxy.body_bytes("/dedup/") == len(v2["model-00002-of-00003.safetensors"])


@ENV
def test_s3_object_overwritten_under_the_snapshot_fails_the_dataset(s3_server, s3_proxy, agent_factory):
    c = s3_server.client()
    c.create_bucket(Bucket="mutable")
    c.put_object(Bucket="mutable", Key="set/a.bin", Body=b"1" * (3 * BS))
    agent = agent_factory(block_size=BS)
    agent.cli("pull", "s3://mutable/set/", "--no-wait", "--endpoint-url", s3_proxy.url)
    agent.cli("evict", "set")  # unpinned and empty: the next read goes to S3
    c.put_object(Bucket="mutable", Key="set/a.bin", Body=b"2" * (3 * BS))
    with pytest.raises(OSError):
        (agent.mnt / "set" / "a.bin").read_bytes()
    assert "changed since the snapshot was pinned" in agent.log()
    r = agent.cli("prefetch", "set", check=False)
    assert r.returncode == 15 and "PreconditionFailed" in r.stderr


# -- Hugging Face --------------------------------------------------------------

@ENV
def test_hf_pull_read_and_second_revision_downloads_only_the_changed_shard(hub, agent_factory):
    hub.create_repo("meta/llama-mini")
    rev1 = shards(3)
    sha1 = hub.commit("meta/llama-mini", rev1)
    hub.tag("meta/llama-mini", "v1", sha1)
    agent = agent_factory(block_size=BS)
    before = hub.blob_bytes_sent
    agent.cli("pull", "hf://meta/llama-mini@v1", "--name", "llama")
    lfs_total = sum(len(d) for d in rev1.values() if len(d) >= hub.lfs_threshold)
    assert hub.blob_bytes_sent - before == lfs_total
    read_all(agent.mnt / "llama", rev1)
    st = agent.dataset("llama")
    assert st["revision"] == sha1 and st["state"] == "ready"

    changed = "model-00002-of-00003.safetensors"
    rev2 = {changed: random.Random(5).randbytes(5 * BS + 1000)}
    sha2 = hub.commit("meta/llama-mini", rev2)
    before = hub.blob_bytes_sent
    agent.cli("pull", "hf://meta/llama-mini@main", "--name", "llama")
    assert hub.blob_bytes_sent - before == len(rev2[changed]), "only the changed shard moves"
    assert agent.dataset("llama")["revision"] == sha2
    read_all(agent.mnt / "llama", {**rev1, **rev2})
    # The old revision stays addressable by name@revision while cached.
    assert (agent.mnt / f"llama@{sha1}" / changed).read_bytes() == rev1[changed]


@ENV
def test_hf_dataset_repo_subdir_and_private_token(hub, agent_factory, monkeypatch):
    hub.create_repo("org/corpus", repo_type="dataset", private=True)
    files = {"train/part-0.csv": b"x,y\n" * 1000, "train/part-1.csv": b"z,w\n" * 2000, "README.md": b"# c\n"}
    hub.commit("org/corpus", files, repo_type="dataset")
    hub.add_token("hf_reader", repos=["org/corpus"])
    agent = agent_factory(block_size=BS)
    r = agent.cli("pull", "hf://datasets/org/corpus/train", "--name", "train", check=False)
    assert r.returncode == 6 and "HF_TOKEN" in r.stderr  # private and no token: not found, with the hint
    agent.stop()
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    agent.start()
    agent.cli("pull", "hf://datasets/org/corpus/train", "--name", "train")
    assert sorted(p.name for p in (agent.mnt / "train").iterdir()) == ["part-0.csv", "part-1.csv"]
    assert (agent.mnt / "train" / "part-1.csv").read_bytes() == files["train/part-1.csv"]
    assert "hf_reader" not in agent.log()
    # The blob server never saw the token.
    assert hub.blob.requests and all(h.get("Authorization") is None for _, _, h in hub.blob.requests)


@ENV
def test_hf_gated_repo_is_one_clear_error(hub, agent_factory):
    hub.create_repo("corp/gated", gated=True)
    hub.commit("corp/gated", shards(4, n=1))
    agent = agent_factory(block_size=BS)
    r = agent.cli("pull", "hf://corp/gated", check=False)
    assert r.returncode == 7
    assert "gated" in r.stderr and "corp/gated" in r.stderr and "HF_TOKEN" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@ENV
def test_hf_whole_file_sha256_mismatch_fails_the_dataset_and_drops_the_blocks(hub, agent_factory):
    hub.create_repo("evil/cdn")
    files = shards(6, n=1)
    hub.commit("evil/cdn", files)
    name = "model-00001-of-00001.safetensors"
    sha = hashlib.sha256(files[name]).hexdigest()
    hub.lfs_store[sha] = bytes(reversed(files[name]))  # the CDN serves other bytes of the same length
    agent = agent_factory(block_size=BS)
    r = agent.cli("pull", "hf://evil/cdn", check=False)
    assert r.returncode == 15
    assert "sha256" in r.stderr and sha in r.stderr
    st = agent.dataset("cdn")
    assert st["state"] == "failed" and st["bytes_cached"] < st["bytes_total"]
    hub.lfs_store[sha] = files[name]  # the CDN is fixed: a new prefetch fetches and verifies again
    agent.cli("prefetch", "cdn")
    assert (agent.mnt / "cdn" / name).read_bytes() == files[name]
    assert agent.dataset("cdn")["state"] == "ready"
    assert "file failed verification" in agent.log() or "whole-file sha256" in agent.log()


@ENV
def test_cli_errors_for_sources_have_distinct_exit_codes(hub, s3_server, s3_proxy, agent_factory, monkeypatch):
    hub.create_repo("org/exists")
    hub.commit("org/exists", {"a.txt": b"a"})
    agent = agent_factory(block_size=BS)
    cases = [
        (["gopher://host/x"], 4, "known schemes"),
        (["s3://"], 5, "malformed"),
        (["hf://only-a-name"], 5, "malformed"),
        (["s3://no-such-bucket/x/", "--endpoint-url", s3_proxy.url], 6, "does not exist"),
        (["hf://org/missing"], 6, "not found"),
        (["hf://org/exists@no-such-branch"], 17, "revision 'no-such-branch' not found"),
    ]
    for args, code, text in cases:
        r = agent.cli("pull", *args, check=False)
        assert (r.returncode, text in r.stderr) == (code, True), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    s3_server.client().create_bucket(Bucket="locked")
    s3_server.client().put_object(Bucket="locked", Key="x/a.bin", Body=b"a")
    agent.stop()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    agent.start()
    r = agent.cli("pull", "s3://locked/x/", "--endpoint-url", s3_proxy.url, check=False)
    assert r.returncode == 7 and "credentials" in r.stderr and "wrong" not in r.stderr


@ENV
def test_hf_token_file_and_relative_revision_names(hub, agent_factory, monkeypatch, tmp_path):
    """The token written by `hf auth login` (HF_HOME/token) is used when HF_TOKEN is not set."""
    hub.create_repo("org/secret-model", private=True)
    files = shards(8, n=1)
    hub.commit("org/secret-model", files, branch="release/2.0")
    hub.add_token("hf_from_file", repos=["org/secret-model"])
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    (hf_home / "token").write_text("hf_from_file\n")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    agent = agent_factory(block_size=BS)
    # A branch name with a slash is percent-encoded, as parse_hf_uri wants it.
    agent.cli("pull", "hf://org/secret-model@release%2F2.0", "--name", "secret")
    read_all(agent.mnt / "secret", files)
    assert agent.dataset("secret")["revision"] == hub.head("org/secret-model", "release/2.0")
    assert "hf_from_file" not in agent.log()
