#!/usr/bin/env python3
"""Swarm benchmark: one dataset to N nodes at once, Syncbit against plain HTTP and a BitTorrent swarm.

Run as root (network namespaces, tc, FUSE mounts, ``drop_caches``) with the
venv's interpreter::

    /work/venv/bin/python tools/bench/swarm_bench.py [--nodes 4] [--size 512MiB]
        [--rate 200mbit] [--repeat 1] [--only syncbit,http,bt] [--ref REF]
        [--heartbeat 0.5s] [--bt-piece 256KiB] [--timeline] [--json out.json] [--keep]

The test bed is ``tools/netbed.py``: every host is a network namespace with
one veth on a bridge, its link shaped with ``tbf`` at ``--rate`` each way.
Hosts: ``cp`` (the control plane and the BitTorrent tracker), ``origin``
(``python -m syncbit.demo.origin``, and the first BitTorrent seeder) and
``n0`` .. ``n{N-1}``. Processes run with ``nsenter --net=...`` (network
namespace only, so FUSE mounts stay visible here). The dataset is one file of
``--size`` random bytes; F is its size, B one link's rate (bytes/s), and F/B
the lower bound on the time for any node to receive it (and for the origin to
send it once).

Each repetition measures, in this order, each after ``sync``,
``drop_caches`` and one read of the origin's file (so the origin serves from
memory and no contestant inherits another's dirty pages):

1. Syncbit. A fresh control plane (``syncbit server``, heartbeat interval
   ``--heartbeat``) and N fresh agents (``syncbit daemon --foreground``,
   empty caches, block size ``--block-size``, peers on, one cluster secret),
   all registered; the dataset added (``POST /v1/datasets``, what ``syncbit
   dataset add`` sends). Timed from ``PUT /v1/datasets/d/assignment`` with
   all N nodes (what ``syncbit assign d --nodes ...`` sends) until the last
   agent logs ``dataset d is ready`` (its own clock, in its log). The time
   the control plane answers ``GET /v1/datasets/d/wait`` (``syncbit wait``)
   is shown too: it adds up to one heartbeat. Afterwards every node's file is
   read through its mount and hashed (``--no-verify`` skips).
2. Plain HTTP: ``curl -o FILE URL`` in each node's namespace, all N started at
   once; timed until the last one exits. Also (reference, not a target) one
   curl alone: what one link really carries (TCP/IP and Ethernet headers
   count against the tbf rate, so even one download takes ~1.05 x F/B).
3. BitTorrent: ``mktorrent`` (piece ``--bt-piece``, tracker on ``cp``),
   ``opentracker`` on ``cp`` (Debian's is built with a whitelist: the info
   hash is written to it), ``aria2c`` seeding from the origin host
   (``--bt-seed-unverified``, seeding forever) and announced before the clock
   starts; then N ``aria2c`` leechers, one per node namespace, started at once
   (DHT and local peer discovery off, ``--seed-ratio=0.0`` so they keep
   seeding, ``--file-allocation=none``). Timed until the last leecher's
   ``--on-bt-download-complete`` hook has run. Without opentracker a tiny
   HTTP tracker in this file is used (``--bt-tracker python``).

Origin egress is tc's byte counter on the origin's side of its link
(``tc -s qdisc show dev eth0`` in its namespace), so it counts TCP/IP and
Ethernet headers: one copy of F costs ~1.05 x F on the wire. The origin
process's own payload count (``wchar``) is in the notes for Syncbit and HTTP.

Targets: Syncbit <= 1.15 x F/B; Syncbit faster than the aria2c swarm of the
same run; Syncbit's origin egress <= 1.1 x F. Exit status 1 if one is missed.

Everything started is stopped (agents unmounted), and the namespaces and
bridge removed, in a ``finally``: also on errors, Ctrl-C, SIGTERM and SIGHUP.
The work directory (default under /tmp) is removed unless ``--keep``.

Notes printed under the table: per node, when the agent applied the
assignment (its log), bytes it took from the source and from peers and sent
to peers (its metrics, sampled every second over its socket), and when it was
ready; CPU seconds used by the agents and by aria2c; with ``--timeline`` the
per-second link rates of the origin and every node for each contestant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Generic helpers shared with the other benchmarks live in read_bench (as for s3_bench).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import drop_caches, log, median, mount_fstype, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

PY = sys.executable
MB = 1e6
MiB = 2**20
TARGET_TIME = 1.15  # x F/B
TARGET_EGRESS = 1.1  # x F
NETBED_PREFIX = "sbs"
CP_PORT = 7070
PEER_PORT = 7071
ORIGIN_PORT = 8080
TRACKER_PORT = 6969
BT_PORT = 6881
DATA_NAME = "data.bin"
DATASET = "d"


# -- parsing --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (examples: 512MiB, 64MiB, 1GiB)")
    num, unit = float(m.group(1)), m.group(2).rstrip("b")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
            "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(num * mult)


def parse_rate(text: str) -> float:
    """tc's rate syntax -> bytes/s: 200mbit, 1gbit, 500kbit; 25mbps is bytes (as in tc)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?)(bit|bps)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse rate {text!r} (examples: 200mbit, 1gbit, 25mbps)")
    num, prefix, unit = float(m.group(1)), m.group(2), m.group(3)
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
            "ti": 2**40}[prefix]
    return num * mult / (8 if unit == "bit" else 1)


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse duration {text!r} (examples: 0.5s, 5s)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


# -- system helpers -------------------------------------------------------------------


