"""Cache behaviour seen through a real mount: crash and resume, quota and pins, dedup, file sources, mmap."""

from __future__ import annotations

import errno
import os
import random
import re
import time

import pytest

from tests.conftest import write_tree

BS = 64 * 1024


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _wait(pred, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _drop_page_cache():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _block_files(agent) -> list:
    return sorted(p for p in (agent.cache / "blocks").rglob("*") if re.fullmatch(r"[0-9a-f]{64}", p.name))


def test_kill9_mid_pull_then_resume_without_refetching(tmp_path, origin_factory, agent_factory):
    data = _data(1, 200 * BS)
    write_tree(tmp_path / "src", {"shard.bin": data, "small.bin": data[:777]})
    origin = origin_factory(tmp_path / "src")
    origin.rate = 2 * 1024 * 1024  # ~6 s for the whole file: room to kill mid-pull
    agent = agent_factory(block_size=BS, prefetch_concurrency=2)
    agent.cli("pull", origin.url, "--name", "crash", "--no-wait")
    _wait(lambda: agent.dataset("crash")["bytes_cached"] > len(data) // 4, what="a quarter of the pull")
    agent.kill9()
    time.sleep(0.5)  # let the origin's threads notice the dead connections
    sent_before = origin.bytes_sent
    cached_blocks = len(_block_files(agent))  # not the temp files of blocks still arriving
    assert 0 < sent_before < len(data)

    origin.rate = None
    agent.start()  # cleans the stale mount, reconciles the cache, resumes the pinned pull
    _wait(lambda: agent.dataset("crash")["state"] == "ready", what="resume to finish")
    assert (agent.mnt / "crash" / "shard.bin").read_bytes() == data
    assert (agent.mnt / "crash" / "small.bin").read_bytes() == data[:777]
    # The resume fetched only what was missing: total origin bytes stay below
    # one copy plus what was in flight when the agent died.
    in_flight_allowance = 2 * 16 * BS  # two prefetch runs of 16 blocks cut mid-way
    assert origin.bytes_sent <= len(data) + 777 + in_flight_allowance
    assert origin.bytes_sent - sent_before <= len(data) + 777 - (cached_blocks - 1) * BS
    # No temp file or unverified block survived the crash.
    assert not [p for p in (agent.cache / "blocks").rglob(".tmp-*")]


def test_corrupt_block_after_crash_is_not_served(tmp_path, origin_factory, agent_factory):
    data = _data(2, 10 * BS)
    write_tree(tmp_path / "src", {"f.bin": data})
    origin = origin_factory(tmp_path / "src")
    # No group commit before the crash: every block is "since the last commit".
    agent = agent_factory(block_size=BS, commit_interval="1h")
    agent.cli("pull", origin.url, "--name", "c")
    agent.kill9()
    # Damage one block file in place, as a torn write on a lying disk would.
    victim = _block_files(agent)[-1]
    with open(victim, "r+b") as f:
        f.write(b"\0" * 100)
    agent.start()
    assert (agent.mnt / "c" / "f.bin").read_bytes() == data
    assert "at-rest checksum" in agent.log()


def test_small_quota_evicts_unpinned_and_keeps_pinned(tmp_path, origin_factory, agent_factory):
    pinned = _data(3, 12 * BS)
    lazy = _data(4, 40 * BS)
    write_tree(tmp_path / "p", {"p.bin": pinned})
    write_tree(tmp_path / "l", {"l.bin": lazy})
    op, ol = origin_factory(tmp_path / "p"), origin_factory(tmp_path / "l")
    agent = agent_factory(block_size=BS, cache_quota=str(24 * BS), cache_high_watermark=0.9,
                          cache_low_watermark=0.5, readahead="0")
    agent.cli("pull", op.url, "--name", "pinned")
    agent.cli("pull", ol.url, "--name", "lazy", "--no-wait")
    agent.cli("evict", "lazy")  # unpinned: only reads bring its blocks in
    # Read the unpinned dataset (40 blocks) through a cache of 24 blocks.
    for _ in range(2):
        assert (agent.mnt / "lazy" / "l.bin").read_bytes() == lazy
        _drop_page_cache()
    st = agent.status()
    assert st["cache"]["evicted_blocks"] > 0
    assert st["cache"]["bytes"] <= 24 * BS + 8 * BS  # back under quota (+ blocks held by open files)
    # Every pinned byte is still in the cache: reading it costs the origin nothing.
    sent = op.bytes_sent
    assert (agent.mnt / "pinned" / "p.bin").read_bytes() == pinned
    assert op.bytes_sent == sent
    assert agent.dataset("pinned")["bytes_cached"] == len(pinned)


def test_identical_files_across_datasets_stored_once(tmp_path, origin_factory, agent_factory):
    shared = _data(5, 16 * BS)
    write_tree(tmp_path / "a", {"weights.bin": shared, "a-only.txt": b"a"})
    write_tree(tmp_path / "b", {"copy/weights.bin": shared, "b-only.txt": b"b"})
    oa, ob = origin_factory(tmp_path / "a"), origin_factory(tmp_path / "b")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", oa.url, "--name", "a")
    before = agent.status()["cache"]
    agent.cli("pull", ob.url, "--name", "b")
    after = agent.status()["cache"]
    assert (agent.mnt / "b" / "copy" / "weights.bin").read_bytes() == shared
    # Only b-only.txt's block is new; the shared file's 16 blocks are stored once.
    assert after["blocks"] == before["blocks"] + 1
    assert after["bytes"] == before["bytes"] + 1


def test_file_source_plain_path_and_change_detection(tmp_path, agent_factory):
    src = write_tree(tmp_path / "nfs" / "set", {
        "part-0.csv": b"x,y\n" + b"1,2\n" * 40000,
        "nested/dir/part-1.csv": b"x,y\n" + b"3,4\n" * 100,
        "with space ✓.txt": b"ok",
        "empty": b"",
    })
    agent = agent_factory(block_size=BS)
    out = agent.cli("pull", str(src), "--name", "nfs").stdout.strip()
    assert out == str(agent.mnt / "nfs")
    for p in src.rglob("*"):
        if p.is_file():
            assert (agent.mnt / "nfs" / p.relative_to(src)).read_bytes() == p.read_bytes()
    # file:// URIs work the same way.
    agent.cli("pull", f"file://{src}/nested/", "--name", "nested")
    assert (agent.mnt / "nested" / "dir" / "part-1.csv").read_bytes() == (src / "nested/dir/part-1.csv").read_bytes()
    # A file rewritten under a pinned snapshot is detected, never mixed in.
    agent.cli("evict", "nfs")
    big = src / "part-0.csv"
    big.write_bytes(b"changed" * 1000)
    _drop_page_cache()  # what the kernel kept from the earlier read is still right; we want a fetch
    with pytest.raises(OSError):
        (agent.mnt / "nfs" / "part-0.csv").read_bytes()
    assert "changed since the snapshot was pinned" in agent.log()


def test_missing_local_path(tmp_path, agent_factory):
    agent = agent_factory()
    r = agent.cli("pull", str(tmp_path / "does-not-exist"), "--name", "x", check=False)
    assert r.returncode == 6 and "no such file or directory" in r.stderr


def test_safetensors_mmap_through_the_mount(tmp_path, origin_factory, agent_factory):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    tensors = {"embed": np.arange(300_000, dtype=np.float32).reshape(600, 500), "bias": np.ones(7, np.float16)}
    (tmp_path / "src").mkdir()
    st.save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS)
    agent.cli("pull", origin.url, "--name", "m", "--no-wait")  # lazy: mmap faults fetch blocks
    with safe_open(str(agent.mnt / "m" / "model.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == ["bias", "embed"]
        assert (f.get_tensor("embed") == tensors["embed"]).all()
        assert (f.get_tensor("bias") == tensors["bias"]).all()


def test_full_disk_fails_the_pull_cleanly_and_keeps_serving(tmp_path, tmpfs_factory, origin_factory, agent_factory):
    """A dataset bigger than the cache filesystem: the pull fails with a clear reason; nothing crashes."""
    small_fs = tmpfs_factory("small", "3m")
    data = _data(8, 80 * BS)  # 5 MiB into a 3 MiB filesystem
    write_tree(tmp_path / "src", {"big.bin": data, "small.txt": b"small file"})
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS, cache_dir=str(small_fs / "cache"), min_free_disk="512KiB",
                          cache_quota="64MiB")
    r = agent.cli("pull", origin.url, "--name", "full", check=False)
    assert r.returncode == 15, r.stderr
    assert "below the reserve" in r.stderr or "no space left" in r.stderr
    st = agent.dataset("full")
    assert st["state"] == "failed" and 0 < st["bytes_cached"] < len(data)
    # The agent is alive and serves what it has (which blocks made it depends
    # on the order the runs finished); a read that needs space gets EIO, not a hang.
    served = 0
    with open(agent.mnt / "full" / "big.bin", "rb") as f:
        for i in range(80):
            try:
                chunk = os.pread(f.fileno(), BS, i * BS)
            except OSError as e:
                assert e.errno == errno.EIO
                continue
            assert chunk == data[i * BS:(i + 1) * BS]
            served += 1
    assert served * BS == st["bytes_cached"]
    with pytest.raises(OSError) as e:
        (agent.mnt / "full" / "small.txt").read_bytes()
    assert e.value.errno == errno.EIO
    assert "read failed: dataset full file small.txt block 0: cache filesystem" in agent.log()
    assert agent.status()["cache"]["bytes"] <= 3 * 2**20
    # Evicting the dataset gives the space back; the small file is then served.
    agent.cli("evict", "full")
    assert (agent.mnt / "full" / "small.txt").read_bytes() == b"small file"


def test_snapshot_switches_do_not_keep_old_trees(tmp_path, agent_factory):
    # Re-pull a local tree after each change: every pull shows a new snapshot.
    # The mount's inode count (statfs f_files) must stay at the current and
    # the previous tree once the kernel forgets the old inodes; it used to
    # grow by a whole tree per switch. A file opened early keeps its bytes
    # across all the switches (the kernel holds its inode while it is open),
    # and so does a directory held open (a shell's working directory): a
    # name looked up in it later is the first snapshot's file.
    files = {f"d{i % 3}/f{i}.bin": _data(i, 1000 + i) for i in range(30)}
    per_tree = 1 + 3 + 30
    src = write_tree(tmp_path / "set", files)
    agent = agent_factory(block_size=BS)
    agent.cli("pull", str(src), "--name", "ds")
    first = dict(files)
    revisions = [agent.dataset("ds")["revision"]]
    cwd = os.open(agent.mnt / "ds" / "d1", os.O_RDONLY | os.O_DIRECTORY)
    with open(agent.mnt / "ds" / "d0" / "f0.bin", "rb") as early:
        for n in range(1, 7):
            files["d1/f1.bin"] = _data(100 + n, 2000 + n)
            (src / "d1" / "f1.bin").write_bytes(files["d1/f1.bin"])
            agent.cli("pull", str(src), "--name", "ds")
            _wait(lambda: (agent.mnt / "ds" / "d1" / "f1.bin").read_bytes() == files["d1/f1.bin"],
                  what=f"snapshot {n} in the mount")
            # Read through NAME and through NAME@REVISION (which the kernel
            # also caches, and must be told about when it goes away).
            revisions.append(agent.dataset("ds")["revision"])
            for rel, data in files.items():
                assert (agent.mnt / "ds" / rel).read_bytes() == data
                assert (agent.mnt / f"ds@{revisions[-1]}" / rel).read_bytes() == data
        # Only NAME@REVISION of the current and the previous snapshot lead
        # anywhere (the kernel was told the others went away).
        assert [os.path.exists(agent.mnt / f"ds@{r}") for r in revisions] == [False] * 5 + [True] * 2
        # The kernel forgets the inodes under the names it was told went
        # away: left are the root, two trees, the open file with its two
        # directories (a dentry holds its parent) and the open directory.
        # Without freeing: 1 + 7 trees = 239.
        _wait(lambda: os.statvfs(agent.mnt).f_files <= 1 + 2 * per_tree + 4, timeout=10,
              what=f"old trees freed (f_files {os.statvfs(agent.mnt).f_files})")
        assert early.read() == first["d0/f0.bin"]
        fd = os.open("f1.bin", os.O_RDONLY, dir_fd=cwd)
        try:
            assert os.read(fd, 1 << 20) == first["d1/f1.bin"] != files["d1/f1.bin"]
        finally:
            os.close(fd)
            os.close(cwd)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    _wait(lambda: os.statvfs(agent.mnt).f_files == 1 + 2 * per_tree, timeout=10,
          what=f"the closed file's tree freed (f_files {os.statvfs(agent.mnt).f_files})")


def test_the_agent_starts_on_a_full_cache_filesystem(tmp_path, tmpfs_factory, origin_factory, agent_factory):
    # Stopped cleanly, then something else filled the cache's filesystem to
    # the last byte: the agent must still start (SQLite must not need a new
    # -shm file), serve what it has, and let `evict` give space back.
    small_fs = tmpfs_factory("small", "4m")
    data = _data(9, 16 * BS)
    write_tree(tmp_path / "src", {"model.bin": data})
    origin = origin_factory(tmp_path / "src")
    agent = agent_factory(block_size=BS, cache_dir=str(small_fs / "cache"), min_free_disk="0",
                          cache_quota="64MiB")
    agent.cli("pull", origin.url, "--name", "ds")
    assert agent.stop() == 0
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(small_fs).f_bavail == 0
    agent.start()
    assert agent.dataset("ds")["bytes_cached"] == len(data)
    sent = origin.bytes_sent
    assert (agent.mnt / "ds" / "model.bin").read_bytes() == data
    assert origin.bytes_sent == sent
    out = agent.cli("evict", "ds").stdout
    assert os.statvfs(small_fs).f_bavail > 0, (out, agent.log()[-3000:])
