#!/usr/bin/env python3
"""S3 cold-read benchmark: Syncbit's mount against boto3's own download_file, same run.

Run as root (FUSE mounts, ``/proc/sys/vm/drop_caches``, reading the S3
server's spool file through ``/proc/PID/fd``) with the venv's interpreter::

    /work/venv/bin/python tools/bench/s3_bench.py [--size 1GiB] [--repeat 3]
        [--workdir /tmp] [--json out.json] [--keep]

The issue it answers: "For a 1 GiB object on an S3-compatible server on
loopback: cold read through the mount vs. boto3's own download_file of the
same object, same run; target >= 0.8. Note the server used and its own
ceiling."

The server is moto in server mode (``tests/servers/s3.py``: its own process,
signatures checked), the only S3-compatible server this project's machines
have. One object of ``--size`` random bytes is uploaded once with boto3
(``upload_file``, multipart). Then each repetition runs, in this order, each
after ``sync`` + ``echo 3 > drop_caches`` + reading moto's copy of the object
back into the page cache (so every contestant finds the server the same way
and none inherits another's page cache):

1a. server ceiling: one ``get_object`` of the whole object, its body read in
    4 MiB chunks and thrown away (this process, one connection);
1b. baseline: ``download_file`` with boto3's default ``TransferConfig``
    (ranged GETs of 8 MiB in 10 threads) into a file of the work directory,
    left in the page cache (no fsync), deleted afterwards;
2.  Syncbit cold read: a fresh agent on an empty cache dir, started the way a
    service is (``syncbit daemon --foreground --config FILE``, the AWS
    credentials in its environment), the dataset registered pinned with
    ``POST /v1/datasets`` on the agent's socket, as ``syncbit pull
    s3://... --endpoint-url URL --no-wait`` does (sent with curl so that the
    CLI's Python start-up is not timed), then ``dd if=MOUNT/ds/obj.bin
    of=/dev/null bs=1M``. Timed from the registration (which includes
    creating the boto3 client and the HEAD) to the end of dd; the background
    prefetcher runs meanwhile, as it does for a user. Then the prefetch is
    waited for and the agent stopped. Target: >= 0.8 x download_file;
2i. (information) the same with ``pin: false``: no background prefetch, the
    FUSE read path and its readahead alone.

Sequential measurements are interleaved within each repetition so a noisy
machine disturbs all alike; the table shows median [min-max] and ratios are
medians over medians. The notes give, per contestant, the CPU each side used
(utime+stime from /proc/PID/stat, as a share of one core over the timed
interval: which side is the bottleneck) and how often moto read its whole
copy of the object (rchar of its /proc/PID/io / object size): moto answers a
ranged GET by reading the *whole* object from its spool file, under a
per-object lock, and slicing it, so that count is its number of GETs, and a
GET costs time in proportion to the object, not to the range.

Everything started (moto, agents) is stopped, the mounts unmounted and the
work directory removed (``--keep`` keeps it) in a ``finally`` that also runs
on errors, Ctrl-C and SIGTERM. Exit status 1 when the target is missed.
MB/s are 10^6 bytes per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The generic helpers (sizes, caches, dd, mounts, the result rows) are read_bench's:
# one definition of "a cold dd" and of a table row for both benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import (
    MB, Results, Row, code_version, drop_caches, fmt, fmt_spread, fusermount_u, log, make_random_file,
    median, mount_fstype, parse_size, read_through, timed_dd, wait_for,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests/servers/s3.py is not part of the installed package
from tests.servers.s3 import S3Server

PY = sys.executable
TARGET_COLD = 0.8
BUCKET, KEY = "bench", "obj.bin"
CHUNK = 4 * 2**20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- process accounting ---------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    """CPU seconds of this process, all threads (boto3's transfer threads run here)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/PID/io")


def proc_hwm(pid: int) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


@dataclass
class Usage:
    """What one timed interval cost each side: the bottleneck is the side near 100% of a core."""

    wall: float
    server_cpu: float
    client_cpu: float
    server_reads: float  # whole-object reads by moto = its GETs (see the module docstring)


class Meter:
    """Samples wall time, CPU of moto and of the client, and moto's rchar, around one interval."""

    def __init__(self, server_pid: int, client_cpu, size: int) -> None:
        self.server_pid, self.client_cpu, self.size = server_pid, client_cpu, size
        self.t0 = time.monotonic()
        self.s0, self.c0, self.r0 = proc_cpu(server_pid), client_cpu(), proc_rchar(server_pid)

    def stop(self) -> Usage:
        return Usage(time.monotonic() - self.t0, proc_cpu(self.server_pid) - self.s0, self.client_cpu() - self.c0,
                     (proc_rchar(self.server_pid) - self.r0) / self.size)


# -- the S3 server ------------------------------------------------------------------------


def moto_version() -> str:
    import moto

    return moto.__version__


def server_spool_files(pid: int, size: int) -> list[str]:
    """moto's copies of the object: files (unlinked temp files) it holds open of at least ``size`` bytes.

    moto keeps an object bigger than a few MiB in a SpooledTemporaryFile,
    i.e. an unlinked file in /tmp; after drop_caches its first GET would read
    it from the disk. We want every contestant to find it in the page cache.
    """
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size >= size:
                out.append(path)
    return out


# -- the agent ----------------------------------------------------------------------------


class Agent:
    """One ``syncbit daemon --foreground --config FILE``: our child, so its pid is the agent's.

    Started in its own session, so that Ctrl-C reaches only this script, which
    then stops the agent and unmounts in order.
    """

    def __init__(self, work: Path, tag: str, env: dict[str, str]) -> None:
        self.mountpoint = work / f"mnt-{tag}"
        self.cache_dir = work / f"cache-{tag}"
        self.socket = work / f"agent-{tag}.sock"
        self.config = work / f"agent-{tag}.yaml"
        self.logfile = work / f"agent-{tag}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        import yaml

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # Only what must differ from the defaults: the benchmark measures the defaults.
        self.config.write_text(yaml.safe_dump({
            "mountpoint": str(self.mountpoint), "cache_dir": str(self.cache_dir), "socket": str(self.socket),
        }))
        with open(self.logfile, "ab") as log_f:
            self.proc = subprocess.Popen(
                [PY, "-m", "syncbit", "daemon", "--foreground", "--config", str(self.config)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}{self.log_tail()}")
            if mount_fstype(self.mountpoint) is None or not self.socket.exists():
                return False
            with contextlib.suppress(RuntimeError):
                self.api("GET", "/v1/status")
                return True
            return False

        wait_for(up, 60, "the agent's mount and API")

    def log_tail(self) -> str:
        try:
            return "\n--- agent log ---\n" + self.logfile.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> dict:
        """One request on the agent's Unix socket, with curl (no Python client start-up in timed code)."""
        cmd = ["curl", "-sS", "--fail-with-body", "--unix-socket", str(self.socket), "-X", method]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        r = subprocess.run([*cmd, f"http://agent{path}"], capture_output=True, text=True, timeout=timeout,
                           check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{method} {path} failed: {r.stdout.strip()} {r.stderr.strip()}")
        return json.loads(r.stdout)

    def register(self, uri: str, name: str, pin: bool, endpoint_url: str) -> None:
        """POST /v1/datasets: with pin=True, what ``syncbit pull URI --endpoint-url URL --no-wait`` sends."""
        self.api("POST", "/v1/datasets", {"uri": uri, "name": name, "pin": pin,
                                          "options": {"endpoint_url": endpoint_url}})

    def wait_ready(self, name: str, timeout: float) -> None:
        """Long-poll the dataset until the prefetch is done (what ``syncbit pull`` without --no-wait does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ds = self.api("GET", f"/v1/datasets/{name}?wait=10")
            if ds["state"] == "ready":
                return
            if ds["state"] == "failed":
                raise RuntimeError(f"dataset {name} failed: {ds['error']}{self.log_tail()}")
        raise RuntimeError(f"dataset {name} not ready after {timeout:.0f}s{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                self.api("POST", "/v1/shutdown", timeout=10)  # = syncbit unmount
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.terminate()  # the agent treats SIGTERM as a clean shutdown too
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        fusermount_u(self.mountpoint)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: mount_fstype(self.mountpoint) is None, 10, "the syncbit mount to go away")


# -- results ------------------------------------------------------------------------------


def print_table(res: Results, args, out=sys.stdout) -> None:
    hdr = ("#", "measurement", "unit", "value", "baseline", "baseline value", "ratio", "target", "result")
    lines = []
    for r in res.rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        result = "" if r.ok is None else ("PASS" if r.ok else "MISS")
        lines.append((r.phase, r.what, "MB/s", fmt_spread(r.syncbit, r.unit), r.baseline_name or "-",
                      fmt_spread(r.baseline, r.unit), ratio, r.target or "-", result))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *lines)]
    right = {3, 5, 6}

    def emit(cols):
        out.write("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                            for i, (c, w) in enumerate(zip(cols, widths))).rstrip() + "\n")

    out.write("\n")
    out.write(f"Syncbit S3 benchmark: {args.size / 2**30:.2f} GiB object on loopback, {os.cpu_count()} CPUs, "
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


def usage_summary(us: list[Usage]) -> str:
    """Medians over the repetitions: who burned the CPU, and how many GETs moto served."""
    if not us:
        return "-"
    srv = median([u.server_cpu / u.wall * 100 for u in us])
    cli = median([u.client_cpu / u.wall * 100 for u in us])
    gets = median([u.server_reads for u in us])
    return f"moto {srv:.0f}% of a core, client {cli:.0f}%; moto read the whole object {gets:.1f}x"


# -- the benchmark ------------------------------------------------------------------------


class Bench:
    def __init__(self, args, work: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.res = Results()
        self.server: S3Server | None = None
        self.samples: dict[str, list] = {}

    def cold_prep(self) -> None:
        """Empty page cache everywhere except moto's copy of the object: the server answers from memory."""
        drop_caches()
        for path in server_spool_files(self.server.proc.pid, self.args.size):
            read_through(path)

    def new_agent(self, tag: str) -> Agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCBIT_", "AWS_"))}
        env.update(self.server.credentials.env())  # the agent reads credentials from its environment
        shutil.rmtree(self.work / f"cache-{tag}", ignore_errors=True)  # a cold read starts from an empty cache
        agent = Agent(self.work, tag, env)
        self.stack.callback(agent.stop)
        agent.start()
        return agent

    def run(self) -> Results:
        a, res = self.args, self.res
        size, reps = a.size, a.repeat

        self.server = S3Server()
        self.stack.callback(self.server.stop)
        self.server.start()
        spid = self.server.proc.pid
        log(f"moto {moto_version()} serving {self.server.url} (pid {spid})")
        client = self.server.client()
        client.create_bucket(Bucket=BUCKET)

        src = self.work / "upload.bin"
        log(f"writing {size} bytes of random data and uploading them as s3://{BUCKET}/{KEY}")
        make_random_file(src, size)
        t0 = time.monotonic()
        client.upload_file(str(src), BUCKET, KEY)  # default TransferConfig: multipart, 8 MiB parts
        upload_s = time.monotonic() - t0
        src.unlink()
        head = client.head_object(Bucket=BUCKET, Key=KEY)
        if head["ContentLength"] != size:
            raise RuntimeError(f"uploaded object is {head['ContentLength']} bytes, expected {size}")
        spool = server_spool_files(spid, size)
        log(f"uploaded in {upload_s:.1f}s (ETag {head['ETag']}); moto spool files: {len(spool)}")

        # moto's cost per GET, on this object: it reads the whole object for
        # any range, so this bounds what any client can get from ranged GETs.
        self.cold_prep()
        lat = []
        for _ in range(3):
            t0 = time.monotonic()
            client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes=0-{CHUNK - 1}")["Body"].read()
            lat.append(time.monotonic() - t0)
        get_ms = median(lat) * 1000
        log(f"one 4 MiB ranged GET: {get_ms:.0f} ms")

        uri = f"s3://{BUCKET}/{KEY}"
        ceiling, dl, sb, lazy = [], [], [], []
        use = {"get_object": [], "download_file": [], "syncbit": [], "syncbit lazy": []}
        sb_total_reads, ready_s = [], []
        server_hwm = []
        for rep in range(reps):
            # ---- 1a. the server's ceiling: one GET, one stream ----
            self.cold_prep()
            m = Meter(spid, self_cpu, size)
            body = client.get_object(Bucket=BUCKET, Key=KEY)["Body"]
            got = 0
            while chunk := body.read(CHUNK):
                got += len(chunk)
            use["get_object"].append(m.stop())
            if got != size:
                raise RuntimeError(f"get_object returned {got} bytes, expected {size}")
            ceiling.append(size / use["get_object"][-1].wall)

            # ---- 1b. baseline: boto3's own download_file ----
            self.cold_prep()
            out = self.work / "download.bin"
            m = Meter(spid, self_cpu, size)
            client.download_file(BUCKET, KEY, str(out))  # default TransferConfig
            use["download_file"].append(m.stop())
            if out.stat().st_size != size:
                raise RuntimeError(f"download_file wrote {out.stat().st_size} bytes, expected {size}")
            out.unlink()
            dl.append(size / use["download_file"][-1].wall)

            # ---- 2. Syncbit cold read, pinned (= pull --no-wait), prefetcher running ----
            self.cold_prep()
            agent = self.new_agent("pin")
            m = Meter(spid, lambda agent=agent: proc_cpu(agent.pid), size)
            agent.register(uri, "ds", pin=True, endpoint_url=self.server.url)
            timed_dd(agent.mountpoint / "ds" / KEY, size)
            use["syncbit"].append(m.stop())
            sb.append(size / use["syncbit"][-1].wall)
            # The rest of the prefetch, so that no GET of this agent overlaps the next contestant.
            agent.wait_ready("ds", timeout=max(600, size / (1 * MB)))
            ready_s.append(time.monotonic() - m.t0)
            sb_total_reads.append((proc_rchar(spid) - m.r0) / size)
            agent.stop()

            # ---- 2i. Syncbit cold read, unpinned: read path and readahead alone ----
            if a.lazy:
                self.cold_prep()
                agent = self.new_agent("lazy")
                m = Meter(spid, lambda agent=agent: proc_cpu(agent.pid), size)
                agent.register(uri, "ds", pin=False, endpoint_url=self.server.url)
                timed_dd(agent.mountpoint / "ds" / KEY, size)
                use["syncbit lazy"].append(m.stop())
                lazy.append(size / use["syncbit lazy"][-1].wall)
                agent.stop()
            server_hwm.append(proc_hwm(spid))
            log(f"#{rep + 1}: get_object {ceiling[-1] / MB:.0f}, download_file {dl[-1] / MB:.0f}, "
                f"syncbit {sb[-1] / MB:.0f}" + (f", syncbit lazy {lazy[-1] / MB:.0f}" if lazy else "") + " MB/s")

        res.add(Row("1a", "server ceiling: 1 get_object, whole body", "MB", ceiling))
        res.add(Row("1b", "boto3 download_file (default TransferConfig)", "MB", dl, "get_object", ceiling))
        res.add(Row("2", "cold read: syncbit pull --no-wait + dd", "MB", sb, "download_file", dl,
                    target=f">= {TARGET_COLD:g}x", min_ratio=TARGET_COLD))
        res.add(Row("2", "cold read vs server ceiling (info)", "MB", sb, "get_object", ceiling))
        if lazy:
            res.add(Row("2i", "cold read, lazy only (pin=false)", "MB", lazy, "download_file", dl,
                        note="2i (info): registered with pin=false, no background prefetch: the FUSE read "
                             "path and its readahead alone."))

        res.info["server"] = (f"moto {moto_version()} server mode (ThreadedMotoServer, werkzeug), own process, "
                              f"SigV4 checked; object uploaded by upload_file in {upload_s:.1f}s, "
                              f"ETag {head['ETag']}, spooled to {len(spool)} temp file(s)")
        res.info["moto cost per GET"] = (
            f"one 4 MiB ranged GET of this object: {get_ms:.0f} ms (moto reads the whole object for any range), "
            f"so ranged GETs of R MiB, served one at a time, top out near R MiB / {get_ms:.0f} ms")
        for name, us in use.items():
            if us:
                res.info[f"cpu and GETs, {name}"] = usage_summary(us)
        res.info["syncbit pinned, until the prefetch was complete"] = (
            f"{median(ready_s):.1f}s after the registration (median), moto read the whole object "
            f"{median(sb_total_reads):.1f}x (median)")
        res.info["peak RSS (VmHWM) of moto"] = f"{fmt(max(h or 0 for h in server_hwm), 'MB')} MB"
        self.samples = {k: [u.__dict__ for u in v] for k, v in use.items()}
        return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="object size (default 1GiB)")
    p.add_argument("--repeat", type=int, default=3,
                   help="repetitions of each measurement; the table shows the median (default 3)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory (default: %(default)s)")
    p.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="skip the informational lazy (unpinned) cold read")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = p.parse_args()

    if os.geteuid() != 0:
        p.error("run as root: FUSE mounts, drop_caches and /proc/PID/fd of the server need it")
    for tool in ("fusermount3", "curl", "dd"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    if args.size < 16 * 2**20:
        p.error("--size must be at least 16MiB")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    # SIGTERM/SIGHUP should unwind through the finally blocks like Ctrl-C does.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    work = Path(tempfile.mkdtemp(prefix="syncbit-s3bench-", dir=args.workdir))
    log(f"work directory {work}")
    started = time.monotonic()
    version, mtime0 = code_version()
    load0 = os.getloadavg()[0]
    import boto3
    import botocore

    args.header_lines = [version,
                         (f"server: moto {moto_version()} in server mode, own process, on loopback; "
                          f"client: boto3 {boto3.__version__} / botocore {botocore.__version__}")]
    log(version)
    res = bench = None
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
                       "usage": bench.samples,
                       "info": {k: str(v) for k, v in res.info.items()}}, f, indent=2)
    misses = [r for r in res.rows if r.ok is False] if res else []
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