def sh(*argv: str, check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def read_through(path: Path) -> None:
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (ours, by its id)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_wchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def make_random_file(path: Path, size: int) -> None:
    """Random bytes, unique per 64 KiB (no two blocks or pieces alike): a 64 MiB random pool
    sliced at moving offsets, every 64 KiB stamped with its own offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = os.urandom(64 << 20) + os.urandom(1 << 20)
    chunk = 1 << 20
    with open(path, "wb") as f:
        off = i = 0
        while off < size:
            n = min(chunk, size - off)
            start = (i * 7919 * 4096) % (64 << 20)
            buf = bytearray(pool[start:start + n])
            for k in range(0, n - 7, 64 << 10):
                struct.pack_into("<Q", buf, k, off + k)
            f.write(buf)
            off += n
            i += 1


def egress(host) -> int:
    """Bytes the host sent on its link (tc's counter on its side of the veth), as test_netbed.py reads it."""
    out = sh("tc", "-n", host.netns, "-s", "qdisc", "show", "dev", "eth0").stdout
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


def link_counters(host) -> tuple[int, int]:
    """(bytes the host received, bytes it sent): the bridge-side veth's counters, read from sysfs."""
    base = f"/sys/class/net/{host.veth_bridge}/statistics"
    with open(f"{base}/tx_bytes") as f:
        rx = int(f.read())
    with open(f"{base}/rx_bytes") as f:
        tx = int(f.read())
    return rx, tx


def code_version(src: Path) -> tuple[str, float]:
    """(what syncbit code runs, newest mtime of its sources)."""
    pkg = src / "syncbit"
    newest = max((f.stat().st_mtime for f in pkg.rglob("*.py")), default=0.0)
    if src != REPO:
        return f"syncbit exported to {src}", newest
    desc = f"syncbit from {pkg}"
    try:
        head = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD").stdout.strip()
        diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "syncbit"], capture_output=True,
                              check=True).stdout
        untracked = sh("git", "-C", str(REPO), "ls-files", "--others", "--exclude-standard", "syncbit").stdout.split()
        if diff or untracked:
            h = hashlib.sha1(diff + "\n".join(untracked).encode()).hexdigest()[:10]
            desc += f", git {head} + uncommitted changes (diff sha1 {h}"
            desc += f", {len(untracked)} untracked file(s))" if untracked else ")"
        else:
            desc += f", git {head} (clean)"
    except (OSError, subprocess.CalledProcessError, RuntimeError):
        pass
    return desc, newest


def export_ref(ref: str, dest: Path) -> str:
    """``git archive REF syncbit`` into dest; returns the commit."""
    commit = sh("git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}").stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit, "syncbit"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed")
    return commit


# -- tools ------------------------------------------------------------------------------


def ensure_tools(want_bt: bool, tracker: str, install: bool) -> str:
    """Check (and with apt-get install) aria2c, mktorrent, opentracker; returns the tracker to use."""
    for tool in ("ip", "tc", "nsenter", "fusermount3", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    if not want_bt:
        return tracker
    need = {"aria2c": "aria2", "mktorrent": "mktorrent"}
    if tracker in ("auto", "opentracker"):
        need["opentracker"] = "opentracker"
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    if missing and install:
        installable = []
        for pkg in missing:
            pol = sh("apt-cache", "policy", pkg, check=False).stdout
            cand = re.search(r"Candidate:\s*(\S+)", pol)
            if cand and cand.group(1) != "(none)":
                installable.append(pkg)
            else:
                log(f"apt has no candidate for {pkg}")
        if installable:
            log(f"installing {' '.join(installable)} with apt-get")
            r = subprocess.run(["apt-get", "install", "-y", "-q", *installable], capture_output=True, text=True,
                               env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if r.returncode != 0:
                log(f"apt-get install failed: {r.stderr.strip()[-500:]}")
    for tool in ("aria2c", "mktorrent"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {need[tool]}), or leave bt out of --only")
    if tracker == "auto":
        tracker = "opentracker" if shutil.which("opentracker") else "python"
    if tracker == "opentracker" and shutil.which("opentracker") is None:
        raise SystemExit("opentracker is not installed (apt-get install opentracker), or use --bt-tracker python")
    return tracker


# -- bencode and a tiny HTTP tracker (the fallback when there is no opentracker) ------


def bdecode(b: bytes, i: int = 0):
    c = b[i:i + 1]
    if c == b"i":
        j = b.index(b"e", i)
        return int(b[i + 1:j]), j + 1
    if c in (b"l", b"d"):
        i += 1
        out = []
        while b[i:i + 1] != b"e":
            v, i = bdecode(b, i)
            out.append(v)
        return (out if c == b"l" else dict(zip(out[::2], out[1::2]))), i + 1
    j = b.index(b":", i)
    n = int(b[i:j])
    return b[j + 1:j + 1 + n], j + 1 + n


def bencode(v) -> bytes:
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, list):
        return b"l" + b"".join(map(bencode, v)) + b"e"
    if isinstance(v, dict):
        items = sorted((k.encode() if isinstance(k, str) else k, x) for k, x in v.items())
        return b"d" + b"".join(bencode(k) + bencode(x) for k, x in items) + b"e"
    raise TypeError(type(v))


def torrent_info_hash(path: Path) -> bytes:
    data = path.read_bytes()
    top, _ = bdecode(data)
    assert b"info" in top
    i = data.index(b"4:info") + 6
    _, end = bdecode(data, i)
    return hashlib.sha1(data[i:end]).digest()


class _TrackerHandler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query, keep_blank_values=True, encoding="latin-1")
        swarms = self.server.swarms
        if url.path == "/announce":
            ih = q.get("info_hash", [""])[0].encode("latin-1")
            try:
                port = int(q["port"][0])
                left = int(q.get("left", ["1"])[0])
            except (KeyError, ValueError):
                return self._reply({"failure reason": "bad announce"})
            ip = q.get("ip", [self.client_address[0]])[0]
            event = q.get("event", [""])[0]
            with self.server.lock:
                swarm = swarms.setdefault(ih, {})
                if event == "stopped":
                    swarm.pop((ip, port), None)
                else:
                    swarm[(ip, port)] = left
                others = [p for p in swarm if p != (ip, port)]
                complete = sum(1 for v in swarm.values() if v == 0)
            peers = b"".join(socket.inet_aton(h) + struct.pack(">H", p) for h, p in others)
            return self._reply({"interval": 30, "min interval": 5, "complete": complete,
                                "incomplete": len(others) + 1 - complete, "peers": peers})
        if url.path == "/scrape":
            files = {}
            with self.server.lock:
                for ih in q.get("info_hash", []):
                    swarm = swarms.get(ih.encode("latin-1"), {})
                    c = sum(1 for v in swarm.values() if v == 0)
                    files[ih.encode("latin-1")] = {"complete": c, "downloaded": 0, "incomplete": len(swarm) - c}
            return self._reply({"files": files})
        self.send_error(404)

    def _reply(self, d: dict) -> None:
        body = bencode(d)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_tracker(host: str, port: int) -> None:
    """``swarm_bench.py --serve-tracker HOST:PORT``: the BitTorrent HTTP tracker, compact peers only."""
    srv = ThreadingHTTPServer((host, port), _TrackerHandler)
    srv.daemon_threads = True
    srv.swarms = {}
    srv.lock = threading.Lock()
    print("ready", flush=True)
    srv.serve_forever()


