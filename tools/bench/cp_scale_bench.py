#!/usr/bin/env python3
"""Control-plane scale benchmark: simulated agents heartbeating against one ``syncbit server``.

Run with the venv's interpreter (no root, no FUSE; needs ``taskset``)::

    /work/venv/bin/python tools/bench/cp_scale_bench.py [--nodes 100,250,500,1000]
        [--step-seconds 30] [--warmup 10] [--datasets 20] [--blocks 2000]
        [--syncing 0.2] [--interval 5] [--join 100] [--fresh-connections]
        [--profile PREFIX] [--json out.json] [--keep]

The server is a real process, ``python -m syncbit server --db DB --listen
127.0.0.1:PORT --log-level WARNING``, pinned to one core (``taskset -c 0``);
this script is the load generator and pins itself to another core (core 1).
It speaks HTTP/1.1 itself over a pool of keep-alive asyncio connections (no
httpx on the hot path: its cost would show up in the latencies); with
``--fresh-connections`` every heartbeat opens a new connection instead, which
is what real agents get (hypercorn drops a connection after 5 s idle, the
heartbeat interval).

Set-up (not measured)
---------------------
``--datasets`` (20) directories of sparse files (``--blocks`` (2000) blocks of
4 MiB each, in 20 files: 8 GiB apparent, nothing on disk) are registered with
``POST /v1/datasets`` (file:// URIs: the server resolves and pins real
snapshots) and assigned with ``PUT /v1/datasets/NAME/assignment {"selector":
"bench=scale"}`` on a first server and database (the template). Every
simulated node carries the label ``bench=scale``, so all datasets are placed
on it: its reports and bitmaps refer to real snapshots, placement rows and
file objects.

Each step starts a fresh server on a copy of the template into which its N
nodes were written beforehand with the server's own code (``Store.put_node``
for each, then one ``ControlPlane.reschedule()``): the state a restarted
server finds. Registering nodes through heartbeats instead costs one
reschedule per new node, O(nodes) each; that is measured separately (phase 4)
because at a few hundred nodes it does not finish (see the README).

Simulated nodes (what ``syncbit.agent.link`` sends)
---------------------------------------------------
Every node does ``PUT /v1/nodes/NAME/heartbeat`` every ``--interval`` seconds
(start times spread uniformly over one interval), one request at a time (the
next beat is due ``interval`` after the previous one was due; if that moment
has passed it is sent at once and counted "late"). The body is the agent's:
labels, capacity, free (constant: no rescheduling), block_size, peer_address,
uploads, a report for each dataset (snapshot id, state, bytes_cached,
bytes_total), ``holdings`` (``encode_bitmap``: zlib + base64) for the snapshots
whose bitmap changed since the last accepted heartbeat, and ``blocks``
([file object, index, 64-hex id]) learnt since then.

- first beat after the server starts: every bitmap (random fill, 20-100% of
  the bits) and all reports;
- a ``--syncing`` fraction (0.2) of the nodes keep syncing: each beat sets
  100-300 more bits of the snapshot they are filling (another one when it is
  full), sends that bitmap and those block ids, and reports the dataset
  "syncing" with the new bytes_cached;
- the others are in steady state: reports unchanged ("ready"), no bitmaps,
  no blocks.

Phases
------
0. Baseline, on the template server: the HTTP stack's ceiling on its core,
   closed-loop ``GET /bench-404`` (a Starlette 404: no syncbit code) on 16
   connections for 5 s.
1. One step per ``--nodes`` value: the server starts, all nodes send their
   first beat (time until all are answered and their p99 are in the notes),
   ``--warmup`` seconds, then a window of ``--step-seconds``. Over the window:
   heartbeats/s completed vs offered (nodes / interval); latency of the beats
   issued in it (client side, from the moment the beat is due, or issued if
   late, to the last byte of the answer, including any wait for a pooled
   connection); the server's CPU (utime + stime from /proc/PID/stat, % of one
   core) and CPU per heartbeat; how long it was runnable but waiting for its
   core (/proc/PID/schedstat: other processes on the core); bytes it wrote
   per heartbeat (/proc/PID/io); VmRSS at the end and VmHWM; the handler time
   the server measured itself (``syncbit_server_heartbeat_seconds``, a bucket
   bound); this script's own CPU.
2. (largest step, ``--profile PREFIX``) py-spy (``record --nonblocking
   --idle``, 200 Hz) samples the server for ``--step-seconds`` under the
   periodic load: PREFIX-steady.txt (raw stacks) and a summary under the table.
3. (largest step) Saturation: the periodic schedule stops and 32 connections
   send the same mix of heartbeats back to back for ``--step-seconds``: the
   server's heartbeat ceiling, and so how many nodes one core could serve.
4. (largest step, ``--join K``, default 100) K new nodes register through the
   API at once (spread over one interval) while the others keep beating:
   time until all have an answer (up to ``--join-timeout``), their latency,
   the others' throughput and latency meanwhile, and how many "node is down"
   events the server logged (a node whose beats wait longer than
   node_down_after, 30 s, is marked down, and coming back up reschedules
   again). With ``--profile``: PREFIX-join.txt. Information only, no target.

Targets, at the largest step (the issue's: 1,000 nodes): p99 heartbeat
latency < 100 ms; the server keeps up (completed >= 99% of offered); no
errors. The exit status is 1 when one is missed. Servers are stopped and the
work directory removed in a ``finally`` (also on errors, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Generic helpers shared with the other benchmarks live in read_bench (as for s3_bench).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import log, proc_status_kb  # noqa: E402

PY = sys.executable
BLOCK = 4 * 2**20
FILES_PER_DATASET = 20
TARGET_P99 = 0.100
TARGET_KEEPUP = 0.99
CLK_TCK = os.sysconf("SC_CLK_TCK")
SELECTOR = ("bench", "scale")


# -- /proc helpers ------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_runq_wait(pid: int) -> float:
    """Seconds the process spent runnable but waiting for a CPU (/proc/PID/schedstat, 2nd field)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def core_times(core: int) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                steal = v[7] if len(v) > 7 else 0
                total = sum(v[:8])
                return (total - idle - steal) / CLK_TCK, steal / CLK_TCK, total / CLK_TCK
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a minimal HTTP/1.1 client over a pool of persistent connections ------------------------


class HttpError(Exception):
    pass


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()
        self.usable = True

    def close(self) -> None:
        self.usable = False
        with contextlib.suppress(Exception):
            self.writer.close()


