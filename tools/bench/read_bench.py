#!/usr/bin/env python3
"""Read-path benchmark: Syncbit's FUSE mount against curl, rclone and local files.

Run as root (FUSE mounts, ``/proc/sys/vm/drop_caches``, the mount's
``read_ahead_kb``) with the venv's interpreter::

    /work/venv/bin/python tools/bench/read_bench.py [--size 1GiB] [--workdir /tmp]
        [--rss-size 4GiB | --rss-size 0] [--repeat 3] [--fio-runtime 10]
        [--no-rclone] [--no-lazy] [--json out.json] [--keep]

Everything runs on loopback in one go: one file of ``--size`` random bytes is
served by ``python -m syncbit.demo.origin`` (a separate process, so this
script's GIL stays out of the data path). A fresh directory is created under
``--workdir`` (default: the system temp dir, i.e. the same disk as /tmp) and
removed at the end; agents and rclone are unmounted and the origin killed, in
a ``finally`` that also runs on errors, Ctrl-C and SIGTERM. The exit status
is 1 when a target is missed, 0 when all are met.

Sequential reads (phases 1-3) are repeated ``--repeat`` times (default 3),
interleaving Syncbit and its baselines within each repetition so that a noisy
machine disturbs both alike; the table shows the median and [min-max], and
ratios are medians over medians.

Phases (the table printed at the end has one row per measurement)
-------------------------------------------------------------------------
1. Cold read. Before each run: ``sync``, drop all caches
   (``echo 3 > /proc/sys/vm/drop_caches``), then read the origin's file once
   so that the origin serves from its page cache (we measure the transfer
   stacks, not the origin's disk).
   - curl: ``curl -s -o WORK/curl.out URL`` (into a file in the page cache,
     not fsynced; deleted afterwards);
   - Syncbit: fresh agent, empty cache dir, the dataset registered the way
     ``syncbit pull URL --no-wait`` does it (``POST /v1/datasets`` with
     ``pin: true`` on the agent's socket, sent with curl so that the CLI's
     Python start-up is not timed and its exit gives the prefetcher no head
     start), then ``dd if=MOUNT/ds/file of=/dev/null bs=1M``; timed from the
     registration (which includes the HEAD to the origin) to the end of dd.
     The dataset is pinned, so the background prefetcher runs while dd reads:
     that is what a user gets. Afterwards ``syncbit pull`` (waiting) lets the
     prefetch finish before anything else runs;
   - rclone: ``rclone mount :http: --vfs-cache-mode full --read-only`` with an
     empty ``--cache-dir`` (URL from ``RCLONE_HTTP_URL``, empty config file),
     then the same dd. rclone's other options are its defaults;
   - row 1i (information, ``--no-lazy`` skips it): Syncbit with the dataset
     registered through the API with ``pin: false``: no background prefetch,
     only the FUSE read path and its readahead.
   Target: Syncbit >= 0.8 x curl; Syncbit / rclone is reported (> 1 wanted).
2. Cached read, first read after the page cache is gone, the agent holding the
   whole file in its cache. Two variants, rclone treated the same way (after
   its cold read filled its VFS cache):
   a. ``drop_caches``: drops the mount's page cache *and* the block files'
      (rclone: its cache file's), so the bytes come from the disk;
   b. remount: the agent is stopped, its block files are read once (into
      the page cache), and it is started again on the same cache dir (rclone:
      unmounted, its cache file read once, mounted again on the same cache
      dir), so the mount's page cache is empty but the backing files are in
      RAM.
   Target: Syncbit >= 3 x rclone. The bytes the origin sent during the
   cached reads (``wchar`` of its /proc/PID/io) are reported: should be ~0.
3. Second read through the mount (page cache warm, right after 2b) vs ``dd``
   of a regular local file in the page cache (the origin's file, read once
   first). Target >= 0.45. Row 3i: rclone's second read (information;
   rclone does not keep the page cache between opens).
4. 4 KiB random reads: ``fio --rw=randread --bs=4k --ioengine=psync
   --direct=0 --time_based --runtime=10 --invalidate=0`` (one job, queue
   depth 1; fio's random map means no 4 KiB block is read twice in a run),
   on the Syncbit file, the regular local file (the origin's file) and the
   rclone file, one run each. The file fits in RAM here, so instead of a
   bigger file the caches are controlled:
   a. all caches dropped before each run: every read misses the page cache
      and goes to the disk (local file) or through FUSE to the agent, which
      reads the block file from the disk (rclone: its cache file);
   b. backing files in RAM: ``drop_caches``, then the block files / rclone's
      cache file / the local file are read once; the mount's own page cache
      stays empty, so every read is one FUSE round trip to a daemon that
      answers from memory, while the local file is a page-cache hit: that
      ratio is the price of FUSE + the daemon per request.
   Target (4a): Syncbit IOPS >= rclone's.
5. Peak RSS of the agent's foreground process (VmHWM in /proc/PID/status;
   the PID ``syncbit mount`` prints) over: ``pull --no-wait`` of a
   ``--rss-size`` dataset (default 4 GiB) with an immediate cold ``dd`` of
   it, waiting for the prefetch to finish, then ``drop_caches`` and a second
   full ``dd``. Target <= 300 MB. Needs about 2 x rss-size + 2 GiB of free
   disk (skipped with a note otherwise); ``--rss-size 0`` skips it. The peak
   RSS of each phase 1-4 agent instance is in the notes.

MB/s are 10^6 bytes per second; each read is timed around the reading
command (dd, curl or fio), not around mounting (but see 1 for registering).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
MB = 1e6
TARGET_COLD = 0.8
TARGET_CACHED = 3.0
TARGET_WARM = 0.45
TARGET_RSS = 300 * MB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (examples: 1GiB, 512MiB, 0)")
    num, unit = float(m.group(1)), m.group(2).rstrip("b")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
            "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(num * mult)


# -- system helpers -------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_through(path: str | Path) -> None:
    """Read a file or every file under a directory once (into the page cache)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    buf = bytearray(1 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def mount_fstype(path: str | Path) -> str | None:
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and fields[4].replace("\\040", " ") == target:
                found = right.split()[0]
    return found


def wait_for(pred, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def fusermount_u(path: str | Path) -> None:
    if mount_fstype(path) is None:
        return
    r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        time.sleep(0.5)
        if mount_fstype(path) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM then SIGKILL one process we started, by its id."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(RuntimeError):
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_wchar(pid: int) -> int:
    """Bytes the process wrote (sendfile counts): what the origin served."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/PID/io")


def timed_dd(path: str | Path, expect: int, bs: str = "1M") -> float:
    """``dd if=path of=/dev/null``; returns MB/s, checks that all bytes were read."""
    t0 = time.monotonic()
    r = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"], capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"dd of {path} failed: {r.stderr.strip()}")
    m = re.search(r"^(\d+) bytes", r.stderr, re.M)
    got = int(m.group(1)) if m else -1
    if got != expect:
        raise RuntimeError(f"dd of {path} read {got} bytes, expected {expect}: {r.stderr.strip()}")
    return expect / dt / MB


def make_random_file(path: Path, size: int) -> None:
    """Random bytes, unique per 64 KiB (so no two cache blocks dedup), fast.

    A 64 MiB pool from os.urandom, sliced at moving offsets; every 64 KiB
    gets its absolute offset stamped into its first 8 bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = os.urandom(64 << 20) + os.urandom(1 << 20)
    chunk = 1 << 20
    with open(path, "wb") as f:
        off = 0
        i = 0
        while off < size:
            n = min(chunk, size - off)
            start = (i * 7919 * 4096) % (64 << 20)
            buf = bytearray(pool[start:start + n])
            for k in range(0, n - 7, 64 << 10):
                struct.pack_into("<Q", buf, k, off + k)
            f.write(buf)
            off += n
            i += 1


# -- processes under test ---------------------------------------------------------


class Origin:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([PY, "-m", "syncbit.demo.origin", str(root), "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"origin did not start (said {line!r})")
        self.url = line

    def sent(self) -> int:
        return proc_wchar(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SyncbitAgent:
    """A detached agent started with ``syncbit mount``; pid is its foreground process."""

    def __init__(self, mountpoint: Path, cache_dir: Path, socket: Path) -> None:
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.socket = socket
        self.pid: int | None = None
        self.env = {k: v for k, v in os.environ.items() if k != "SYNCBIT_CONFIG"}
        self.env["SYNCBIT_SOCKET"] = str(socket)

    def cli(self, *args: str, timeout: float = 600) -> str:
        r = subprocess.run([PY, "-m", "syncbit", *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"syncbit {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}"
                               f"{self.log_tail()}")
        return r.stdout

    def log_tail(self) -> str:
        try:
            return "\n--- agent.log ---\n" + (self.cache_dir / "agent.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        out = self.cli("mount", str(self.mountpoint), "--cache-dir", str(self.cache_dir), "--socket",
                       str(self.socket), timeout=90)
        m = re.search(r"agent (\d+) is serving", out)
        if not m:
            raise RuntimeError(f"cannot find the agent's pid in {out!r}")
        self.pid = int(m.group(1))
        wait_for(lambda: mount_fstype(self.mountpoint) is not None, 30, "the syncbit mount")

    def pull(self, url: str, name: str, wait: bool) -> None:
        self.cli("pull", url, "--name", name, *([] if wait else ["--no-wait"]))

    def register(self, url: str, name: str, pin: bool) -> None:
        """POST /v1/datasets, as ``syncbit pull --no-wait`` does (pin=True), with curl.

        curl rather than the CLI: the CLI's Python start-up would be timed, and
        its exit would give the prefetcher a head start before dd opens the file.
        pin=False (no background prefetch) has no CLI form.
        """
        body = json.dumps({"uri": url, "name": name, "pin": pin})
        r = subprocess.run(["curl", "-sS", "--fail-with-body", "--unix-socket", str(self.socket), "-X", "POST",
                            "-H", "Content-Type: application/json", "-d", body, "http://agent/v1/datasets"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"registering {url} unpinned failed: {r.stdout.strip()} {r.stderr.strip()}")

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json"))

    def hwm(self) -> int | None:
        kb = proc_status_kb(self.pid, "VmHWM") if self.pid else None
        return kb * 1024 if kb is not None else None

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if pid_alive(pid):
            with contextlib.suppress(Exception):
                self.cli("unmount", timeout=40)
            with contextlib.suppress(RuntimeError):
                wait_for(lambda: not pid_alive(pid), 15, "the agent to exit")
        fusermount_u(self.mountpoint)
        kill_pid(pid)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: mount_fstype(self.mountpoint) is None, 10, "the syncbit mount to go away")


class RcloneMount:
    def __init__(self, url: str, mountpoint: Path, cache_dir: Path, workdir: Path) -> None:
        self.url = url
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.config = workdir / "rclone.conf"
        self.logfile = workdir / "rclone.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.config.touch()
        env = dict(os.environ, RCLONE_CONFIG=str(self.config), RCLONE_HTTP_URL=self.url)
        self.proc = subprocess.Popen(
            ["rclone", "mount", ":http:", str(self.mountpoint), "--vfs-cache-mode", "full",
             "--cache-dir", str(self.cache_dir), "--read-only", "--log-file", str(self.logfile),
             "--log-level", "INFO"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone exited with {self.proc.returncode}; see {self.logfile}")
            return mount_fstype(self.mountpoint) == "fuse.rclone"

        wait_for(up, 30, "the rclone mount")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        fusermount_u(self.mountpoint)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        fusermount_u(self.mountpoint)


def fio_randread(path: str | Path, size: int, runtime: int) -> float:
    """IOPS of 4 KiB psync random reads (queue depth 1) for ``runtime`` seconds."""
    cmd = ["fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
           "--ioengine=psync", "--direct=0", "--numjobs=1", "--time_based", f"--runtime={runtime}",
           f"--size={size}", "--invalidate=0", "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    if r.returncode != 0:
        raise RuntimeError(f"fio on {path} failed: {r.stderr.strip()[-1000:]}")
    out = r.stdout[r.stdout.index("{"):]
    job = json.loads(out)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio on {path}: error {job['error']}")
    return float(job["read"]["iops"])


# -- results ------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


@dataclass
class Row:
    phase: str
    what: str
    unit: str  # "MB" (values in bytes/s or bytes) or "IOPS"
    syncbit: list[float]
    baseline_name: str = ""
    baseline: list[float] = field(default_factory=list)
    target: str = ""
    min_ratio: float | None = None
    max_value: float | None = None
    note: str = ""

    @property
    def sb(self) -> float | None:
        return median(self.syncbit)

    @property
    def base(self) -> float | None:
        return median(self.baseline)

    @property
    def ratio(self) -> float | None:
        if self.sb is None or not self.base:
            return None
        return self.sb / self.base

    @property
    def ok(self) -> bool | None:
        if self.min_ratio is not None:
            return self.ratio is not None and self.ratio >= self.min_ratio
        if self.max_value is not None:
            return self.sb is not None and self.sb <= self.max_value
        return None


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "MB":
        return f"{v / MB:.0f}"
    return f"{v:,.0f}"


def fmt_spread(xs: list[float], unit: str) -> str:
    """median, and [min-max] when there are several samples."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0], unit)
    return f"{fmt(median(xs), unit)} [{fmt(min(xs), unit)}-{fmt(max(xs), unit)}]"


def print_table(res: Results, args, out=sys.stdout) -> None:
    hdr = ("#", "measurement", "unit", "syncbit", "baseline", "baseline value", "ratio", "target", "result")
    lines = []
    for r in res.rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        result = "" if r.ok is None else ("PASS" if r.ok else "MISS")
        unit = "MB/s" if r.unit == "MB" and "RSS" not in r.what else ("MB" if r.unit == "MB" else r.unit)
        lines.append((r.phase, r.what, unit, fmt_spread(r.syncbit, r.unit), r.baseline_name or "-",
                      fmt_spread(r.baseline, r.unit), ratio, r.target or "-", result))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *lines)]
    right = {3, 5, 6}

    def emit(cols):
        out.write("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                            for i, (c, w) in enumerate(zip(cols, widths))).rstrip() + "\n")

    out.write("\n")
    out.write(f"Syncbit read benchmark: {args.size / 2**30:.2f} GiB file on loopback, {os.cpu_count()} CPUs, "
              f"kernel {os.uname().release}, {args.repeat} repetition(s): median [min-max]; "
              f"MB/s = 10^6 bytes/s\n")
    for line in getattr(args, "header_lines", []):
        out.write(f"{line}\n")
    emit(hdr)
    emit(["-" * w for w in widths])
    for line in lines:
        emit(line)
    notes = [(r.phase, r.note) for r in res.rows if r.note]
    if notes or res.info:
        out.write("\nNotes:\n")
        for phase, note in notes:
            out.write(f"  [{phase}] {note}\n")
        for k, v in res.info.items():
            out.write(f"  {k}: {v}\n")
    out.flush()


def code_version() -> tuple[str, float]:
    """(description of the syncbit code under test, newest mtime of its sources)."""
    import syncbit

    pkg = Path(syncbit.__file__).resolve().parent
    newest = max((f.stat().st_mtime for f in pkg.rglob("*.py")), default=0.0)
    desc = f"syncbit from {pkg}"
    try:
        repo = pkg.parent
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--", "syncbit"], capture_output=True,
                              check=True).stdout
        if diff:
            import hashlib

            desc += f", git {head} + uncommitted changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"
        else:
            desc += f", git {head}"
    except (OSError, subprocess.CalledProcessError):
        pass
    return desc, newest


# -- the benchmark --------------------------------------------------------------------


class Bench:
    def __init__(self, args, work: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.res = Results()
        self.data = work / "data"
        self.file = self.data / "small" / "file"
        self.sb_cache = work / "sb-cache"
        self.rc_cache = work / "rclone-cache"

    def new_agent(self, tag: str, cache: Path) -> SyncbitAgent:
        agent = SyncbitAgent(self.work / f"mnt-{tag}", cache, self.work / f"agent-{tag}.sock")
        self.stack.callback(agent.stop)
        agent.start()
        return agent

    def new_rclone(self, url: str) -> RcloneMount:
        rc = RcloneMount(url, self.work / "mnt-rclone", self.rc_cache, self.work)
        self.stack.callback(rc.stop)
        rc.start()
        return rc

    def cold_prep(self) -> None:
        """Empty caches everywhere, except the origin's file: the origin serves from memory."""
        drop_caches()
        read_through(self.file)

    def run(self) -> Results:
        a, res = self.args, self.res
        size, reps = a.size, a.repeat
        log(f"writing {size} bytes of random data to {self.file}")
        make_random_file(self.file, size)
        origin = Origin(self.data)
        self.stack.callback(origin.stop)
        self.origin = origin
        url = origin.url + "small/file"
        log(f"origin {origin.url} (pid {origin.proc.pid})")
        use_rc = not a.no_rclone

        # ---- 1. cold reads (each repetition: curl, syncbit, syncbit lazy, rclone) ----
        curl, sb_cold, sb_lazy, rc_cold = [], [], [], []
        sb_from_origin, rc_from_origin = [], []
        agent = rc = None
        for rep in range(reps):
            last = rep == reps - 1
            self.cold_prep()
            out = self.work / "curl.out"
            t0 = time.monotonic()
            subprocess.run(["curl", "-sS", "--fail", "-o", str(out), url], check=True)
            curl.append(size / (time.monotonic() - t0))
            if out.stat().st_size != size:
                raise RuntimeError("curl fetched a short file")
            out.unlink()

            if a.lazy:
                # Info: the read path alone, no background prefetch (pin=false through the API).
                self.cold_prep()
                lazy = self.new_agent("lazy", self.work / "sb-cache-lazy")
                t0 = time.monotonic()
                lazy.register(url, "ds", pin=False)
                timed_dd(lazy.mountpoint / "ds" / "file", size)
                sb_lazy.append(size / (time.monotonic() - t0))
                lazy.stop()
                shutil.rmtree(self.work / "sb-cache-lazy", ignore_errors=True)

            self.cold_prep()
            shutil.rmtree(self.sb_cache, ignore_errors=True)
            agent = self.new_agent("a", self.sb_cache)
            sent0 = origin.sent()
            t0 = time.monotonic()
            agent.register(url, "ds", pin=True)  # = syncbit pull --no-wait
            timed_dd(agent.mountpoint / "ds" / "file", size)
            sb_cold.append(size / (time.monotonic() - t0))
            agent.pull(url, "ds", wait=True)  # let the prefetcher finish before anything else runs
            sb_from_origin.append((origin.sent() - sent0) / size)
            if not last:
                agent.stop()

            if use_rc:
                self.cold_prep()
                shutil.rmtree(self.rc_cache, ignore_errors=True)
                rc = self.new_rclone(origin.url)
                sent0 = origin.sent()
                rc_cold.append(timed_dd(rc.mountpoint / "small" / "file", size) * MB)
                rc_from_origin.append((origin.sent() - sent0) / size)
                if not last:
                    rc.stop()
            log(f"cold #{rep + 1}: curl {curl[-1] / MB:.0f}, syncbit {sb_cold[-1] / MB:.0f}"
                + (f", syncbit lazy {sb_lazy[-1] / MB:.0f}" if sb_lazy else "")
                + (f", rclone {rc_cold[-1] / MB:.0f}" if rc_cold else "") + " MB/s")
        sb_file = agent.mountpoint / "ds" / "file"
        rc_file = rc.mountpoint / "small" / "file" if rc else None
        res.add(Row("1", "cold read: syncbit dd vs curl -o FILE", "MB", sb_cold, "curl", curl,
                    target=f">= {TARGET_COLD:g}x", min_ratio=TARGET_COLD))
        if use_rc:
            res.add(Row("1", "cold read: syncbit vs rclone (vfs full)", "MB", sb_cold, "rclone", rc_cold,
                        target="> 1x", min_ratio=1.0))
        if sb_lazy:
            res.add(Row("1i", "cold read, lazy only (pin=false) vs curl", "MB", sb_lazy, "curl", curl,
                        note="1i (info): dataset registered through the API with pin=false, so no "
                             "background prefetch: the FUSE read path and its readahead alone."))
        res.info["1 bytes from the origin per file byte (cold read + rest of prefetch)"] = (
            f"syncbit {', '.join(f'{x:.3f}' for x in sb_from_origin)}"
            + (f"; rclone {', '.join(f'{x:.3f}' for x in rc_from_origin)}" if rc_from_origin else ""))

        # ---- 2a. cached, after drop_caches ----
        sb_2a, rc_2a, sent_2a = [], [], [0, 0]
        for rep in range(reps):
            drop_caches()
            sent0 = origin.sent()
            sb_2a.append(timed_dd(sb_file, size) * MB)
            sent_2a[0] += origin.sent() - sent0
            if rc:
                drop_caches()
                sent0 = origin.sent()
                rc_2a.append(timed_dd(rc_file, size) * MB)
                sent_2a[1] += origin.sent() - sent0
        log(f"cached after drop_caches: syncbit {fmt_spread(sb_2a, 'MB')}, rclone {fmt_spread(rc_2a, 'MB')} MB/s")
        res.add(Row("2a", "cached, 1st read after drop_caches (disk)", "MB", sb_2a, "rclone" if rc else "",
                    rc_2a, target=f">= {TARGET_CACHED:g}x" if rc else "", min_ratio=TARGET_CACHED if rc else None))

        # ---- 2b. cached, after a remount (backing files still in the page cache) ----
        sb_2b, rc_2b, sent_2b = [], [], [0, 0]
        hwm = []
        for rep in range(reps):
            hwm.append(agent.hwm())
            agent.stop()
            # The backing files must be in RAM: rclone's 2a run (or the other
            # side's drop_caches) may have evicted them.
            read_through(self.sb_cache / "blocks")
            agent = self.new_agent("a", self.sb_cache)
            sent0 = origin.sent()
            sb_2b.append(timed_dd(sb_file, size) * MB)
            sent_2b[0] += origin.sent() - sent0
            if rc:
                rc.stop()
                read_through(self.rc_cache / "vfs")
                rc = self.new_rclone(origin.url)
                sent0 = origin.sent()
                rc_2b.append(timed_dd(rc_file, size) * MB)
                sent_2b[1] += origin.sent() - sent0
        log(f"cached after remount: syncbit {fmt_spread(sb_2b, 'MB')}, rclone {fmt_spread(rc_2b, 'MB')} MB/s")
        res.add(Row("2b", "cached, 1st read after remount (RAM)", "MB", sb_2b, "rclone" if rc else "", rc_2b,
                    target=f">= {TARGET_CACHED:g}x" if rc else "", min_ratio=TARGET_CACHED if rc else None))
        res.info["2 bytes the origin sent during the cached reads (2a; 2b)"] = (
            f"syncbit {sent_2a[0]}; {sent_2b[0]}" + (f" / rclone {sent_2a[1]}; {sent_2b[1]}" if rc else ""))

        # ---- 3. second read, page cache warm ----
        sb_3, local_3, rc_3 = [], [], []
        read_through(self.file)
        for rep in range(reps):
            sb_3.append(timed_dd(sb_file, size) * MB)
            local_3.append(timed_dd(self.file, size) * MB)
            if rc:
                rc_3.append(timed_dd(rc_file, size) * MB)
        log(f"warm: syncbit {fmt_spread(sb_3, 'MB')}, local {fmt_spread(local_3, 'MB')} MB/s")
        res.add(Row("3", "2nd read (page cache warm) vs local file", "MB", sb_3, "local file", local_3,
                    target=f">= {TARGET_WARM:g}x", min_ratio=TARGET_WARM))
        if rc:
            res.add(Row("3i", "2nd read vs rclone 2nd read (info)", "MB", sb_3, "rclone", rc_3))

        # ---- 4. 4 KiB random reads ----
        rt = a.fio_runtime
        iops: dict[tuple[str, str], list[float]] = {}
        targets = [("syncbit", sb_file), ("local", self.file)] + ([("rclone", rc_file)] if rc else [])
        for mode in ("cold", "warm"):
            for name, path in targets:
                drop_caches()
                if mode == "warm":
                    read_through({"syncbit": self.sb_cache / "blocks", "rclone": self.rc_cache / "vfs",
                                  "local": self.file}[name])
                iops[(mode, name)] = [fio_randread(path, size, rt)]
                log(f"randread {mode} {name}: {iops[(mode, name)][0]:,.0f} IOPS")
        for mode, label, desc in (("cold", "4a", "randread 4k, all caches dropped"),
                                  ("warm", "4b", "randread 4k, backing files in RAM")):
            res.add(Row(label, f"{desc} vs local file", "IOPS", iops[(mode, "syncbit")], "local file",
                        iops[(mode, "local")]))
            if rc:
                res.add(Row(label, f"{desc} vs rclone", "IOPS", iops[(mode, "syncbit")], "rclone",
                            iops[(mode, "rclone")], target=">= 1x" if mode == "cold" else "",
                            min_ratio=1.0 if mode == "cold" else None))
        res.info["4 fio"] = (f"fio --rw=randread --bs=4k --ioengine=psync --direct=0 --numjobs=1 --time_based "
                             f"--runtime={rt} --invalidate=0 --readonly, one run each; 4a: drop_caches before "
                             f"each run; 4b: drop_caches, then the block files / rclone's cache file / the local "
                             f"file read once")
        hwm.append(agent.hwm())
        res.info["agent peak RSS (VmHWM) per agent instance, 1 file"] = (
            ", ".join(fmt(h, "MB") for h in hwm) + " MB")

        agent.stop()
        if rc is not None:
            rc.stop()
        shutil.rmtree(self.sb_cache, ignore_errors=True)
        shutil.rmtree(self.rc_cache, ignore_errors=True)

        # ---- 5. peak RSS while serving a big dataset ----
        if a.rss_size > 0:
            self.rss_phase(origin)
        return res

    def rss_phase(self, origin: Origin) -> None:
        a, res = self.args, self.res
        size = a.rss_size
        what = f"agent peak RSS (VmHWM), {size / 2**30:.1f} GiB pull+reads"
        free = shutil.disk_usage(self.work).free
        need = 2 * size + 2 * 2**30
        if free < need:
            log(f"skipping the RSS phase: {free} bytes free, need {need}")
            res.add(Row("5", what, "MB", [], note=f"skipped: {free / 2**30:.1f} GiB free disk, "
                                                  f"need {need / 2**30:.1f}"))
            return
        big = self.data / "big" / "file"
        log(f"writing {size} bytes of random data to {big}")
        make_random_file(big, size)
        url = origin.url + "big/file"
        self.file.unlink()  # not needed any more; keeps the page cache for the big one
        drop_caches()
        agent = self.new_agent("rss", self.work / "sb-cache-rss")
        peak = {"rss": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                kb = proc_status_kb(agent.pid, "VmRSS") if agent.pid else None
                if kb:
                    peak["rss"] = max(peak["rss"], kb * 1024)
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            t0 = time.monotonic()
            agent.register(url, "big", pin=True)  # = syncbit pull --no-wait
            cold = timed_dd(agent.mountpoint / "big" / "file", size)
            agent.pull(url, "big", wait=True)
            ready = time.monotonic() - t0
            drop_caches()
            cached = timed_dd(agent.mountpoint / "big" / "file", size)
            hwm = agent.hwm()
        finally:
            stop.set()
            sampler.join()
        log(f"rss: VmHWM {fmt(hwm, 'MB')} MB (sampled VmRSS max {peak['rss'] / MB:.0f} MB)")
        res.add(Row("5", what, "MB", [hwm], target=f"<= {TARGET_RSS / MB:.0f} MB", max_value=TARGET_RSS))
        res.info[f"5 {size / 2**30:.1f} GiB dataset"] = (
            f"pull --no-wait + cold dd {cold:.0f} MB/s; fully cached {ready:.1f}s after the pull "
            f"({size / ready / MB:.0f} MB/s); dd after drop_caches {cached:.0f} MB/s; "
            f"sampled max VmRSS {peak['rss'] / MB:.0f} MB")
        agent.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="test file size (default 1GiB)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory (default: %(default)s)")
    p.add_argument("--rss-size", type=parse_size, default=parse_size("4GiB"),
                   help="dataset size for the RSS phase; 0 skips it (default 4GiB)")
    p.add_argument("--fio-runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--repeat", type=int, default=3,
                   help="repetitions of each dd/curl measurement; the table shows the median (default 3)")
    p.add_argument("--no-rclone", action="store_true", help="skip the rclone comparisons")
    p.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="skip the informational lazy (unpinned) cold read")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = p.parse_args()

    if os.geteuid() != 0:
        p.error("run as root: FUSE mounts, drop_caches and read_ahead_kb need it")
    for tool in ("fusermount3", "curl", "dd", "fio") + (() if args.no_rclone else ("rclone",)):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    if args.size < 64 * 2**20:
        p.error("--size must be at least 64MiB")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    # SIGTERM/SIGHUP should unwind through the finally blocks like Ctrl-C does.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    work = Path(tempfile.mkdtemp(prefix="syncbit-bench-", dir=args.workdir))
    log(f"work directory {work}")
    started = time.monotonic()
    version, mtime0 = code_version()
    load0 = os.getloadavg()[0]
    args.header_lines = [version]
    log(version)
    res = None
    try:
        with contextlib.ExitStack() as stack:  # callbacks run last-in first-out, also on errors
            bench = Bench(args, work, stack)
            try:
                res = bench.run()
            finally:
                args.header_lines.append(f"load average (1 min) {load0:.2f} at the start, "
                                         f"{os.getloadavg()[0]:.2f} at the end, "
                                         f"{time.monotonic() - started:.0f}s")
                if code_version()[1] != mtime0:
                    args.header_lines.append("WARNING: syncbit's sources changed during the run: the agents "
                                             "started at different times may have run different code")
                if bench.res.rows:
                    print_table(bench.res, args)
    finally:
        # Anything still mounted under the work dir (should be nothing by now).
        for mp in sorted(work.glob("mnt-*")):
            fusermount_u(mp)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f}s")
    if args.json and res is not None:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()},
                       "rows": [dict(r.__dict__, median=r.sb, baseline_median=r.base, ratio=r.ratio, ok=r.ok)
                                for r in res.rows],
                       "info": {k: str(v) for k, v in res.info.items()}}, f, indent=2)
    misses = [r for r in res.rows if r.ok is False] if res else []
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