def scrape_complete(url: str, info_hash: bytes) -> int:
    try:
        with urllib.request.urlopen(f"{url}/scrape?info_hash={urllib.parse.quote(info_hash)}", timeout=2) as r:
            d, _ = bdecode(r.read())
    except (OSError, ValueError):
        return 0
    return int(d.get(b"files", {}).get(info_hash, {}).get(b"complete", 0))


# -- processes --------------------------------------------------------------------------


class Proc:
    """A process we started (in a namespace: nsenter execs, so the pid is the program's)."""

    cwd: str | None = None  # python -m puts the current directory first on sys.path: not the repository

    def __init__(self, argv: list[str], log_path: Path | None, env: dict | None = None,
                 stdout=None) -> None:
        self.argv = argv
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout or out,
                                         stderr=out, env=env, cwd=self.cwd)
        finally:
            if log_path:
                out.close()
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def clean_env(pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBIT_")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def fusermount_u(path: Path) -> None:
    if mount_fstype(path) is None:
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        time.sleep(0.5)
        if mount_fstype(path) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Agent:
    def __init__(self, name: str, host, base: Path, server_url: str, secret: Path, args, env: dict) -> None:
        self.name = name
        self.host = host
        self.base = base
        self.mnt = base / "mnt"
        self.cache = base / "cache"
        self.sock = base / "agent.sock"
        self.log_path = self.cache / "agent.log"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        cfg = {
            "node_name": name, "server": server_url, "heartbeat_interval": f"{args.heartbeat}s",
            "block_size": args.block_size, "peer_listen": f"{host.address}:{PEER_PORT}",
            "cluster_secret_file": str(secret), "mountpoint": str(self.mnt), "cache_dir": str(self.cache),
            "socket": str(self.sock), "min_free_disk": "0", "log_level": args.agent_log_level,
        }
        self.config_path = base / "agent.yaml"
        self.config_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        self.proc = Proc([*host.prefix(), PY, "-m", "syncbit", "daemon", "--foreground", "--config",
                          str(self.config_path)], self.log_path, env=env)
        self._http = None

    def http(self):
        import httpx

        if self._http is None:
            self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://agent",
                                      timeout=10)
        return self._http

    def wait_up(self, timeout: float = 60) -> None:
        def up() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"agent {self.name} exited with {self.proc.proc.returncode}:\n{self.log()[-3000:]}")
            return self.sock.exists() and mount_fstype(self.mnt) is not None
        wait_for(up, timeout, f"agent {self.name} to mount")

    def metrics(self) -> dict[str, float]:
        """The counters we follow, from /metrics on the agent's socket."""
        text = self.http().get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r'syncbit_agent_bytes_total\{origin="(\w+)"\} (\S+)', line)
            if m:
                out[m.group(1)] = float(m.group(2))
                continue
            m = re.match(r'syncbit_agent_peer_bytes_total\{direction="(\w+)",peer="[^"]*"\} (\S+)', line)
            if m:
                out[f"peer_{m.group(1)}"] = out.get(f"peer_{m.group(1)}", 0.0) + float(m.group(2))
                continue
            m = re.match(r'syncbit_agent_relay_bytes_total\{direction="(\w+)"\} (\S+)', line)
            if m:
                out[f"relay_{m.group(1)}"] = float(m.group(2))
                continue
            m = re.match(r'syncbit_agent_peer_errors_total\{reason="([^"]+)"\} (\S+)', line)
            if m:
                out[f"err_{m.group(1)}"] = float(m.group(2))
        return out

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_times(self) -> dict:
        """Wall-clock times of the agent's log lines we care about; ``source_gets``: [(time, bytes)] of
        the HTTP source's requests (urllib3's DEBUG line, written when the answer's headers arrive)."""
        out: dict = {"source_gets": []}
        for line in self.log().splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)", line)
            if not m:
                continue
            ts = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            msg = m.group(2)
            if msg.startswith(f"dataset {DATASET}: snapshot") and "is current" in msg:
                out.setdefault("assigned", ts)
            elif msg == f"dataset {DATASET} is ready":
                out.setdefault("ready", ts)
            elif msg.startswith(f"dataset {DATASET} is "):
                out.setdefault("finished_" + msg.rsplit(" ", 1)[1], ts)
            else:
                g = re.search(rf'"GET /{DATA_NAME} HTTP/1.1" 20[06] (\d+)', msg)
                if g:
                    out["source_gets"].append((ts, int(g.group(1))))
        return out

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self.proc.stop(timeout=20)
        fusermount_u(self.mnt)


# -- results -----------------------------------------------------------------------------


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


@dataclass
class Sample:
    """One contestant, one repetition."""
    seconds: float  # until the last node had the data
    egress: int  # tc bytes the origin sent
    per_node: dict[str, float] = field(default_factory=dict)  # node -> seconds when it had the data
    extra: dict = field(default_factory=dict)
    timeline: list = field(default_factory=list)