class Pool:
    """Up to ``size`` keep-alive connections to one server, most recently used first.

    hypercorn closes a connection after 5 s idle (keep_alive_timeout) and after
    1000 requests (it then says ``connection: close``): idle connections older
    than ``max_idle`` are dropped, and a request that fails on a reused
    connection before any answer byte is retried once on a new one.
    """

    def __init__(self, host: str, port: int, size: int, max_idle: float = 3.0) -> None:
        self.host, self.port = host, port
        self.sem = asyncio.Semaphore(size)
        self.idle: list[Conn] = []
        self.max_idle = max_idle
        self.opened = 0
        self.retries = 0

    async def _conn(self) -> tuple[Conn, bool]:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            if c.usable and now - c.last_used < self.max_idle:
                return c, True
            c.close()
        r, w = await asyncio.open_connection(self.host, self.port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return Conn(r, w), False

    async def request(self, method: str, path: str, body: bytes = b"", timeout: float = 60.0) -> tuple[int, bytes]:
        async with self.sem:
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            for attempt in (0, 1):
                c, reused = await self._conn()
                got_bytes = False
                try:
                    c.writer.write(head + body if len(body) < 65536 else head)
                    if len(body) >= 65536:
                        c.writer.write(body)
                    async with asyncio.timeout(timeout):
                        raw = await c.reader.readuntil(b"\r\n\r\n")
                        got_bytes = True
                        status, length, close, chunked = _parse_head(raw)
                        if chunked:
                            data = await _read_chunked(c.reader)
                        else:
                            data = await c.reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
                    c.close()
                    if reused and not got_bytes and attempt == 0:
                        self.retries += 1
                        continue
                    raise HttpError(f"{type(e).__name__}: {e}") from None
                except BaseException:
                    c.close()
                    raise
                if close:
                    c.close()
                else:
                    c.last_used = time.monotonic()
                    self.idle.append(c)
                return status, data
            raise AssertionError("unreachable")

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


def _parse_head(raw: bytes) -> tuple[int, int, bool, bool]:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close, chunked = 0, False, False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "connection" and v == "close":
            close = True
        elif k == "transfer-encoding" and "chunked" in v:
            chunked = True
    return status, length, close, chunked


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        n = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if n == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(n)
        await reader.readexactly(2)


# -- the server process ------------------------------------------------------------------


class ServerProc:
    def __init__(self, work: Path, db: Path, tag: str, port: int, cpu: int) -> None:
        self.port = port
        self.db = db
        self.log_path = work / f"server-{tag}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        cmd = ["taskset", "-c", str(cpu), PY, "-m", "syncbit", "server", "--db", str(self.db),
               "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
        log("server: " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid  # taskset execs the interpreter: same pid

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not listening after {timeout}s:\n{self.log_tail()}")

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int | None:
        kb = proc_status_kb(self.pid, "VmRSS")
        return kb * 1024 if kb is not None else None

    def hwm(self) -> int | None:
        kb = proc_status_kb(self.pid, "VmHWM")
        return kb * 1024 if kb is not None else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_size(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def count_log(self, text: str, offset: int = 0) -> int:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return sum(1 for line in f if text.encode() in line)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# -- datasets -------------------------------------------------------------------------------


def make_dataset_dirs(root: Path, n: int, blocks: int) -> list[Path]:
    """``n`` directories of sparse files totalling ``blocks`` 4 MiB blocks each."""
    per_file = [blocks // FILES_PER_DATASET + (1 if i < blocks % FILES_PER_DATASET else 0)
                for i in range(FILES_PER_DATASET)]
    dirs = []
    for d in range(n):
        path = root / f"ds{d:02d}"
        path.mkdir(parents=True)
        for i, nb in enumerate(per_file):
            if nb:
                with open(path / f"part-{i:03d}.bin", "wb") as f:
                    f.truncate(nb * BLOCK)
        dirs.append(path)
    return dirs


@dataclass
class SnapInfo:
    dataset: str
    id: str
    nblocks: int
    files: list[tuple[str, int]]  # (file object, blocks), in snapshot order
    total: int

    def locate(self, bit: int) -> tuple[str, int]:
        for fo, nb in self.files:
            if bit < nb:
                return fo, bit
            bit -= nb
        raise IndexError(bit)


def block_id(fo: str, idx: int) -> str:
    return hashlib.sha256(f"{fo}:{idx}".encode()).hexdigest()


# -- simulated nodes ----------------------------------------------------------------------


class BitmapPool:
    """Random bitmaps shared out to the nodes (generating 20 per node would dominate set-up)."""

    def __init__(self, nblocks: int, rng: random.Random, count: int = 256) -> None:
        self.maps = []
        for _ in range(count):
            density = rng.uniform(0.2, 1.0)
            bits = bytearray((nblocks + 7) // 8)
            for b in rng.sample(range(nblocks), round(density * nblocks)):
                bits[b >> 3] |= 0x80 >> (b & 7)
            self.maps.append(bits)

    def pick(self, rng: random.Random) -> bytearray:
        return bytearray(rng.choice(self.maps))


class SimNode:
    CAPACITY = 20 * 2**40
    FREE = 10 * 2**40  # constant: a change over 5% would make the server reschedule

    def __init__(self, index: int, snaps: list[SnapInfo], syncing: bool, pool: BitmapPool, seed: int) -> None:
        self.index = index
        self.name = f"bench-{index:05d}"
        self.path = f"/v1/nodes/{self.name}/heartbeat"
        self.rng = random.Random(seed)
        self.snaps = snaps
        self.syncing = syncing
        self.bits = [pool.pick(self.rng) for _ in snaps]
        self.count = [sum(b.bit_count() for b in bm) for bm in self.bits]
        self.dirty: set[int] = set(range(len(snaps)))  # bitmaps not yet accepted by the server
        self.learned: list[list] = []  # block reports not yet accepted
        self.first = True
        self.cur: int | None = None  # snapshot being filled (syncing nodes)
        self.unset: list[int] = []
        self.labels = {SELECTOR[0]: SELECTOR[1], "zone": f"z{index % 4}"}
        self.peer_address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}:7071"
        self.inflight: float | None = None  # when the beat in flight was issued
        self._steady_body: bytes | None = None
        self.last_answer: bytes | None = None

    def _advance(self) -> None:
        """Fetch 100-300 more blocks of the snapshot being synced (a new one when it is full)."""
        if self.cur is None or not self.unset:
            incomplete = [i for i, s in enumerate(self.snaps) if self.count[i] < s.nblocks]
            if not incomplete:  # everything held: one snapshot is evicted and fetched again
                i = self.rng.randrange(len(self.snaps))
                self.bits[i] = bytearray(len(self.bits[i]))
                self.count[i] = 0
                incomplete = [i]
            self.cur = self.rng.choice(incomplete)
            bm = self.bits[self.cur]
            self.unset = [b for b in range(self.snaps[self.cur].nblocks) if not bm[b >> 3] & (0x80 >> (b & 7))]
            self.rng.shuffle(self.unset)
        snap, bm = self.snaps[self.cur], self.bits[self.cur]
        for _ in range(min(len(self.unset), self.rng.randint(100, 300))):
            b = self.unset.pop()
            bm[b >> 3] |= 0x80 >> (b & 7)
            self.count[self.cur] += 1
            fo, idx = snap.locate(b)
            self.learned.append([fo, idx, block_id(fo, idx)])
        self.dirty.add(self.cur)
        self._steady_body = None

    def next_beat(self) -> tuple[bytes, str, frozenset[int], int]:
        """(body, kind, bitmaps sent, block reports sent)."""
        from syncbit.model import encode_bitmap

        if self.first:
            kind = "first"
        elif self.syncing:
            self._advance()
            kind = "sync"
        else:
            kind = "steady"
        sent = frozenset(self.dirty)
        blocks = self.learned[:50_000]
        if kind == "steady" and not sent and not blocks and self._steady_body is not None:
            return self._steady_body, kind, sent, 0
        datasets = {}
        for i, s in enumerate(self.snaps):
            state = "syncing" if (self.syncing and i == self.cur and self.count[i] < s.nblocks) else "ready"
            datasets[s.dataset] = {"snapshot": s.id, "state": state, "error": None,
                                   "bytes_cached": min(s.total, self.count[i] * BLOCK), "bytes_total": s.total}
        body = json.dumps({
            "labels": self.labels, "capacity": self.CAPACITY, "free": self.FREE,
            "block_size": BLOCK, "peer_address": self.peer_address, "uploads": 0,
            "datasets": datasets,
            "holdings": {self.snaps[i].id: encode_bitmap(self.bits[i]) for i in sorted(sent)},
            "blocks": blocks,
        }).encode()
        if kind == "steady" and not sent and not blocks:
            self._steady_body = body
        return body, kind, sent, len(blocks)

    def accepted(self, sent: frozenset[int], nblocks: int) -> None:
        self.first = False
        self.dirty -= sent
        del self.learned[:nblocks]


# -- measurements ---------------------------------------------------------------------------


@dataclass
class Sample:
    issued: float
    done: float
    kind: str
    ok: bool
    late: bool
    node: int = -1

    @property
    def latency(self) -> float:
        return self.done - self.issued


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


class Meter:
    """CPU of the server, of this process and of the server's core between two points."""

    def __init__(self, server: ServerProc, core: int) -> None:
        self.server, self.core = server, core

    def snap(self) -> dict:
        busy, steal, total = core_times(self.core)
        io = proc_io(self.server.pid)
        return {"t": time.monotonic(), "srv": self.server.cpu(), "me": time.process_time(),
                "busy": busy, "steal": steal, "total": total, "runq": proc_runq_wait(self.server.pid),
                "wchar": io.get("wchar", 0), "write_bytes": io.get("write_bytes", 0)}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        dt = b["t"] - a["t"]
        srv = (b["srv"] - a["srv"]) / dt
        busy = (b["busy"] - a["busy"]) / dt
        return {"dt": dt, "srv": srv, "me": (b["me"] - a["me"]) / dt, "other": max(0.0, busy - srv),
                "steal": (b["steal"] - a["steal"]) / dt, "runq": (b["runq"] - a["runq"]) / dt,
                "wchar": b["wchar"] - a["wchar"], "write_bytes": b["write_bytes"] - a["write_bytes"]}


def parse_hist(text: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'^syncbit_server_heartbeat_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', text, re.MULTILINE):
        out[float(m.group(1))] = float(m.group(2))
    return out


def hist_quantile(h0: dict[float, float], h1: dict[float, float], q: float) -> tuple[float | None, int]:
    """Upper bucket bound of the q-quantile of the observations between two scrapes, and their count."""
    les = sorted(h1)
    counts = [h1[le] - h0.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    if not total:
        return None, 0
    for le, c in zip(les, counts):
        if c >= q * total:
            return le, int(total)
    return math.inf, int(total)


@dataclass
class Step:
    nodes: int
    offered: float
    achieved: float = 0.0
    issued: int = 0
    errors: int = 0
    late: int = 0
    p50: float | None = None
    p99: float | None = None
    pmax: float | None = None
    p99_sync: float | None = None
    p99_steady: float | None = None
    kinds: dict = field(default_factory=dict)
    srv_cpu: float = 0.0
    cpu_per_hb: float | None = None
    runq: float = 0.0
    wchar_per_hb: float | None = None
    disk_per_hb: float | None = None
    rss: int | None = None
    hwm: int | None = None
    me_cpu: float = 0.0
    other: float = 0.0
    steal: float = 0.0
    handler_p50: float | None = None
    handler_p99: float | None = None
    preload_seconds: float = 0.0
    settle_seconds: float = 0.0
    settled: bool = True
    reschedule_ms: float | None = None
    reconnect_seconds: float | None = None
    reconnect_p99: float | None = None
    reconnect_max: float | None = None
    metrics_seconds: float | None = None
    status_seconds: float | None = None
    placements: str = ""


@dataclass
class Join:
    existing: int
    new: int
    registered: int = 0
    seconds: float | None = None  # until every new node had an answer; None: not within the timeout
    observed: float = 0.0
    first_p50: float | None = None
    first_p99: float | None = None
    first_max: float | None = None
    others_p99: float | None = None
    others_max: float | None = None
    others_done: float = 0.0
    offered: float = 0.0
    down_events: int = 0
    srv_cpu: float = 0.0
    settled: bool = False


def preload(template: Path, db: Path, nodes: list[SimNode]) -> tuple[float, float]:
    """The step's database: the template (datasets, assignments) plus ``nodes`` registered and placed.

    Uses the server's own Store and ControlPlane.reschedule, once for all nodes: the state a restarted
    server finds. Returns (seconds it took, ms of one more reschedule() with nothing to change).
    """
    import sqlite3

    from syncbit.server.controlplane import ControlPlane
    from syncbit.server.store import Store

    t0 = time.monotonic()
    src = sqlite3.connect(str(template))
    dst = sqlite3.connect(str(db))
    src.backup(dst)
    src.close()
    dst.close()
    store = Store(db)
    try:
        now = time.time()
        with store.db.conn:
            store.db.execute("BEGIN")
            for n in nodes:
                store.put_node(n.name, n.labels, n.CAPACITY, n.FREE, True, now)
        cp = ControlPlane(store)
        cp.reschedule()
        took = time.monotonic() - t0
        costs = []
        for _ in range(3):
            t = time.perf_counter()
            cp.reschedule()
            costs.append(time.perf_counter() - t)
    finally:
        store.close()
    return took, min(costs) * 1e3


class Bench:
    def __init__(self, args, work: Path, dirs: list[Path]) -> None:
        self.args = args
        self.work = work
        self.dirs = dirs
        self.server: ServerProc | None = None
        self.pool: Pool | None = None
        self.meter: Meter | None = None
        self.snaps: list[SnapInfo] = []
        self.nodes: list[SimNode] = []
        self.tasks: list[asyncio.Task] = []
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.stop_periodic = False
        self.desired_answers = 0  # long-poll answers (each agent holds one poll of its desired state)
        self.polls_wanted = False  # the server's "long_poll" in heartbeat answers
        self.rng = random.Random(args.seed)
        self.bitmaps: BitmapPool | None = None
        self.steps: list[Step] = []
        self.ceiling: dict = {}
        self.saturation: dict = {}
        self.join: Join | None = None
        self.profile: dict[str, list[str]] = {}
        self.template = work / "template.sqlite"
        self.opened = self.retries = 0

    # -- server lifecycle --

    def start_server(self, db: Path, tag: str) -> None:
        self.server = ServerProc(self.work, db, tag, free_port(), self.args.server_cpu)
        self.server.wait_up()
        self.pool = Pool("127.0.0.1", self.server.port, self.args.connections,
                         max_idle=0.0 if self.args.fresh_connections else 3.0)
        self.meter = Meter(self.server, self.args.server_cpu)

    async def stop_server(self) -> None:
        await self.stop_nodes()
        if self.pool is not None:
            self.opened += self.pool.opened
            self.retries += self.pool.retries
            self.pool.close()
            self.pool = None
        if self.server is not None:
            self.server.stop()

    async def stop_nodes(self) -> None:
        self.stop_periodic = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for nd in self.nodes:
            nd.inflight = None

    async def call(self, method: str, path: str, body: dict | None = None, ok=(200, 201)) -> dict:
        status, data = await self.pool.request(method, path, json.dumps(body).encode() if body is not None else b"")
        if status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else {}

    # -- set-up: datasets and assignments through the API, on the template database --

    async def setup(self) -> None:
        self.start_server(self.template, "template")
        t0 = time.monotonic()
        for i, d in enumerate(self.dirs):
            name = f"ds{i:02d}"
            view = await self.call("POST", "/v1/datasets", {"name": name, "uri": d.as_uri()})
            snap = await self.call("GET", f"/v1/snapshots/{view['snapshot']}")
            files = [(f["file_object"], (f["size"] + BLOCK - 1) // BLOCK) for f in snap["files"]]
            nblocks = sum(nb for _, nb in files)
            self.snaps.append(SnapInfo(name, view["snapshot"], nblocks, files, view["bytes_total"]))
            await self.call("PUT", f"/v1/datasets/{name}/assignment", {"selector": f"{SELECTOR[0]}={SELECTOR[1]}"})
        log(f"set-up: {len(self.snaps)} datasets of {sorted({s.nblocks for s in self.snaps})} blocks registered "
            f"and assigned in {time.monotonic() - t0:.1f}s")
        self.bitmaps = BitmapPool(self.snaps[0].nblocks, self.rng)
        await self.phase_ceiling()
        await self.stop_server()

    # -- phase 0: the HTTP stack's ceiling --

    async def closed_loop(self, seconds: float, concurrency: int, make) -> dict:
        """``concurrency`` workers sending ``make()`` requests back to back for ``seconds``."""
        lat: list[float] = []
        errors = 0
        end = time.monotonic() + seconds

        async def worker():
            nonlocal errors
            while time.monotonic() < end:
                method, path, body, done = make()
                if path is None:
                    await asyncio.sleep(0.001)
                    continue
                t = time.monotonic()
                try:
                    status, data = await self.pool.request(method, path, body)
                    ok = status < 400 or path == "/bench-404"
                    if not ok:
                        self.errors.append(f"{path}: HTTP {status}: {data[:200]!r}")
                except HttpError as e:
                    ok = False
                    self.errors.append(str(e))
                lat.append(time.monotonic() - t)
                if not ok:
                    errors += 1
                done(ok)

        a = self.meter.snap()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        d = Meter.delta(a, self.meter.snap())
        return {"rate": len(lat) / d["dt"], "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat),
                "errors": errors, "srv": d["srv"], "me": d["me"], "other": d["other"], "steal": d["steal"],
                "runq": d["runq"], "cpu_per_req": d["srv"] * d["dt"] / len(lat) if lat else None}

    async def phase_ceiling(self) -> None:
        log("phase 0: HTTP ceiling (GET /bench-404, 16 connections, 5 s)")
        self.ceiling = await self.closed_loop(5.0, 16, lambda: ("GET", "/bench-404", b"", lambda ok: None))
        log(f"  {self.ceiling['rate']:.0f} req/s, server CPU {self.ceiling['srv']:.0%}, "
            f"{self.ceiling['cpu_per_req'] * 1e3:.2f} ms CPU/request")

    # -- phase 1: steps --

    def new_node(self, i: int) -> SimNode:
        return SimNode(i, self.snaps, self.rng.random() < self.args.syncing, self.bitmaps,
                       self.args.seed * 1_000_003 + i)

    async def node_loop(self, node: SimNode, start: float) -> None:
        interval = self.args.interval
        due = start
        while not self.stop_periodic:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                if self.stop_periodic:
                    return
            issued = max(due, time.monotonic())
            late = issued - due > 0.050
            body, kind, sent, nblocks = node.next_beat()
            node.inflight = issued
            ok = False
            try:
                status, data = await self.pool.request("PUT", node.path, body)
                ok = status == 200
                if ok:
                    node.accepted(sent, nblocks)
                    node.last_answer = data if node.index == 0 else None
                    if node.index == 0:
                        self.polls_wanted = json.loads(data).get("long_poll") is True
                else:
                    self.errors.append(f"{node.name}: HTTP {status}: {data[:200]!r}")
            except HttpError as e:
                self.errors.append(f"{node.name}: {e}")
            finally:
                node.inflight = None
            self.samples.append(Sample(issued, time.monotonic(), kind, ok, late, node.index))
            due = max(due + interval, time.monotonic())

    async def desired_loop(self, node: SimNode) -> None:
        """What every agent does beside its heartbeats: hold one long poll of its desired state
        (``GET /v1/nodes/NAME/desired``), on a connection of its own."""
        conn = Pool("127.0.0.1", self.server.port, 1, max_idle=60.0)
        version = -1
        try:
            while not self.stop_periodic:
                if not self.polls_wanted:  # what heartbeat answers say ("long_poll"), as agents do
                    await asyncio.sleep(self.args.interval)
                    version = -1
                    continue
                try:
                    status, data = await conn.request(
                        "GET", f"/v1/nodes/{node.name}/desired?version={version}&timeout=50", timeout=65.0)
                    if status == 200:
                        version = json.loads(data)["version"]
                        self.desired_answers += 1
                    else:
                        await asyncio.sleep(self.args.interval)
                except HttpError:
                    await asyncio.sleep(self.args.interval)
        finally:
            conn.close()

    def start_nodes(self, nodes: list[SimNode]) -> None:
        self.stop_periodic = False
        t0 = time.monotonic()
        for node in nodes:
            self.tasks.append(asyncio.create_task(self.node_loop(node, t0 + self.rng.uniform(0, self.args.interval))))
            if self.args.long_poll:
                self.tasks.append(asyncio.create_task(self.desired_loop(node)))

    async def scrape(self) -> tuple[dict[float, float], float]:
        t = time.monotonic()
        _, data = await self.pool.request("GET", "/metrics")
        return parse_hist(data.decode()), time.monotonic() - t

    async def wait_answered(self, nodes: list[SimNode], timeout: float) -> float | None:
        """Seconds until every node in ``nodes`` had a heartbeat answered; None on timeout."""
        t0 = time.monotonic()
        while any(nd.first for nd in nodes):
            if not self.server.alive():
                raise RuntimeError(f"server died:\n{self.server.log_tail()}")
            if time.monotonic() - t0 > timeout:
                return None
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def phase_step(self, n: int) -> Step:
        args = self.args
        step = Step(n, n / args.interval)
        self.nodes = [self.new_node(i) for i in range(n)]
        self.samples = []
        db = self.work / f"step-{n}.sqlite"
        step.preload_seconds, step.reschedule_ms = preload(self.template, db, self.nodes)
        log(f"step {n} nodes: database preloaded in {step.preload_seconds:.1f}s (one reschedule() at {n} nodes: "
            f"{step.reschedule_ms:.0f} ms, in this process); starting the server")
        self.start_server(db, f"step-{n}")
        t_start = time.monotonic()
        self.start_nodes(self.nodes)
        took = await self.wait_answered(self.nodes, args.register_timeout)
        if took is None:
            raise RuntimeError(f"not every node had an answer after {args.register_timeout}s "
                               f"(errors: {self.errors[-3:]})")
        first = [s.latency for s in self.samples if s.kind == "first" and s.ok]
        step.reconnect_seconds = time.monotonic() - t_start
        step.reconnect_p99, step.reconnect_max = pct(first, 0.99), max(first, default=None)
        log(f"  all {n} nodes answered {step.reconnect_seconds:.1f}s after the server came up (first beats p99 "
            f"{_ms(step.reconnect_p99)} ms); warm-up {args.warmup:.0f}s")
        await asyncio.sleep(args.warmup)
        # Then until the backlog of the first beats has drained: few requests in flight for 2 s.
        t_settle = time.monotonic()
        calm = 0
        limit = max(8, 0.02 * n)
        while calm < 8 and time.monotonic() - t_settle < args.settle_max:
            calm = calm + 1 if sum(nd.inflight is not None for nd in self.nodes) <= limit else 0
            await asyncio.sleep(0.25)
        step.settle_seconds = time.monotonic() - t_settle
        step.settled = calm >= 8
        if not step.settled:
            log(f"  still more than {limit:.0f} requests in flight after {args.settle_max:.0f}s more: the server "
                f"has not caught up; measuring anyway")
        h0, _ = await self.scrape()
        await asyncio.sleep(1.0)
        errors0 = len(self.errors)
        a = self.meter.snap()
        w0 = a["t"]
        await asyncio.sleep(args.step_seconds)
        b = self.meter.snap()
        w1 = b["t"]
        step.rss, step.hwm = self.server.rss(), self.server.hwm()
        # Let the beats issued in the window finish (those still out after 30 s count as errors).
        grace = time.monotonic() + 30
        while time.monotonic() < grace and any(nd.inflight is not None and nd.inflight < w1 for nd in self.nodes):
            await asyncio.sleep(0.05)
        stuck = sum(1 for nd in self.nodes if nd.inflight is not None and nd.inflight < w1)
        h1, step.metrics_seconds = await self.scrape()
        t = time.monotonic()
        await self.pool.request("GET", "/v1/status")
        step.status_seconds = time.monotonic() - t
        view = await self.call("GET", f"/v1/datasets/{self.snaps[0].dataset}")
        states = Counter(p["state"] for p in view["nodes"].values())
        step.placements = f"{len(view['nodes'])} placements of {self.snaps[0].dataset}: " + \
            ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        d = Meter.delta(a, b)
        win = [s for s in self.samples if w0 <= s.issued < w1]
        lat = [s.latency for s in win]
        step.issued = len(win) + stuck
        step.achieved = sum(1 for s in self.samples if w0 <= s.done < w1 and s.ok) / d["dt"]
        step.errors = sum(not s.ok for s in win) + stuck
        step.late = sum(s.late for s in win)
        step.p50, step.p99, step.pmax = pct(lat, 0.5), pct(lat, 0.99), max(lat, default=None)
        step.p99_sync = pct([s.latency for s in win if s.kind == "sync"], 0.99)
        step.p99_steady = pct([s.latency for s in win if s.kind == "steady"], 0.99)
        step.kinds = dict(Counter(s.kind for s in win))
        step.srv_cpu, step.me_cpu, step.other, step.steal, step.runq = d["srv"], d["me"], d["other"], d["steal"], \
            d["runq"]
        if win:
            step.cpu_per_hb = d["srv"] * d["dt"] / len(win)
            step.wchar_per_hb = d["wchar"] / len(win)
            step.disk_per_hb = d["write_bytes"] / len(win)
        step.handler_p50, _ = hist_quantile(h0, h1, 0.5)
        step.handler_p99, _ = hist_quantile(h0, h1, 0.99)
        if len(self.errors) > errors0:
            log(f"  {len(self.errors) - errors0} errors, e.g. {self.errors[errors0]}")
        if self.args.long_poll:
            log(f"  desired-state long polls {'held beside the heartbeats' if self.polls_wanted else 'not wanted by the server'}"
                f" ({self.desired_answers} answers so far)")
        log(f"  window {d['dt']:.1f}s: {step.achieved:.1f}/{step.offered:.1f} hb/s, p50 {_ms(step.p50)} ms, "
            f"p99 {_ms(step.p99)} ms, max {_ms(step.pmax)} ms; server CPU {step.srv_cpu:.0%} (runnable but waiting "
            f"{step.runq:.0%}), RSS {_mb(step.rss)} MB; load generator CPU {step.me_cpu:.0%}")
        if self.nodes[0].last_answer is not None:
            desired = json.loads(self.nodes[0].last_answer).get("desired", [])
            if len(desired) != len(self.snaps):
                log(f"  WARNING: {self.nodes[0].name} is told to hold {len(desired)} datasets, "
                    f"not {len(self.snaps)}")
        return step

    # -- profile --

    async def start_profile(self, out: Path) -> asyncio.subprocess.Process:
        spy = Path(PY).with_name("py-spy")
        if not spy.exists():
            spy = Path(shutil.which("py-spy") or "py-spy")
        # --idle: also the time the trio thread is blocked (an fsync in a commit); the epoll wait is the idle time.
        return await asyncio.create_subprocess_exec(
            "taskset", "-c", str(self.args.client_cpu), str(spy), "record", "--pid", str(self.server.pid),
            "--rate", "200", "--nonblocking", "--idle", "--format", "raw", "-o", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def stop_profile(self, proc: asyncio.subprocess.Process, out: Path, what: str, a: dict) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            err = b"timed out"
        d = Meter.delta(a, self.meter.snap())
        if not out.exists():
            self.profile[what] = [f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-300:]}"]
            return
        self.profile[what] = [f"py-spy raw stacks in {out}; server CPU meanwhile {d['srv']:.0%} of its core",
                              *summarize_profile(out)]

    async def phase_profile(self) -> None:
        secs = max(5.0, self.args.step_seconds)
        out = Path(f"{self.args.profile}-steady.txt")
        log(f"phase 2: py-spy on the server for {secs:.0f}s under the periodic load of {len(self.nodes)} nodes")
        a = self.meter.snap()
        proc = await self.start_profile(out)
        await asyncio.sleep(secs)
        await self.stop_profile(proc, out, f"steady state, {len(self.nodes)} nodes", a)

    # -- phase 2: saturation --

    async def phase_saturation(self) -> None:
        log(f"phase 3: saturation, {len(self.nodes)} nodes beating back to back on 32 connections, "
            f"{self.args.step_seconds:.0f}s")
        await self.stop_nodes()
        pos = 0
        kinds: Counter = Counter()

        def make():
            nonlocal pos
            for _ in range(len(self.nodes)):
                node = self.nodes[pos % len(self.nodes)]
                pos += 1
                if node.inflight is None:
                    break
            else:
                return None, None, None, lambda ok: None
            body, kind, sent, nb = node.next_beat()
            node.inflight = time.monotonic()
            kinds[kind] += 1

            def done(ok: bool) -> None:
                node.inflight = None
                if ok:
                    node.accepted(sent, nb)
            return "PUT", node.path, body, done

        self.saturation = await self.closed_loop(self.args.step_seconds, 32, make)
        self.saturation["kinds"] = dict(kinds)
        s = self.saturation
        log(f"  {s['rate']:.0f} hb/s, p50 {_ms(s['p50'])} ms, p99 {_ms(s['p99'])} ms, server CPU {s['srv']:.0%}, "
            f"load generator {s['me']:.0%}")

    # -- phase 4: new nodes joining a running cluster --

    async def phase_join(self, k: int) -> None:
        args = self.args
        n = len(self.nodes)
        log(f"phase 4: {k} new nodes join the {n} (spread over {args.interval:g}s); up to {args.join_timeout:.0f}s")
        j = Join(existing=n, new=k, offered=n / args.interval)
        # The periodic schedule again (saturation stopped it), settled for one interval first.
        self.start_nodes(self.nodes)
        await asyncio.sleep(2 * args.interval)
        log_mark = self.server.log_size()
        prof = None
        out = Path(f"{args.profile}-join.txt") if args.profile else None
        a = self.meter.snap()
        if out:
            prof = await self.start_profile(out)
        t0 = a["t"]
        new = [self.new_node(i) for i in range(n, n + k)]
        self.nodes.extend(new)
        self.start_nodes(new)
        took = await self.wait_answered(new, args.join_timeout)
        j.seconds = took
        j.registered = sum(not nd.first for nd in new)
        # Watch one more node_down_after window for nodes marked down (the server's liveness check).
        if took is not None:
            await asyncio.sleep(min(35.0, max(0.0, args.join_timeout - took)))
        t1 = time.monotonic()
        if prof:
            await self.stop_profile(prof, out, f"{k} nodes joining {n}", a)
        d = Meter.delta(a, self.meter.snap())
        j.observed = t1 - t0
        j.srv_cpu = d["srv"]
        first = [s.latency for s in self.samples if s.kind == "first" and s.issued >= t0 and s.ok]
        others = [s for s in self.samples if s.node < n and s.issued >= t0]
        j.first_p50, j.first_p99, j.first_max = pct(first, 0.5), pct(first, 0.99), max(first, default=None)
        j.others_p99 = pct([s.latency for s in others], 0.99)
        j.others_max = max((s.latency for s in others), default=None)
        j.others_done = sum(1 for s in others if s.ok and s.done < t1) / (t1 - t0)
        j.down_events = self.server.count_log("is down", log_mark)
        j.settled = took is not None and j.down_events == 0
        self.join = j
        log(f"  {j.registered}/{k} answered" + (f" after {took:.1f}s" if took is not None else " (timeout)")
            + f", first beats p99 {_ms(j.first_p99)} ms; existing nodes' beats p99 {_ms(j.others_p99)} ms; "
            f"{j.down_events} 'node is down' events")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, me.cancel)
        try:
            await self.setup()
            for i, n in enumerate(self.args.nodes):
                self.steps.append(await self.phase_step(n))
                if i == len(self.args.nodes) - 1:
                    if self.args.profile:
                        await self.phase_profile()
                    if not self.args.no_saturation:
                        await self.phase_saturation()
                    if self.args.join:
                        await self.phase_join(self.args.join)
                await self.stop_server()
        finally:
            await self.stop_server()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)


# -- profile summary ----------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def _short(file: str) -> str:
    for marker in ("site-packages/", "/syncbit/", "lib/python3"):
        i = file.find(marker)
        if i >= 0:
            return ("syncbit/" if marker == "/syncbit/" else "") + file[i + len(marker):]
    return file


def summarize_profile(path: Path) -> list[str]:
    """Where the server's trio thread spent its time: categories, syncbit lines, inclusive and self costs.

    Recorded with ``--idle``: samples in trio's epoll wait are the idle time; the shares below are of
    the busy samples (everything else, including time blocked in a system call such as an fsync).
    """
    incl: Counter = Counter()
    selfc: Counter = Counter()
    lines: Counter = Counter()
    cats: Counter = Counter()
    busy = idle = other_threads = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        if "trio/_core/_run.py" not in stack:
            other_threads += n
            continue
        names, located = [], []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            if not m:
                continue
            file = _short(m.group("file"))
            names.append(f"{m.group('func')} ({file})")
            located.append(f"{file}:{m.group('line')} {m.group('func')}")
        if names and names[-1].startswith("EpollIOManager.get_events"):
            idle += n
            continue
        busy += n
        for name in set(names):
            incl[name] += n
        if names:
            selfc[names[-1]] += n
        deepest = next((loc for loc in reversed(located) if loc.startswith(("syncbit/server/", "syncbit/model"))),
                       None)
        if deepest:
            lines[deepest] += n
        cats[_category(names)] += n
    if not busy:
        return ["py-spy recorded no busy samples"]
    out = [f"trio thread: {busy} busy samples, {idle} idle (epoll wait): busy {busy / (busy + idle):.0%} of the "
           f"time; shares below are of the busy samples"
           + (f" ({other_threads} samples of other threads ignored)" if other_threads else ""),
           "where the time goes (most specific syncbit step on the stack, else the library):"]
    for k, v in cats.most_common(14):
        out.append(f"  {v / busy:6.1%}  {k}")
    out.append("deepest syncbit line on the stack (the statement, with what it calls):")
    for k, v in lines.most_common(14):
        out.append(f"  {v / busy:6.1%}  {k}")
    out.append("top inclusive (syncbit, sqlite_utils, json, responses):")
    shown = 0
    for k, v in incl.most_common():
        if any(x in k for x in ("syncbit/server/", "syncbit/model", "sqlite_utils/", "(json/", "starlette/responses")):
            out.append(f"  {v / busy:6.1%}  {k}")
            shown += 1
            if shown >= 20:
                break
    out.append("top self (leaf frame):")
    for k, v in selfc.most_common(12):
        out.append(f"  {v / busy:6.1%}  {k}")
    return out


_CP, _ST = "(syncbit/server/controlplane.py)", "(syncbit/server/store.py)"
_CATS = [  # exact frames, most specific first
    ("heartbeat: Store.record_blocks (manifest INSERT OR IGNORE + SELECT)", f"Store.record_blocks {_ST}"),
    ("heartbeat: Store.put_holdings (bitmap upserts)", f"Store.put_holdings {_ST}"),
    ("heartbeat: decode_bitmap (base64 + zlib)", "decode_bitmap (syncbit/model.py)"),
    ("heartbeat: Store.report (one SELECT per dataset report, UPDATE if changed)", f"Store.report {_ST}"),
    ("scheduling: ControlPlane.reschedule", f"ControlPlane.reschedule {_CP}"),
    ("heartbeat: ControlPlane.desired (the answer: assignments, placements, datasets)",
     f"ControlPlane.desired {_CP}"),
    ("heartbeat: _blocks validation", f"ControlPlane._blocks {_CP}"),
    ("heartbeat: _node_row / put_node", f"ControlPlane._node_row {_CP}"),
    ("heartbeat: _node_row / put_node", f"Store.put_node {_ST}"),
    ("heartbeat: rest of ControlPlane.heartbeat (validation, loops)", f"ControlPlane.heartbeat {_CP}"),
    ("heartbeat: reading the body + json.loads (api._json)", "_json (syncbit/server/api.py)"),
    ("heartbeat: JSONResponse (json.dumps of the answer)", "JSONResponse.render (starlette/responses.py)"),
    ("heartbeat: JSONResponse (json.dumps of the answer)", "JSONResponse.__init__ (starlette/responses.py)"),
    ("heartbeat: metrics histogram + rest of the endpoint", "build_app.<locals>.heartbeat (syncbit/server/api.py)"),
    ("liveness check", f"ControlPlane.check_liveness {_CP}"),
    ("GET /metrics (render)", "render (syncbit/server/metrics.py)"),
]
_LIBS = [  # otherwise: the leaf's library
    ("trio: epoll wait (idle)", "EpollIOManager.get_events"),
    ("starlette (routing, middleware, request/response)", "starlette/"),
    ("hypercorn + h11 (HTTP parsing, connection tasks)", "hypercorn/"),
    ("hypercorn + h11 (HTTP parsing, connection tasks)", "h11/"),
    ("trio scheduler / I/O", "trio/"),
]


def _category(names: list[str]) -> str:
    present = set(names)
    for label, key in _CATS:
        if key in present:
            return label
    for label, key in _LIBS:
        if any(key in n for n in names[::-1][:3]):
            return label
    return "other: " + (names[-1] if names else "?")


def flame_svg(txt: Path, svg: Path) -> bool:
    """py-spy writes one format per run: a flame graph from the raw stacks if flamegraph.pl is installed."""
    tool = shutil.which("flamegraph.pl") or shutil.which("inferno-flamegraph")
    if not tool:
        return False
    with open(svg, "wb") as f:
        subprocess.run([tool, str(txt)], stdout=f, check=True)
    return True


# -- output ---------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1e3:.1f}" if v < 0.1 else f"{v * 1e3:.0f}")


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.0f}"


def _le(v: float | None) -> str:
    return "-" if v is None else ("> 1000" if math.isinf(v) else f"<= {v * 1e3:g}")


def _kb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e3:.1f}"


def print_table(bench: Bench, args, header: list[str], out=sys.stdout) -> list[tuple[str, str, str, bool]]:
    def emit_table(hdr, rows, right):
        widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
        for cols in [hdr, ["-" * w for w in widths], *rows]:
            out.write("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                for i, (c, w) in enumerate(zip(cols, widths))).rstrip() + "\n")

    out.write("\n")
    out.write(f"Syncbit control-plane scale benchmark: {len(bench.snaps)} snapshots x "
              f"{bench.snaps[0].nblocks if bench.snaps else 0} blocks per node, heartbeat every "
              f"{args.interval:g}s, {args.syncing:.0%} of nodes syncing, {args.step_seconds:g}s windows; server on "
              f"core {args.server_cpu}, load generator on core {args.client_cpu} "
              f"({'a new connection per request' if args.fresh_connections else 'keep-alive connections'}); "
              f"{os.cpu_count()} CPUs, kernel {os.uname().release}\n")
    for line in header:
        out.write(line + "\n")
    out.write("\n")
    hdr = ("nodes", "offered hb/s", "done hb/s", "p50 ms", "p99 ms", "max ms", "handler p99 ms", "server CPU",
           "CPU ms/hb", "runq wait", "written kB/hb", "RSS MB", "HWM MB", "loadgen CPU", "errors")
    rows = []
    for st in bench.steps:
        rows.append((st.nodes, f"{st.offered:.1f}", f"{st.achieved:.1f}", _ms(st.p50), _ms(st.p99), _ms(st.pmax),
                     _le(st.handler_p99), f"{st.srv_cpu:.0%}",
                     "-" if st.cpu_per_hb is None else f"{st.cpu_per_hb * 1e3:.2f}", f"{st.runq:.0%}",
                     _kb(st.wchar_per_hb), _mb(st.rss), _mb(st.hwm), f"{st.me_cpu:.0%}", st.errors))
    emit_table(hdr, rows, set(range(1, 15)))

    out.write("\n")
    hdr2 = ("measurement", "value", "server CPU", "CPU ms/req", "p50 ms", "p99 ms", "loadgen CPU")
    rows2 = []
    c = bench.ceiling
    if c:
        conns = "new connections" if args.fresh_connections else "keep-alive conns"
        rows2.append((f"baseline: HTTP stack ceiling, GET 404 (no syncbit code), 16 {conns}", f"{c['rate']:.0f} req/s",
                      f"{c['srv']:.0%}", f"{c['cpu_per_req'] * 1e3:.2f}", _ms(c["p50"]), _ms(c["p99"]),
                      f"{c['me']:.0%}"))
    sat = bench.saturation
    if sat:
        n = bench.steps[-1].nodes
        rows2.append((f"saturation: heartbeats back to back, {n} nodes, 32 conns", f"{sat['rate']:.0f} hb/s",
                      f"{sat['srv']:.0%}", "-" if sat["cpu_per_req"] is None else f"{sat['cpu_per_req'] * 1e3:.2f}",
                      _ms(sat["p50"]), _ms(sat["p99"]), f"{sat['me']:.0%}"))
        rows2.append((f"  => nodes one core could serve at {args.interval:g}s (saturation x interval)",
                      f"~{sat['rate'] * args.interval:,.0f}", "", "", "", "", ""))
    j = bench.join
    if j:
        rows2.append((f"join: {j.new} new nodes register at once into {j.existing} (first beats)",
                      (f"all in {j.seconds:.1f}s" if j.seconds is not None else
                       f"{j.registered}/{j.new} in {args.join_timeout:g}s"),
                      f"{j.srv_cpu:.0%}", "-", _ms(j.first_p50), _ms(j.first_p99), ""))
        rows2.append((f"  the {j.existing} nodes' beats meanwhile ({j.observed:.0f}s observed)",
                      f"{j.others_done:.0f}/{j.offered:.0f} hb/s", "", "", "", _ms(j.others_p99), ""))
        rows2.append(("  nodes marked down meanwhile (no answer for node_down_after = 30 s)",
                      f"{j.down_events}", "", "", "", "", ""))
    if rows2:
        emit_table(hdr2, rows2, {1, 2, 3, 4, 5, 6})

    results = []
    if bench.steps:
        top = bench.steps[-1]
        results = [
            (f"p99 heartbeat latency, {top.nodes} nodes", _ms(top.p99) + " ms", f"< {TARGET_P99 * 1e3:.0f} ms",
             top.p99 is not None and top.p99 < TARGET_P99),
            (f"keeps up, {top.nodes} nodes (done / offered)", f"{top.achieved / top.offered:.3f}",
             f">= {TARGET_KEEPUP}", top.achieved >= TARGET_KEEPUP * top.offered),
            (f"errors, {top.nodes} nodes", str(top.errors), "0", top.errors == 0),
        ]
        out.write("\n")
        emit_table(("target (steady state, largest step)", "measured", "target", "result"),
                   [(a, b, c, "PASS" if ok else "MISS") for a, b, c, ok in results], {1})
        if top.nodes < 1000:
            out.write(f"(the issue's target is at 1,000 nodes; this run's largest step is {top.nodes})\n")
        if j and not j.settled:
            out.write(f"(info, no target: the cluster did not absorb {j.new} joining nodes cleanly: "
                      f"{j.down_events} 'node is down' events"
                      + ("" if j.seconds is not None else f", not all registered within {args.join_timeout:g}s")
                      + ")\n")

    out.write("\nNotes:\n")
    if len(bench.steps) >= 2:
        a, b = bench.steps[0], bench.steps[-1]
        growth = [f"nodes x{b.nodes / a.nodes:.1f}"]
        if a.srv_cpu:
            growth.append(f"server CPU x{b.srv_cpu / a.srv_cpu:.1f}")
        if a.cpu_per_hb and b.cpu_per_hb:
            growth.append(f"CPU per heartbeat x{b.cpu_per_hb / a.cpu_per_hb:.2f}")
        if a.rss and b.rss:
            growth.append(f"RSS +{(b.rss - a.rss) / 1e6:.0f} MB ({(b.rss - a.rss) / (b.nodes - a.nodes) / 1e3:.1f} "
                          f"kB per node)")
        if a.p99 and b.p99:
            growth.append(f"p99 x{b.p99 / a.p99:.1f}")
        if a.reschedule_ms and b.reschedule_ms:
            growth.append(f"one reschedule() {a.reschedule_ms:.0f} -> {b.reschedule_ms:.0f} ms")
        out.write(f"  growth {a.nodes} -> {b.nodes} nodes: " + ", ".join(growth) + "\n")
    for st in bench.steps:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(st.kinds.items()))
        out.write(f"  [{st.nodes}] window: {st.issued} beats ({kinds}); p99 steady {_ms(st.p99_steady)} ms, "
                  f"syncing {_ms(st.p99_sync)} ms; {st.late} sent late; server handler p50 {_le(st.handler_p50)} ms "
                  f"(its histogram's bucket bounds); written per beat: {_kb(st.wchar_per_hb)} kB (wchar), "
                  f"{_kb(st.disk_per_hb)} kB (write_bytes); server core: other processes {st.other:.0%}, steal "
                  f"{st.steal:.0%}\n")
        out.write(f"  [{st.nodes}] warm-up {args.warmup:g}s + {st.settle_seconds:.1f}s "
                  + ("until the backlog drained" if st.settled else
                     f"and the backlog had NOT drained (more than {max(8, 0.02 * st.nodes):.0f} requests in flight)")
                  + "\n")
        out.write(f"  [{st.nodes}] state preloaded in {st.preload_seconds:.1f}s; one reschedule() at {st.nodes} "
                  f"nodes: {st.reschedule_ms:.0f} ms; after the server (re)start all {st.nodes} nodes answered in "
                  f"{st.reconnect_seconds:.1f}s, first beats (all bitmaps) p99 {_ms(st.reconnect_p99)} ms, max "
                  f"{_ms(st.reconnect_max)} ms; after the window: GET /metrics {_ms(st.metrics_seconds)} ms, GET "
                  f"/v1/status {_ms(st.status_seconds)} ms; {st.placements}\n")
    if bench.saturation:
        out.write(f"  saturation mix: {bench.saturation.get('kinds')}, runq wait {bench.saturation['runq']:.0%}\n")
    out.write(f"  connections opened by the load generator: {bench.opened}, requests retried on a new connection "
              f"(server closed a kept-alive one): {bench.retries}\n")
    busy_lg = [st.me_cpu for st in bench.steps] + [x["me"] for x in (bench.ceiling, bench.saturation) if x]
    if busy_lg and max(busy_lg) > 0.8:
        out.write(f"  WARNING: the load generator used up to {max(busy_lg):.0%} of its core: it may be the "
                  f"bottleneck where it is above ~80%\n")
    else:
        out.write(f"  load generator at most {max(busy_lg, default=0):.0%} of its core: not the bottleneck\n")
    noisy = [st for st in bench.steps if st.runq > 0.05]
    if noisy:
        out.write("  NOTE: the server was runnable but waiting for its core (other processes on it) "
                  + ", ".join(f"{st.runq:.0%} of the time at {st.nodes}" for st in noisy)
                  + ": latencies are inflated by that much noise\n")
    if bench.errors:
        out.write(f"  {len(bench.errors)} errors, first: {bench.errors[:3]}\n")
    for what, lines in bench.profile.items():
        out.write(f"\nProfile of the server, {what}:\n")
        for line in lines:
            out.write(f"  {line}\n")
    out.flush()
    return results


def code_version() -> str:
    import syncbit

    pkg = Path(syncbit.__file__).resolve().parent
    desc = f"syncbit from {pkg}"
    try:
        head = subprocess.run(["git", "-C", str(pkg.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "-C", str(pkg.parent), "diff", "HEAD", "--", "syncbit"], capture_output=True,
                              check=True).stdout
        desc += f", git {head}" + (f" + uncommitted changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"
                                   if diff else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return desc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="100,250,500,1000",
                   help="node counts of the steps, increasing (default %(default)s)")
    p.add_argument("--step-seconds", type=float, default=30.0, help="measured window per step (default 30)")
    p.add_argument("--warmup", type=float, default=10.0,
                   help="seconds after every node had its first answer, before the window (default 10)")
    p.add_argument("--settle-max", type=float, default=60.0,
                   help="after the warm-up, wait up to this long for the first beats' backlog to drain (default 60)")
    p.add_argument("--interval", type=float, default=5.0, help="heartbeat interval (default 5)")
    p.add_argument("--datasets", type=int, default=20, help="datasets (snapshots) per node (default 20)")
    p.add_argument("--blocks", type=int, default=2000, help="blocks per snapshot (default 2000)")
    p.add_argument("--syncing", type=float, default=0.2, help="fraction of nodes that keep syncing (default 0.2)")
    p.add_argument("--connections", type=int, default=64, help="load generator's connection pool (default 64)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="a new TCP connection for every request, as real agents get with hypercorn's 5 s keep-alive")
    p.add_argument("--join", type=int, default=100,
                   help="new nodes registering at once into the largest step at the end; 0 skips (default 100)")
    p.add_argument("--join-timeout", type=float, default=120.0,
                   help="how long the join phase may take (default 120)")
    p.add_argument("--register-timeout", type=float, default=120.0,
                   help="give up if the nodes of a step do not all get an answer by then (default 120)")
    p.add_argument("--server-cpu", type=int, default=0, help="core for the server (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="core for this load generator (default 1)")
    p.add_argument("--no-saturation", action="store_true", help="skip the saturation phase")
    p.add_argument("--profile", metavar="PREFIX",
                   help="py-spy the server at the largest step: PREFIX-steady.txt, PREFIX-join.txt (raw stacks); "
                        "summaries under the table")
    p.add_argument("--no-long-poll", dest="long_poll", action="store_false",
                   help="simulated nodes do not hold a long poll of their desired state (agents do)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="parent of the work directory")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, databases)")
    args = p.parse_args()
    try:
        args.nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error("--nodes: a comma-separated list of integers")
    if not args.nodes or args.nodes != sorted(set(args.nodes)) or args.nodes[0] < 1:
        p.error("--nodes must be increasing positive integers")
    if shutil.which("taskset") is None:
        p.error("taskset (util-linux) is needed")
    if args.server_cpu == args.client_cpu or max(args.server_cpu, args.client_cpu) >= (os.cpu_count() or 1):
        p.error("--server-cpu and --client-cpu must be two different existing cores")
    if args.profile:
        args.profile = os.path.abspath(args.profile)

    os.sched_setaffinity(0, {args.client_cpu})
    work = Path(tempfile.mkdtemp(prefix="syncbit-cpbench-", dir=args.workdir))
    log(f"work directory {work}")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    header = [code_version()]
    bench = None
    results: list = []
    interrupted = False
    try:
        dirs = make_dataset_dirs(work / "data", args.datasets, args.blocks)
        bench = Bench(args, work, dirs)
        try:
            asyncio.run(bench.run())
        except (asyncio.CancelledError, KeyboardInterrupt):
            interrupted = True
            log("interrupted")
        finally:
            header.append(f"load average (1 min) {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, "
                          f"{time.monotonic() - started:.0f}s")
            if bench.steps or bench.ceiling:
                results = print_table(bench, args, header)
    finally:
        if bench is not None and bench.server is not None:
            bench.server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f}s")
    if args.json and bench is not None:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "steps": [st.__dict__ for st in bench.steps], "ceiling": bench.ceiling,
                       "saturation": bench.saturation, "join": bench.join.__dict__ if bench.join else None,
                       "profile": bench.profile,
                       "targets": [{"what": a, "value": b, "target": c, "ok": ok} for a, b, c, ok in results]},
                      f, indent=2, default=str)
    if interrupted:
        return 130
    return 1 if any(not ok for *_, ok in results) or not results else 0


if __name__ == "__main__":
    sys.exit(main())
