"""A real agent, a real FUSE mount, a real HTTP origin on loopback."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import write_tree

BS = 64 * 1024  # small blocks: many blocks per file, partial last blocks


def make_dataset(root, seed=1):
    rnd = random.Random(seed)
    files = {
        "model-00001-of-00002.safetensors": rnd.randbytes(5 * BS + 123),
        "model-00002-of-00002.safetensors": rnd.randbytes(3 * BS),  # exact multiple
        "data/train set ü.csv": b"a,b\n" + b"".join(f"{i},{i * i}\n".encode() for i in range(5000)),
        "empty.txt": b"",
        "deep/a/b/c/d/e/f/g/leaf.bin": rnd.randbytes(BS // 3),
        "one byte": b"x",
    }
    write_tree(root, files)
    return files


def test_pull_shows_every_file_with_exact_bytes(tmp_path, origin_factory, agent_factory):
    files = make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)

    r = agent.cli("pull", origin.url, "--name", "ds")
    assert r.stdout.strip() == str(agent.mnt / "ds")
    for rel, data in files.items():
        assert (agent.mnt / "ds" / rel).read_bytes() == data, rel
        assert (agent.mnt / "ds" / rel).stat().st_size == len(data)
    listed = sorted(str(p.relative_to(agent.mnt / "ds")) for p in (agent.mnt / "ds").rglob("*") if p.is_file())
    assert listed == sorted(files)

    st = agent.dataset("ds")
    assert st["state"] == "ready"
    assert st["bytes_cached"] == st["bytes_total"] == sum(map(len, files.values()))
    assert st["pinned"] is True
    # Reading a complete dataset sends nothing more to the origin.
    sent = origin.bytes_sent
    for rel in files:
        (agent.mnt / "ds" / rel).read_bytes()
    assert origin.bytes_sent == sent


def test_lazy_read_before_prefetch(tmp_path, origin_factory, agent_factory):
    """--no-wait registers and returns; reads are served at once from the origin."""
    files = make_dataset(tmp_path / "src", seed=2)
    origin = origin_factory(tmp_path / "src")
    origin.rate = 2 * 1024 * 1024  # slow enough that prefetch is not done before we read
    agent = agent_factory(block_size=BS, prefetch_concurrency=1)
    agent.cli("pull", origin.url, "--name", "lazy", "--no-wait")
    path = agent.mnt / "lazy" / "model-00001-of-00002.safetensors"
    with open(path, "rb") as f:
        f.seek(4 * BS + 7)
        assert f.read(100) == files["model-00001-of-00002.safetensors"][4 * BS + 7:4 * BS + 107]
    assert (agent.mnt / "lazy" / "data/train set ü.csv").read_bytes() == files["data/train set ü.csv"]


def test_mount_is_read_only(tmp_path, origin_factory, agent_factory):
    make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "ro")
    target = agent.mnt / "ro" / "one byte"
    for attempt in (
        lambda: open(target, "r+b"),
        lambda: open(target, "wb"),
        lambda: open(agent.mnt / "ro" / "new", "wb"),
        lambda: os.mkdir(agent.mnt / "ro" / "d"),
        lambda: os.unlink(target),
        lambda: os.rename(target, agent.mnt / "ro" / "x"),
        lambda: os.chmod(target, 0o777),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert target.read_bytes() == b"x"


def test_status_json_shape(tmp_path, origin_factory, agent_factory):
    make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS, cache_quota="1GiB")
    agent.cli("pull", origin.url, "--name", "shape")
    (agent.mnt / "shape" / "one byte").read_bytes()
    st = json.loads(agent.cli("status", "--json").stdout)
    assert set(st) >= {"node_name", "mountpoint", "cache", "datasets", "source_bytes"}
    assert st["cache"]["quota"] == 2**30
    assert st["cache"]["high_watermark"] < st["cache"]["quota"]
    assert 0 <= st["cache"]["hit_ratio"] <= 1 and st["cache"]["hits"] >= 1
    (d,) = st["datasets"]
    assert set(d) >= {"name", "uri", "snapshot", "revision", "bytes_total", "bytes_cached", "state", "pinned",
                      "error", "path"}
    human = agent.cli("status").stdout
    assert "shape" in human and "ready" in human


def test_concurrent_readers_random_offsets(tmp_path, origin_factory, agent_factory):
    """8 processes read random ranges of a lazily filled file; every byte matches; one fetch per block."""
    rnd = random.Random(3)
    data = rnd.randbytes(40 * BS + 999)
    write_tree(tmp_path / "src", {"big.bin": data})
    (tmp_path / "expected.bin").write_bytes(data)
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS, readahead="0", prefetch_concurrency=1)
    agent.cli("pull", origin.url, "--name", "conc", "--no-wait")
    # Stop background prefetch from racing us: evict unpins, cancels it and
    # drops what it fetched; from here on only the readers fetch.
    agent.cli("evict", "conc")
    assert agent.dataset("conc")["bytes_cached"] == 0
    origin.bytes_sent = 0
    reader = (
        "import os, random, sys\n"
        "path, exp, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "r = random.Random(seed); want = open(exp, 'rb').read()\n"
        "fd = os.open(path, os.O_RDONLY)\n"
        "for _ in range(200):\n"
        "    off = r.randrange(len(want)); n = r.randrange(1, 3 * 65536)\n"
        "    got = os.pread(fd, n, off)\n"
        "    assert got == want[off:off + n], (off, n)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", reader, str(agent.mnt / "conc" / "big.bin"),
                               str(tmp_path / "expected.bin"), str(i)]) for i in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    # Each block left the origin at most once, however many readers missed it.
    assert origin.bytes_sent <= len(data)


def test_daemon_detaches_and_unmount_stops_it(tmp_path, origin_factory, agent_factory):
    make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(start=False, block_size=BS)
    r = subprocess.run([sys.executable, "-m", "syncbit", "daemon", "--config", str(agent.config_path)],
                       env=agent.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(agent.mnt)  # the command returned once the mount was live
    agent.cli("pull", origin.url, "--name", "d")
    assert (agent.mnt / "d" / "one byte").read_bytes() == b"x"
    agent.cli("unmount")
    assert not os.path.ismount(agent.mnt)
    assert not agent.sock.exists()


def test_a_detached_agent_that_cannot_start_exits_with_its_own_reason(tmp_path, agent_factory):
    # A second agent on the same cache directory, detached: exit 11 as in
    # the foreground (it used to be 16, "the agent exited with status 11").
    first = agent_factory("first")
    second = agent_factory("second", start=False, cache_dir=str(first.cache))
    r = subprocess.run([sys.executable, "-m", "syncbit", "daemon", "--config", str(second.config_path)],
                       env=second.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 11, r.stderr
    assert "already running on the cache directory" in r.stderr


def test_sigterm_unmounts_and_restart_keeps_cache(tmp_path, origin_factory, agent_factory):
    files = make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "keep")
    assert agent.stop() == 0
    assert not os.path.ismount(agent.mnt)
    sent = origin.bytes_sent
    agent.start()
    assert agent.dataset("keep")["state"] == "ready"
    for rel, data in files.items():
        assert (agent.mnt / "keep" / rel).read_bytes() == data
    assert origin.bytes_sent == sent  # served from the cache kept across restarts


def test_stale_mount_from_crashed_agent_is_cleaned(tmp_path, origin_factory, agent_factory):
    make_dataset(tmp_path / "src")
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "st")
    agent.kill9()
    with pytest.raises(OSError) as e:
        os.listdir(agent.mnt)
    assert e.value.errno == errno.ENOTCONN  # what users see after a crash
    agent.start()
    assert (agent.mnt / "st" / "one byte").read_bytes() == b"x"
    assert "stale mount" in agent.log()


def test_second_agent_on_same_socket_is_refused(tmp_path, agent_factory):
    agent = agent_factory()
    r = subprocess.run([sys.executable, "-m", "syncbit", "daemon", "--foreground", "--config",
                        str(agent.config_path)], env=agent.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 11
    assert "already running" in r.stderr
    assert os.path.ismount(agent.mnt)


def test_second_agent_on_same_cache_dir_is_refused(tmp_path, origin_factory, agent_factory):
    # Another socket and mountpoint, the same cache directory: the second
    # agent's start-up scan would delete the first one's temp files (its
    # pull then failed with ENOENT on a spool file) and evict under it.
    files = make_dataset(tmp_path / "src", seed=4)
    origin = origin_factory(tmp_path / "src")
    first = agent_factory("first", block_size=BS)
    second = agent_factory("second", start=False, block_size=BS, cache_dir=str(first.cache))
    second.start(wait=False)
    assert second.proc.wait(timeout=60) == 11
    assert f"an agent is already running on the cache directory {first.cache}" in second.log()
    assert not os.path.ismount(second.mnt)
    first.cli("pull", origin.url, "--name", "mine")
    for rel, data in files.items():
        assert (first.mnt / "mine" / rel).read_bytes() == data
    # The lock goes with its process, also a killed one.
    first.kill9()
    second.start()
    second.cli("pull", origin.url, "--name", "mine")
    for rel, data in files.items():
        assert (second.mnt / "mine" / rel).read_bytes() == data


def test_second_agent_on_a_live_mountpoint_is_refused(tmp_path, origin_factory, agent_factory):
    # Another socket and cache, the same mountpoint: the second agent took the
    # first one's live mount for a stale one and unmounted it.
    files = make_dataset(tmp_path / "src", seed=5)
    origin = origin_factory(tmp_path / "src")
    first = agent_factory("first", block_size=BS)
    first.cli("pull", origin.url, "--name", "mine")
    second = agent_factory("second", start=False, mountpoint=str(first.mnt))
    second.start(wait=False)
    assert second.proc.wait(timeout=60) == 16
    assert "is a live FUSE mount of another process" in second.log()
    for rel, data in files.items():
        assert (first.mnt / "mine" / rel).read_bytes() == data


def test_sigterm_as_soon_as_the_mount_appears_unmounts_it(tmp_path, agent_factory):
    # The signal receiver used to open only after the API and the rest were
    # up: a SIGTERM in between killed the agent with the mount left stale.
    for attempt in range(3):
        agent = agent_factory(f"early{attempt}", start=False)
        agent.start(wait=False)
        deadline = time.monotonic() + 30
        while not os.path.ismount(agent.mnt):
            assert time.monotonic() < deadline and agent.proc.poll() is None, agent.log()
            time.sleep(0.001)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=30) == 0, agent.log()
        assert not os.path.ismount(agent.mnt)
        os.listdir(agent.mnt)  # not ENOTCONN


def test_a_socket_path_that_is_not_a_socket_is_left_alone(tmp_path, agent_factory):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    agent = agent_factory(start=False, env={"SYNCBIT_SOCKET": str(notes)})
    agent.start(wait=False)
    assert agent.proc.wait(timeout=60) == 2
    assert "exists and is not a socket" in agent.log()
    assert notes.read_text() == "keep me"


def test_cli_without_agent_says_so(tmp_path):
    env = {**os.environ, "SYNCBIT_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run([sys.executable, "-m", "syncbit", "status"], env=env, capture_output=True, text=True)
    assert r.returncode == 10
    assert "no agent is listening" in r.stderr and "Traceback" not in r.stderr


def test_evict_then_prefetch_and_revision_path(tmp_path, origin_factory, agent_factory):
    files = make_dataset(tmp_path / "src", seed=9)
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "ev")
    freed = agent.cli("evict", "ev").stdout
    assert "freed" in freed
    st = agent.dataset("ev")
    assert st["bytes_cached"] == 0 and st["pinned"] is False
    # Still readable: evicted blocks come back on demand.
    rel = "model-00002-of-00002.safetensors"
    assert (agent.mnt / "ev" / rel).read_bytes() == files[rel]
    # prefetch pins it again and fills it; SYNCBIT_CONFIG finds the socket too.
    env = {k: v for k, v in agent.env().items() if k != "SYNCBIT_SOCKET"}
    env["SYNCBIT_CONFIG"] = str(agent.config_path)
    r = subprocess.run([sys.executable, "-m", "syncbit", "prefetch", "ev"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = agent.dataset("ev")
    assert st["state"] == "ready" and st["pinned"] and st["bytes_cached"] == st["bytes_total"]
    # The pinned snapshot is also reachable by its revision.
    assert (agent.mnt / f"ev@{st['revision']}" / rel).read_bytes() == files[rel]
    assert not (agent.mnt / "ev@nonsense").exists()


def test_evicting_one_of_two_names_for_one_uri_keeps_the_other(tmp_path, origin_factory, agent_factory):
    # One URI pulled under two names: both datasets show the same snapshot.
    # `evict a` must not drop blocks that pinned `b` uses (it used to exclude
    # b's use because the query skipped every use of a's snapshot).
    files = make_dataset(tmp_path / "src", seed=11)
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "a")
    agent.cli("pull", origin.url, "--name", "b")
    assert agent.dataset("a")["revision"] == agent.dataset("b")["revision"]
    agent.cli("evict", "a")
    b = agent.dataset("b")
    assert b["pinned"] and b["bytes_cached"] == b["bytes_total"] > 0
    sent = origin.bytes_sent
    for rel, data in files.items():
        assert (agent.mnt / "b" / rel).read_bytes() == data
    assert origin.bytes_sent == sent, "b's blocks were evicted and fetched again"