class Sampler:
    """Every ``period`` seconds every host's link counters (sysfs); in another thread, every
    ``metrics_every`` seconds, the agents' metrics (a slow agent must not delay the link samples)."""

    def __init__(self, hosts: dict, period: float = 0.5, agents: list[Agent] | None = None,
                 metrics_every: float = 1.0) -> None:
        self.hosts = hosts
        self.period = period
        self.agents = agents or []
        self.metrics_every = metrics_every
        self.rows: list[dict] = []
        self.metrics: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._links, daemon=True)]
        if self.agents and metrics_every > 0:
            self._threads.append(threading.Thread(target=self._metrics, daemon=True))
        self.t0 = time.monotonic()

    def start(self, t0: float) -> Sampler:
        self.t0 = t0
        for th in self._threads:
            th.start()
        return self

    def _links(self) -> None:
        k = 0
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.rows.append({"t": time.monotonic() - self.t0, **{n: link_counters(h) for n, h in self.hosts.items()}})
            k += 1
            self._stop.wait(max(0.0, self.t0 + k * self.period - time.monotonic()))

    def _metrics(self) -> None:
        k = 0
        while not self._stop.is_set():
            snap = {"t": time.monotonic() - self.t0}
            for a in self.agents:
                with contextlib.suppress(Exception):
                    snap[a.name] = a.metrics()
            self.metrics.append(snap)
            k += 1
            self._stop.wait(max(0.0, self.t0 + k * self.metrics_every - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            if th.is_alive():
                th.join()
        with contextlib.suppress(OSError):
            self.rows.append({"t": time.monotonic() - self.t0, **{n: link_counters(h) for n, h in self.hosts.items()}})

    def per_second(self, names: list[str]) -> list[dict]:
        """[{t, origin_tx, <node>_rx...}] in MB/s over 1 s steps."""
        out = []
        if len(self.rows) < 2:
            return out
        step = max(1, round(1.0 / self.period))
        rows = self.rows[::step] + ([self.rows[-1]] if (len(self.rows) - 1) % step else [])
        for a, b in itertools.pairwise(rows):
            dt = b["t"] - a["t"]
            if dt <= 0:
                continue
            d = {"t": round(b["t"], 1), "origin_tx": (b["origin"][1] - a["origin"][1]) / dt / MB}
            for n in names:
                d[f"{n}_rx"] = (b[n][0] - a[n][0]) / dt / MB
                d[f"{n}_tx"] = (b[n][1] - a[n][1]) / dt / MB
            out.append(d)
        return out


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, args, work: Path, stack: contextlib.ExitStack, bed, tracker_kind: str,
                 pythonpath: str | None) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.bed = bed
        self.tracker_kind = tracker_kind
        self.env = clean_env(pythonpath)
        self.size = args.size
        self.src = work / "src"
        self.file = self.src / DATA_NAME
        self.cp = bed.add_host("cp")
        self.origin_host = bed.add_host("origin")
        self.nodes = [bed.add_host(f"n{i}") for i in range(args.nodes)]
        self.names = [h.name for h in self.nodes]
        self.hosts = {"origin": self.origin_host, **{h.name: h for h in self.nodes}}
        self.results: dict[str, list[Sample]] = {}
        self.digest = ""
        self.origin: Proc | None = None
        self.origin_url = ""
        self.timeout = args.timeout or (3 * args.nodes * self.size / args.rate_bps + 120)

    def add(self, key: str, s: Sample) -> None:
        self.results.setdefault(key, []).append(s)

    def prep(self) -> None:
        """No dirty pages from the last contestant; the origin's file in memory."""
        drop_caches()
        read_through(self.file)

    def setup(self) -> None:
        log(f"writing {self.size} bytes of random data to {self.file}")
        make_random_file(self.file, self.size)
        self.digest = file_digest(self.file)
        self.origin = Proc([*self.origin_host.prefix(), PY, "-m", "syncbit.demo.origin", str(self.src),
                            str(ORIGIN_PORT), self.origin_host.address], None, env=self.env, stdout=subprocess.PIPE)
        self.stack.callback(self.origin.stop)
        line = self.origin.proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"origin did not start (said {line!r})")
        self.origin_url = line
        if "bt" in self.args.only:
            self.torrent = self.work / "data.torrent"
            self.tracker_url = f"http://{self.cp.address}:{TRACKER_PORT}"
            sh("mktorrent", "-l", str(self.args.bt_piece.bit_length() - 1), "-a", f"{self.tracker_url}/announce",
               "-o", str(self.torrent), str(self.file), timeout=600)
            self.info_hash = torrent_info_hash(self.torrent)

    # ---- Syncbit -----------------------------------------------------------------------

    def run_syncbit(self, rep: int) -> Sample:
        import httpx

        a = self.args
        base = self.work / f"syncbit-{rep}"
        base.mkdir()
        secret = base / "cluster.secret"
        secret.write_text(os.urandom(24).hex())
        server_url = f"http://{self.cp.address}:{CP_PORT}"
        (base / "cp").mkdir()
        server_cfg = {"listen": f"{self.cp.address}:{CP_PORT}", "db": str(base / "cp" / "state.sqlite"),
                      "node_down_after": "30s", "heartbeat_interval": f"{a.heartbeat}s", "log_level": "INFO"}
        (base / "cp" / "server.yaml").write_text(json.dumps(server_cfg, indent=1))
        server = Proc([*self.cp.prefix(), PY, "-m", "syncbit", "server", "--config", str(base / "cp" / "server.yaml")],
                      base / "cp" / "server.log", env=self.env)
        agents: list[Agent] = []
        cleanup = contextlib.ExitStack()
        self.stack.enter_context(cleanup)  # also unwound by the main stack on Ctrl-C
        cleanup.callback(server.stop)
        http = cleanup.enter_context(httpx.Client(base_url=server_url, timeout=httpx.Timeout(60, connect=5)))

        def api(method: str, path: str, **kw):
            r = http.request(method, path, **kw)
            if r.status_code >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
            return r.json()

        def server_up() -> bool:
            if not server.alive():
                raise RuntimeError(f"control plane exited:\n{(base / 'cp' / 'server.log').read_text()[-3000:]}")
            try:
                return http.get("/v1/status", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(server_up, 30, "the control plane", poll=0.1)
        for h in self.nodes:
            ag = Agent(h.name, h, base / h.name, server_url, secret, a, self.env)
            agents.append(ag)
            cleanup.callback(ag.stop)
        for ag in agents:
            ag.wait_up()
        wait_for(lambda: sum(n["up"] for n in api("GET", "/v1/nodes")["nodes"]) == len(agents), 60,
                 "every agent registered", poll=0.2)
        api("POST", "/v1/datasets", json={"name": DATASET, "uri": self.origin_url})

        self.prep()
        e0 = egress(self.origin_host)
        w0 = proc_wchar(self.origin.pid)
        cpu0 = {ag.name: cpu_seconds(ag.proc.pid) for ag in agents}
        cpu_cp0 = cpu_seconds(server.pid)
        t0 = time.monotonic()
        sampler = Sampler(self.hosts, agents=agents, metrics_every=a.metrics_every).start(t0)
        try:
            wall0 = time.time()
            api("PUT", f"/v1/datasets/{DATASET}/assignment", json={"nodes": self.names})
            state, reason = "waiting", ""
            while time.monotonic() - t0 < self.timeout:
                left = max(1.0, min(30.0, self.timeout - (time.monotonic() - t0)))
                r = api("GET", f"/v1/datasets/{DATASET}/wait", params={"timeout": str(left)},
                        timeout=httpx.Timeout(left + 30, connect=5))
                state, reason = r["state"], r.get("reason")
                if state != "waiting":
                    break
            t_cp = time.monotonic() - t0
        finally:
            sampler.stop()
        if state != "ready":
            raise RuntimeError(f"Syncbit: dataset {state} after {time.monotonic() - t0:.0f}s: {reason}")
        sent = egress(self.origin_host) - e0
        wchar = proc_wchar(self.origin.pid)
        cpu = {ag.name: (cpu_seconds(ag.proc.pid) or 0) - (cpu0[ag.name] or 0) for ag in agents}
        cpu_cp = (cpu_seconds(server.pid) or 0) - (cpu_cp0 or 0)
        final = {ag.name: ag.metrics() for ag in agents}
        per_node, assigned, gets = {}, {}, {}
        for ag in agents:
            lt = ag.log_times()
            gets[ag.name] = [(t - wall0, n) for t, n in lt["source_gets"]]
            if "ready" not in lt:
                raise RuntimeError(f"agent {ag.name} is ready for the control plane but logged no "
                                   f"'dataset {DATASET} is ready':\n{ag.log()[-2000:]}")
            per_node[ag.name] = lt["ready"] - wall0
            assigned[ag.name] = lt.get("assigned", float("nan")) - wall0
        seconds = max(per_node.values())
        log(f"syncbit #{rep + 1}: all {len(agents)} ready {seconds:.1f}s (control plane said so at {t_cp:.1f}s), "
            f"origin sent {sent / self.size:.3f} x F")
        if a.verify:
            for ag in agents:
                got = file_digest(ag.mnt / DATASET / DATA_NAME)
                if got != self.digest:
                    raise RuntimeError(f"{ag.name}: the file read through the mount differs from the source")
            log(f"syncbit #{rep + 1}: all {len(agents)} copies read back through the mounts and match")
        sample = Sample(seconds, sent, per_node, extra={
            "control_plane_ready": t_cp, "assigned": assigned, "source_gets": gets, "metrics": final, "cpu_agents": cpu,
            "cpu_control_plane": cpu_cp, "origin_payload": (wchar - w0) if wchar is not None and w0 is not None
            else None, "metrics_samples": sampler.metrics, "verified": a.verify,
        }, timeline=sampler.per_second(self.names))
        sample.extra["link_rows"] = sampler.rows
        cleanup.close()
        if a.keep:
            for ag in agents:
                shutil.rmtree(ag.cache / "blocks", ignore_errors=True)  # keep logs and index, not the data
        else:
            shutil.rmtree(base, ignore_errors=True)
        return sample

    # ---- plain HTTP ----------------------------------------------------------------------

    def _curls(self, hosts: list, tag: str) -> Sample:
        base = self.work / tag
        base.mkdir()
        url = self.origin_url + DATA_NAME
        self.prep()
        e0 = egress(self.origin_host)
        w0 = proc_wchar(self.origin.pid)
        t0 = time.monotonic()
        sampler = Sampler(self.hosts).start(t0)
        done: dict[str, float] = {}
        procs = {}
        try:
            for h in hosts:
                procs[h.name] = subprocess.Popen(
                    [*h.prefix(), "curl", "-sS", "--fail", "-o", str(base / f"{h.name}.out"), "-w",
                     "%{size_download}", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

            def waiter(name: str, p: subprocess.Popen) -> None:
                p.wait()
                done[name] = time.monotonic() - t0

            threads = [threading.Thread(target=waiter, args=kv, daemon=True) for kv in procs.items()]
            for th in threads:
                th.start()
            for th in threads:
                th.join(max(1.0, self.timeout - (time.monotonic() - t0)))
        finally:
            sampler.stop()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for name, p in procs.items():
            out, err = p.communicate()
            if p.returncode != 0 or out.strip() != str(self.size):
                raise RuntimeError(f"curl on {name} failed ({p.returncode}, got {out.strip()} bytes): {err.strip()}")
        sent = egress(self.origin_host) - e0
        wchar = proc_wchar(self.origin.pid)
        shutil.rmtree(base, ignore_errors=True)
        return Sample(max(done.values()), sent, done,
                      extra={"origin_payload": (wchar - w0) if wchar is not None and w0 is not None else None},
                      timeline=sampler.per_second(self.names))

    def run_http(self, rep: int) -> tuple[Sample, Sample | None]:
        many = self._curls(self.nodes, f"http-{rep}")
        log(f"http #{rep + 1}: {len(self.nodes)} curl at once {many.seconds:.1f}s, origin sent "
            f"{many.egress / self.size:.2f} x F")
        one = None
        if self.args.reference:
            one = self._curls(self.nodes[:1], f"http1-{rep}")
            log(f"http #{rep + 1}: one curl alone {one.seconds:.1f}s ({self.size / one.seconds / MB:.1f} MB/s)")
        return many, one

    # ---- BitTorrent ------------------------------------------------------------------------

    def run_bt(self, rep: int) -> Sample:
        base = self.work / f"bt-{rep}"
        base.mkdir()
        cleanup = contextlib.ExitStack()
        self.stack.enter_context(cleanup)
        if self.tracker_kind == "opentracker":
            tdir = base / "tracker"
            tdir.mkdir()
            (tdir / "whitelist").write_text(self.info_hash.hex() + "\n")
            # It chroots into -d, so the whitelist is named as seen from inside.
            tracker = Proc([*self.cp.prefix(), "opentracker", "-i", self.cp.address, "-p", str(TRACKER_PORT),
                            "-P", str(TRACKER_PORT), "-d", str(tdir), "-w", "/whitelist"], base / "tracker.log")
        else:
            tracker = Proc([*self.cp.prefix(), PY, str(Path(__file__).resolve()), "--serve-tracker",
                            f"{self.cp.address}:{TRACKER_PORT}"], base / "tracker.log", env=self.env)
        cleanup.callback(tracker.stop)

        def tracker_up() -> bool:
            if not tracker.alive():
                raise RuntimeError(f"tracker exited: {(base / 'tracker.log').read_text()[-1000:]}")
            try:
                with socket.create_connection((self.cp.address, TRACKER_PORT), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(tracker_up, 20, "the tracker", poll=0.1)
        common = ["--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--seed-ratio=0.0",
                  f"--listen-port={BT_PORT}", "--summary-interval=0", "--console-log-level=warn",
                  "--log-level=notice", "--file-allocation=none", "--bt-tracker-connect-timeout=5",
                  "--bt-tracker-timeout=10", f"--torrent-file={self.torrent}"]
        seed_dir = base / "seed"  # not the origin's directory: Syncbit's dataset is its listing
        seed_dir.mkdir()
        os.link(self.file, seed_dir / DATA_NAME)  # same inode: same page cache
        seeder = Proc([*self.origin_host.prefix(), "aria2c", f"--dir={seed_dir}", "--bt-seed-unverified=true",
                       f"--log={base / 'seeder.aria2.log'}", *common], base / "seeder.out")
        cleanup.callback(seeder.stop)
        wait_for(lambda: seeder.alive() and scrape_complete(self.tracker_url, self.info_hash) >= 1, 60,
                 "the seeder to announce itself", poll=0.2)

        self.prep()
        e0 = egress(self.origin_host)
        leechers: dict[str, Proc] = {}
        for h in self.nodes:
            d = base / h.name
            d.mkdir()
            hook = d / "done.sh"
            hook.write_text(f"#!/bin/sh\ndate +%s.%N > {d / 'done.tmp'} && mv {d / 'done.tmp'} {d / 'done'}\n")
            hook.chmod(0o755)
        t0 = time.monotonic()
        sampler = Sampler(self.hosts).start(t0)
        try:
            wall0 = time.time()
            for h in self.nodes:
                d = base / h.name
                leechers[h.name] = p = Proc([*h.prefix(), "aria2c", f"--dir={d}", f"--log={d / 'aria2.log'}",
                                             f"--on-bt-download-complete={d / 'done.sh'}", *common], d / "aria2.out")
                cleanup.callback(p.stop)
            cpu0 = {n: cpu_seconds(p.pid) or 0.0 for n, p in leechers.items()}
            cpu_seed0 = cpu_seconds(seeder.pid) or 0.0

            def all_done() -> bool:
                for n, p in leechers.items():
                    if not p.alive():
                        raise RuntimeError(f"aria2c on {n} exited: {(base / n / 'aria2.out').read_text()[-1000:]}")
                return all((base / n / "done").exists() for n in leechers)

            wait_for(all_done, self.timeout, "every aria2c leecher to complete", poll=0.05)
            cpu = {n: (cpu_seconds(p.pid) or 0.0) - cpu0[n] for n, p in leechers.items()}
            cpu_seed = (cpu_seconds(seeder.pid) or 0.0) - cpu_seed0
        finally:
            sampler.stop()
        per_node = {n: float((base / n / "done").read_text().split()[0]) - wall0 for n in leechers}
        sent = egress(self.origin_host) - e0
        for n in leechers:
            size = (base / n / DATA_NAME).stat().st_size
            if size != self.size:
                raise RuntimeError(f"aria2c on {n} completed with a {size}-byte file")
        seconds = max(per_node.values())
        log(f"bt #{rep + 1}: all {len(leechers)} aria2c complete {seconds:.1f}s, origin sent "
            f"{sent / self.size:.2f} x F")
        cleanup.close()
        if not self.args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for n in [*leechers, "seed"]:
                (base / n / DATA_NAME).unlink(missing_ok=True)
        return Sample(seconds, sent, per_node, extra={"cpu_aria2c": cpu, "cpu_seeder": cpu_seed},
                      timeline=sampler.per_second(self.names))

    def run(self) -> None:
        self.setup()
        for rep in range(self.args.repeat):
            if "syncbit" in self.args.only:
                self.add("syncbit", self.run_syncbit(rep))
            if "bt" in self.args.only:
                self.add("bt", self.run_bt(rep))
            if "http" in self.args.only:
                many, one = self.run_http(rep)
                self.add("http", many)
                if one is not None:
                    self.add("http1", one)


# -- report ------------------------------------------------------------------------------------


def report(bench: Bench, args, header: list[str], out=sys.stdout) -> list[dict]:
    """Print the table, the targets and the notes; returns the target rows."""
    F, B, N = args.size, args.rate_bps, args.nodes
    lb = F / B
    res = bench.results
    labels = {
        "syncbit": f"Syncbit: all {N} agents ready (assign -> last 'ready')",
        "http": f"plain HTTP: {N} x curl from the origin at once",
        "bt": f"BitTorrent: {N} aria2c + seeder on the origin",
        "http1": "(reference) 1 curl alone: one link's goodput",
    }
    rows = []
    for key in ("syncbit", "bt", "http", "http1"):
        if key not in res:
            continue
        ss = res[key]
        t = [s.seconds for s in ss]
        rows.append((labels[key], spread(t), spread([x / lb for x in t], "{:.2f}"),
                     spread([s.egress / F for s in ss], "{:.2f}"),
                     spread([min(s.per_node.values()) for s in ss])))
    hdr = ("measurement", "time s", "x F/B", "origin sent x F", "first node s")
    widths = [max(len(str(r[i])) for r in [hdr, *rows]) for i in range(len(hdr))]

    def emit(cols):
        out.write("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                            for i, (c, w) in enumerate(zip(cols, widths))).rstrip() + "\n")

    out.write("\n")
    for line in header:
        out.write(line + "\n")
    emit(hdr)
    emit(["-" * w for w in widths])
    for r in rows:
        emit(r)

    targets = []
    sb = median([s.seconds for s in res.get("syncbit", [])])
    bt = median([s.seconds for s in res.get("bt", [])])
    eg = median([s.egress for s in res.get("syncbit", [])])
    if sb is not None:
        targets.append({"target": f"Syncbit time <= {TARGET_TIME:g} x F/B", "value": f"{sb / lb:.2f} x F/B",
                        "ok": sb / lb <= TARGET_TIME})
        targets.append({"target": f"Syncbit origin egress <= {TARGET_EGRESS:g} x F", "value": f"{eg / F:.3f} x F",
                        "ok": eg / F <= TARGET_EGRESS})
        if bt is not None:
            targets.append({"target": "Syncbit faster than the aria2c swarm",
                            "value": f"{sb:.1f}s vs {bt:.1f}s ({sb / bt:.2f}x)", "ok": sb < bt})
    if targets:
        out.write("\nTargets (medians)\n")
        tw = max(len(t["target"]) for t in targets)
        vw = max(len(t["value"]) for t in targets)
        for t in targets:
            out.write(f"  {t['target'].ljust(tw)}  {t['value'].rjust(vw)}  {'PASS' if t['ok'] else 'MISS'}\n")

    notes = []
    for s_i, s in enumerate(res.get("syncbit", [])):
        x = s.extra
        tag = f"syncbit #{s_i + 1}"
        notes.append(f"{tag}: the control plane answered 'ready' (syncbit wait) at {x['control_plane_ready']:.1f}s; "
                     f"origin payload {x['origin_payload'] / F:.3f} x F" if x.get("origin_payload") is not None
                     else f"{tag}: control plane ready at {x['control_plane_ready']:.1f}s")
        cpu = x["cpu_agents"]
        notes.append(f"{tag}: CPU of the {N} agents {sum(cpu.values()):.1f}s ({sum(cpu.values()) / s.seconds:.2f} "
                     f"cores over the run; per agent {', '.join(f'{v:.1f}' for v in cpu.values())}), control "
                     f"plane {x['cpu_control_plane']:.1f}s; {os.cpu_count()} CPUs")
        notes.append(f"{tag}: per node: assignment applied / ready (s after the PUT), MB from the source / "
                     f"from peers (of which relayed while arriving) / sent to peers, peer errors")
        for n in bench.names:
            m = x["metrics"].get(n, {})
            errs = ", ".join(f"{k[4:]} {int(v)}" for k, v in sorted(m.items()) if k.startswith("err_") and v)
            g = x["source_gets"].get(n, [])
            gs = (f"   {len(g)} source GETs at " + ", ".join(f"{t:.1f}s ({b / MiB:.0f} MiB)" for t, b in g[:6])
                  + (", ..." if len(g) > 6 else "")) if g else ""
            notes.append(f"    {n}: {x['assigned'][n]:5.2f} / {s.per_node[n]:5.1f}   src {m.get('source', 0) / MB:6.1f}  "
                         f"peers {m.get('peer', 0) / MB:6.1f} ({m.get('relay_download', 0) / MB:5.1f})  "
                         f"up {m.get('peer_upload', 0) / MB:6.1f}"
                         + (f"   errors: {errs}" if errs else "") + gs)
        phases = syncbit_phases(s, bench.names, F, B)
        if phases:
            notes.append(f"{tag}: {phases}")
        buckets = metric_buckets(s, bench.names, max(1.0, round(lb / 4)))
        if buckets:
            notes.append(f"{tag}: MB the {N} agents took from the source / from peers, by time after the PUT: "
                         + "; ".join(buckets))
    for s_i, s in enumerate(res.get("bt", [])):
        cpu = s.extra["cpu_aria2c"]
        notes.append(f"bt #{s_i + 1}: CPU of the {N} aria2c {sum(cpu.values()):.1f}s "
                     f"({sum(cpu.values()) / s.seconds:.2f} cores), seeder {s.extra['cpu_seeder']:.1f}s; "
                     f"per node done at " + ", ".join(f"{n} {v:.1f}" for n, v in s.per_node.items()))
    for s_i, s in enumerate(res.get("http", [])):
        notes.append(f"http #{s_i + 1}: per node done at " + ", ".join(f"{n} {v:.1f}" for n, v in s.per_node.items())
                     + (f"; origin payload {s.extra['origin_payload'] / F:.3f} x F"
                        if s.extra.get("origin_payload") is not None else ""))
    if notes:
        out.write("\nNotes:\n")
        for n in notes:
            out.write(f"  {n}\n")
    if args.timeline:
        for key in ("syncbit", "bt"):  # plain HTTP: the origin's link flat out, each node 1/N of it
            for s_i, s in enumerate(res.get(key, [])):
                out.write(f"\nTimeline {key} #{s_i + 1} (MB/s per second: origin sent; each node received/sent)\n")
                out.write("    t  origin  " + "  ".join(f"{n:>11}" for n in bench.names) + "\n")
                for d in s.timeline:
                    out.write(f"{d['t']:5.1f}  {d['origin_tx']:6.1f}  "
                              + "  ".join(f"{d[f'{n}_rx']:5.1f}/{d[f'{n}_tx']:<5.1f}" for n in bench.names) + "\n")
    out.flush()
    return targets


def metric_buckets(s: Sample, names: list[str], width: float) -> list[str]:
    """From the metrics samples: source and peer bytes taken by all agents in each ``width``-second slice."""
    samples = [m for m in s.extra.get("metrics_samples", []) if all(n in m for n in names)]
    final = s.extra.get("metrics", {})
    if not samples or not all(n in final for n in names):
        return []
    points = [(m["t"], sum(m[n].get("source", 0) for n in names), sum(m[n].get("peer", 0) for n in names))
              for m in samples]
    points.append((s.seconds, sum(final[n].get("source", 0) for n in names),
                   sum(final[n].get("peer", 0) for n in names)))
    out, prev, edge = [], (0.0, 0.0, 0.0), width
    for t, src, peer in points:
        if t >= edge or (t, src, peer) == points[-1]:
            out.append(f"{prev[0]:.0f}-{t:.0f}s {(src - prev[1]) / MB:.0f}/{(peer - prev[2]) / MB:.0f}")
            prev = (t, src, peer)
            while edge <= t:
                edge += width
    return out


def syncbit_phases(s: Sample, names: list[str], F: int, B: float) -> str:
    """When the origin's link was busy, from the sysfs samples: where the time went."""
    rows = s.extra.get("link_rows") or []
    if len(rows) < 3:
        return ""
    o0 = rows[0]["origin"][1]
    total = rows[-1]["origin"][1] - o0
    if total <= 0:
        return ""

    def when(frac: float) -> float:
        for r in rows:
            if r["origin"][1] - o0 >= frac * total:
                return r["t"]
        return rows[-1]["t"]

    first = next((r["t"] for r in rows if r["origin"][1] - o0 > 64 * 1024), rows[-1]["t"])
    t50, t90, t100 = when(0.5), when(0.9), when(0.999)
    return (f"origin link: first bytes at {first:.1f}s, half of its bytes sent by {t50:.1f}s, 90% by {t90:.1f}s, "
            f"all by {t100:.1f}s, busy {total / B / s.seconds:.0%} of the run; nodes received on average "
            f"{F / median(list(s.per_node.values())) / MB:.1f} MB/s (median node); last node ready {s.seconds:.1f}s "
            f"({max(0.0, s.seconds - t100):.1f}s after the origin went quiet)")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-tracker":
        host, _, port = sys.argv[2].rpartition(":")
        serve_tracker(host, int(port))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4, help="N: nodes that all get the dataset (default 4)")
    p.add_argument("--size", type=parse_size, default=parse_size("512MiB"), help="F: dataset size (default 512MiB)")
    p.add_argument("--rate", default="200mbit", help="every host's link, each way, tc syntax (default 200mbit)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions; the table shows median [min-max] (default 1)")
    p.add_argument("--only", default="syncbit,http,bt", help="contestants: syncbit,http,bt (default all)")
    p.add_argument("--block-size", type=parse_size, default=parse_size("4MiB"), help="Syncbit block size (4MiB)")
    p.add_argument("--heartbeat", type=parse_seconds, default=parse_seconds("0.5s"),
                   help="control plane heartbeat interval the agents are told (default 0.5s, as in the test bed; "
                        "syncbit's own default is 5s)")
    p.add_argument("--agent-log-level", default="DEBUG", help="agents' log level (default DEBUG)")
    p.add_argument("--metrics-every", type=float, default=1.0,
                   help="seconds between scrapes of every agent's /metrics during the run; 0: only at the end")
    p.add_argument("--bt-piece", type=parse_size, default=parse_size("256KiB"),
                   help="torrent piece length, a power of two (default 256KiB, mktorrent's default)")
    p.add_argument("--bt-tracker", choices=("auto", "opentracker", "python"), default="auto",
                   help="opentracker if installed (auto), or the small tracker in this file")
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="do not apt-get install aria2, mktorrent, opentracker when missing")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the one-curl-alone reference row")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading every Syncbit copy back through its mount")
    p.add_argument("--ref", help="benchmark syncbit as committed at this git ref (exported to the work dir) "
                                 "instead of the working tree")
    p.add_argument("--timeout", type=float, default=0, help="seconds per contestant (default 3 x N x F/B + 120)")
    p.add_argument("--timeline", action="store_true", help="print per-second link rates of every run")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="parent of the work directory (%(default)s)")
    p.add_argument("--json", help="also write every sample as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs; not the data)")
    args = p.parse_args()

    if os.geteuid() != 0:
        p.error("run as root: network namespaces, tc, FUSE mounts and drop_caches need it")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if not args.only or set(args.only) - {"syncbit", "http", "bt"}:
        p.error("--only takes a comma-separated subset of syncbit,http,bt")
    if not 1 <= args.nodes <= 200:
        p.error("--nodes must be between 1 and 200")
    if args.size < 4 * MiB:
        p.error("--size must be at least 4MiB")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.bt_piece < 16 * 1024 or args.bt_piece & (args.bt_piece - 1):
        p.error("--bt-piece must be a power of two of at least 16KiB")
    try:
        args.rate_bps = parse_rate(args.rate)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    clash = sh("ip", "-o", "addr", "show", "to", "10.77.0.0/24", check=False).stdout.strip()
    if clash and not re.search(rf"\b{NETBED_PREFIX}br0\b", clash):
        p.error(f"another test bed uses 10.77.0.0/24 (a test_netbed run?): {clash.split()[1]}; run this alone")
    tracker_kind = ensure_tools("bt" in args.only, args.bt_tracker, args.install)

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background

    from netbed import NetBed

    work = Path(tempfile.mkdtemp(prefix="syncbit-swarm-", dir=args.workdir))
    Proc.cwd = str(work)
    log(f"work directory {work}")
    started = time.monotonic()
    src_root, pythonpath = REPO, None
    if args.ref:
        src_root = work / "code"
        commit = export_ref(args.ref, src_root)
        pythonpath = str(src_root)
        version = f"syncbit at git {commit[:10]} ({args.ref}), exported to the work dir (PYTHONPATH)"
        _, mtime0 = code_version(src_root)
        check = subprocess.run([PY, "-c", "import syncbit; print(syncbit.__file__)"], capture_output=True,
                               text=True, env=clean_env(pythonpath), cwd=work)
        if not check.stdout.strip().startswith(str(src_root)):
            p.error(f"PYTHONPATH does not take precedence over the installed syncbit: {check.stdout.strip()}")
    else:
        version, mtime0 = code_version(REPO)
    load0 = os.getloadavg()
    F, B = args.size, args.rate_bps
    header = [
        (f"Syncbit swarm benchmark: N = {args.nodes} nodes, F = {F / MiB:.0f} MiB ({F} bytes), "
         f"B = {args.rate} = {B / MB:.2f} MB/s per link each way (tbf), F/B = {F / B:.2f} s; "
         f"{args.repeat} repetition(s): median [min-max]"),
        version,
        (f"kernel {os.uname().release}, {os.cpu_count()} CPUs; Syncbit block size {args.block_size // MiB} MiB, "
         f"heartbeat {args.heartbeat:g}s"
         + (f"; torrent piece {args.bt_piece // 1024} KiB, tracker {tracker_kind}, aria2c {aria2_version()}"
            if "bt" in args.only else "")),
    ]
    log(header[0])
    log(version)
    bench = None
    targets: list[dict] = []
    try:
        with contextlib.ExitStack() as stack:  # last in, first out: processes stop before the bed goes
            bed = stack.enter_context(NetBed(prefix=NETBED_PREFIX, rate=args.rate))
            bench = Bench(args, work, stack, bed, tracker_kind, pythonpath)
            try:
                bench.run()
            finally:
                load1 = os.getloadavg()
                header.append(f"load average (1/5/15 min) {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, "
                              f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end; "
                              f"{time.monotonic() - started:.0f}s in all")
                if code_version(src_root)[1] != mtime0:
                    header.append("WARNING: syncbit's sources changed during the run (agents started at "
                                  "different times may have run different code)")
                if bench.results:
                    targets = report(bench, args, header)
    finally:
        for mp in work.glob("*/n*/mnt"):
            fusermount_u(mp)
        if args.keep:
            for big in (work / "src" / DATA_NAME, work / "code"):
                if big.is_dir():
                    shutil.rmtree(big, ignore_errors=True)
                else:
                    big.unlink(missing_ok=True)
            log(f"kept {work} (logs, configs, indexes; not the data)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f}s")
    if args.json and bench is not None:
        def enc(s: Sample) -> dict:
            d = dict(s.__dict__)
            d["extra"] = {k: v for k, v in s.extra.items() if k != "link_rows"}
            return d

        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "header": header,
                       "F": F, "B": B, "F_over_B": F / B, "targets": targets,
                       "results": {k: [enc(s) for s in v] for k, v in bench.results.items()}}, f, indent=1)
    return 1 if any(not t["ok"] for t in targets) else 0


def aria2_version() -> str:
    r = sh("aria2c", "--version", check=False)
    m = re.search(r"aria2 version (\S+)", r.stdout)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:  # everything was stopped and removed on the way out
        log(f"interrupted ({e or 'Ctrl-C'})")
        sys.exit(130)
