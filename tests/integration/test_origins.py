"""Origins as users meet them: no Range, dropped connections, 5xx, changes, hostile listings, outages."""

from __future__ import annotations

import errno
import random
import time

import pytest

from tests.conftest import write_tree

BS = 64 * 1024


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_origin_that_ignores_range(tmp_path, origin_factory, agent_factory):
    data = _data(1, 20 * BS + 5)
    write_tree(tmp_path / "src", {"f.bin": data, "g.bin": data[:1000]})
    origin = origin_factory(tmp_path / "src")
    origin.ignore_range = True  # answers 200 with the whole body to every Range request
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "norange")
    assert (agent.mnt / "norange" / "f.bin").read_bytes() == data
    assert (agent.mnt / "norange" / "g.bin").read_bytes() == data[:1000]


def test_origin_that_drops_connections_mid_body(tmp_path, origin_factory, agent_factory):
    data = _data(2, 30 * BS + 17)
    write_tree(tmp_path / "src", {"f.bin": data})
    origin = origin_factory(tmp_path / "src")
    origin.drop_after = 3 * BS + 100  # every other GET is cut after this many body bytes
    origin.drop_every = 2
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "drops")
    assert (agent.mnt / "drops" / "f.bin").read_bytes() == data
    # The cuts happened and were retried, resuming after the blocks already received.
    # (Plain HTTP bodies are spliced into block files, which reports a cut itself;
    # urllib3 reports IncompleteRead.)
    log = agent.log()
    assert ("bytes short of the requested range" in log or "IncompleteRead" in log) and "failed (attempt 1)" in log


def test_origin_that_returns_5xx_at_times(tmp_path, origin_factory, agent_factory):
    data = _data(3, 25 * BS)
    write_tree(tmp_path / "src", {"a.bin": data, "b.bin": data[::-1]})
    origin = origin_factory(tmp_path / "src")
    origin.fail_every = 3  # every third GET answers 503
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "flaky")
    assert (agent.mnt / "flaky" / "a.bin").read_bytes() == data
    assert (agent.mnt / "flaky" / "b.bin").read_bytes() == data[::-1]
    assert "HTTP 503" in agent.log()


def test_single_file_url(tmp_path, origin_factory, agent_factory):
    data = _data(4, 3 * BS + 1)
    write_tree(tmp_path / "src", {"weights v2.bin": data})
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    out = agent.cli("pull", origin.url + "weights%20v2.bin").stdout.strip()
    assert out == str(agent.mnt / "weights-v2.bin")
    assert (agent.mnt / "weights-v2.bin" / "weights v2.bin").read_bytes() == data


@pytest.mark.parametrize("href", [
    "../../etc/passwd",          # climbs above the origin's root
    "/etc/passwd",               # absolute path elsewhere on the origin
    "..%2F..%2Fsecret",          # encoded traversal inside one segment
    "http://example.invalid/x",  # another host
    "sub/../../x",               # climbs out through a subdirectory
    "a%00b",                     # NUL in a name
    "A" * 300,                   # a component longer than NAME_MAX
    "a%2Fb",                     # an encoded slash: a name that cannot exist
])
def test_hostile_index_links_are_refused(tmp_path, origin_factory, agent_factory, href):
    """An index page that links outside the dataset root refuses the whole listing."""
    write_tree(tmp_path / "src", {"ok.bin": b"fine"})
    origin = origin_factory(tmp_path / "src")
    origin.extra_links = [href]
    agent = agent_factory(block_size=BS)
    r = agent.cli("pull", origin.url, "--name", "hostile", check=False)
    assert r.returncode == 9, r.stderr
    assert any(w in r.stderr for w in ("outside", "escaping", "NUL", "longer than"))
    assert r.stderr.count("\n") == 1  # one line, no traceback
    assert not (agent.mnt / "hostile").exists()


def test_source_changed_under_pinned_snapshot_is_reported(tmp_path, origin_factory, agent_factory):
    data = _data(5, 40 * BS)
    src = write_tree(tmp_path / "src", {"f.bin": data})
    origin = origin_factory(src)
    origin.rate = 1024 * 1024
    agent = agent_factory(block_size=BS, prefetch_concurrency=1, readahead="0")
    agent.cli("pull", origin.url, "--name", "chg", "--no-wait")
    with open(agent.mnt / "chg" / "f.bin", "rb") as f:
        head = f.read(BS)
    assert head == data[:BS]
    # Rewrite the file at the origin while the pinned snapshot is still filling.
    (src / "f.bin").write_bytes(_data(6, 40 * BS))
    origin.rate = None
    deadline = time.monotonic() + 60
    while agent.dataset("chg")["state"] != "failed":
        assert time.monotonic() < deadline, agent.dataset("chg")
        time.sleep(0.2)
    err = agent.dataset("chg")["error"]
    assert "changed since the snapshot" in err and "pull" in err
    # What was verified stays readable; nothing from the new file is mixed in.
    with open(agent.mnt / "chg" / "f.bin", "rb") as f:
        assert f.read(BS) == data[:BS]
        with pytest.raises(OSError) as e:
            f.seek(39 * BS)
            f.read(BS)
        assert e.value.errno == errno.EIO
    assert "read failed: dataset chg file f.bin block 39" in agent.log()
    # Pulling again takes a new snapshot of the new content.
    agent.cli("pull", origin.url, "--name", "chg")
    assert (agent.mnt / "chg" / "f.bin").read_bytes() == _data(6, 40 * BS)


def test_origin_down_gives_eio_after_deadline(tmp_path, origin_factory, agent_factory):
    data = _data(7, 8 * BS)
    write_tree(tmp_path / "src", {"f.bin": data})
    origin = origin_factory(tmp_path / "src")
    origin.rate = 64 * 1024
    agent = agent_factory(block_size=BS, fetch_deadline="2s", readahead="0", prefetch_concurrency=1)
    agent.cli("pull", origin.url, "--name", "down", "--no-wait")
    agent.cli("evict", "down")  # no prefetch: only our read fetches
    origin.stop()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        (agent.mnt / "down" / "f.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - t0 < 30
    assert "read failed: dataset down file f.bin block 0" in agent.log()


@pytest.mark.parametrize("uri,code,words", [
    ("ftp://host/x", 4, "known schemes"),
    ("not a uri", 5, "malformed"),
    ("http://", 5, "no host"),
])
def test_bad_uris_fail_with_one_line(tmp_path, agent_factory, uri, code, words):
    agent = agent_factory()
    r = agent.cli("pull", uri, "--name", "bad", check=False)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_at_origin(tmp_path, origin_factory, agent_factory):
    (tmp_path / "src").mkdir()
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory()
    r = agent.cli("pull", origin.url + "nope/", "--name", "missing", check=False)
    assert r.returncode == 6 and "not found" in r.stderr
