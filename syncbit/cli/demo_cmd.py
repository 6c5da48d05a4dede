"""``syncbit demo``: the whole path on one machine, nothing external.

Generates a model-and-data set, serves it from a local HTTP origin, starts an
agent on a temporary mountpoint, pulls the dataset with progress, reads a
tensor through the mount with ``safetensors`` (mmap), shows what the cache
did; then starts a control plane and two more agents (two zones, peers of each
other), assigns the dataset to them by label with one replica per zone, waits
until it is ready on both, shows the cluster's node x dataset matrix and how
many copies left the origin. Cleans up at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click


def _syncbit(*args: str, env: dict, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbit", *args], env=env, check=True, text=True,
                          capture_output=capture)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the control plane exited with status {proc.returncode}")
        try:
            httpx.get(url + "/v1/status", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise click.ClickException("the control plane did not come up within 30s")


@click.command()
@click.option("--shard-mib", default=48, show_default=True, help="Size of each of the 3 safetensors shards.")
@click.option("--keep", is_flag=True, help="Leave the agent running and the files in place at the end.")
def demo(shard_mib: int, keep: bool) -> None:
    """Run a local demo: origin, agent, pull, tensor read through the mount; then a control plane and two agents."""
    import json

    from ..demo.dataset import generate
    from ..demo.origin import OriginServer
    from ..units import format_size

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise click.ClickException("the demo mounts a FUSE filesystem: run it as root on a machine with /dev/fuse")
    work = Path(tempfile.mkdtemp(prefix="syncbit-demo-"))
    env = {**os.environ, "SYNCBIT_SOCKET": str(work / "agent.sock")}
    mnt = work / "datasets"
    origin = None
    server = None
    cluster_agents: list[Path] = []
    started = False
    say = lambda msg: click.secho(msg, fg="cyan", bold=True)  # noqa: E731
    try:
        say(f"1. generating a demo model and data set in {work / 'origin'}")
        files = generate(work / "origin" / "tiny-model", shard_mib=shard_mib)
        for rel, size in files.items():
            click.echo(f"   {rel:45} {format_size(size):>10}")
        origin = OriginServer(work / "origin").start()
        url = origin.url + "tiny-model/"
        say(f"2. serving it from a local HTTP origin at {url}")

        say(f"3. starting an agent: mount {mnt}, cache {work / 'cache'}")
        _syncbit("mount", str(mnt), "--cache-dir", str(work / "cache"), "--socket", str(work / "agent.sock"), env=env)
        started = True

        say("4. syncbit pull (registers the dataset, prefetches it with progress)")
        t0 = time.monotonic()
        _syncbit("pull", url, "--name", "tiny-model", env=env)
        pull_s = time.monotonic() - t0
        click.echo(f"   pulled in {pull_s:.1f}s")

        say("5. reading a tensor through the mount with safetensors (mmap)")
        from safetensors import safe_open

        shard = mnt / "tiny-model" / "model-00002-of-00003.safetensors"
        t0 = time.monotonic()
        with safe_open(str(shard), framework="numpy") as f:
            name = next(k for k in f.keys() if k.endswith("mlp.weight"))
            tensor = f.get_tensor(name)
        read_s = time.monotonic() - t0
        with safe_open(str(work / "origin" / "tiny-model" / shard.name), framework="numpy") as f:
            same = (f.get_tensor(name) == tensor).all()
        click.echo(f"   {name}: shape {tensor.shape}, dtype {tensor.dtype}, mean {float(tensor.mean()):+.5f}, "
                   f"read in {read_s * 1000:.0f} ms, identical to the origin's: {bool(same)}")
        lines = sum(1 for _ in open(mnt / "tiny-model" / "data" / "train.csv"))
        click.echo(f"   data/train.csv: {lines} lines")

        say("6. what happened")
        st = json.loads(_syncbit("status", "--json", env=env, capture=True).stdout)
        d = st["datasets"][0]
        c = st["cache"]
        click.echo(f"   dataset {d['name']}: {d['state']}, snapshot {d['revision']}, "
                   f"{format_size(d['bytes_cached'])} of {format_size(d['bytes_total'])} cached")
        click.echo(f"   cache: {c['blocks']} blocks, {format_size(c['bytes'])}; "
                   f"bytes from the origin: {format_size(origin.bytes_sent)} (one copy: {format_size(sum(files.values()))})")
        click.echo(f"   the tensor read was served from the local cache (hit ratio {c['hit_ratio']:.0%})")
        _syncbit("status", env=env)
        if not same:
            raise click.ClickException("the tensor read through the mount differs from the origin's")

        say("7. a cluster: a control plane and two agents (peers) labelled zone=a and zone=b")
        port = _free_port()
        server_url = f"http://127.0.0.1:{port}"
        with open(work / "server.log", "ab") as server_log:
            server = subprocess.Popen(
                [sys.executable, "-m", "syncbit", "server", "--db", str(work / "server" / "state.sqlite"),
                 "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=server_log, env=env)
        _wait_for_server(server_url, server)
        secret = work / "cluster.secret"
        secret.write_text(os.urandom(24).hex())
        for node, zone in (("node-a", "a"), ("node-b", "b")):
            node_dir = work / node
            node_dir.mkdir()
            (node_dir / "agent.yaml").write_text(json.dumps({
                "node_name": node, "labels": {"role": "demo", "zone": zone}, "server": server_url,
                "heartbeat_interval": "1s", "mountpoint": str(node_dir / "datasets"),
                "cache_dir": str(node_dir / "cache"), "socket": str(node_dir / "agent.sock"),
                "min_free_disk": "0", "peer_listen": f"127.0.0.1:{_free_port()}",
                "cluster_secret_file": str(secret)}))
            # Their own sockets, from their configs: not the first agent's SYNCBIT_SOCKET.
            _syncbit("daemon", "--config", str(node_dir / "agent.yaml"),
                     env={k: v for k, v in env.items() if k != "SYNCBIT_SOCKET"})
            cluster_agents.append(node_dir)
        cenv = {**env, "SYNCBIT_SERVER": server_url}
        sent = origin.bytes_sent
        click.echo(f"   $ syncbit dataset add tiny-model {url}")
        _syncbit("dataset", "add", "tiny-model", url, env=cenv)
        click.echo("   $ syncbit assign tiny-model --selector role=demo --replicas 2 --spread-by zone")
        _syncbit("assign", "tiny-model", "--selector", "role=demo", "--replicas", "2", "--spread-by", "zone",
                 env=cenv)
        click.echo("   $ syncbit wait tiny-model --timeout 300")
        _syncbit("wait", "tiny-model", "--timeout", "300", env=cenv)
        _syncbit("status", env=cenv)
        for node_dir in cluster_agents:
            with safe_open(str(node_dir / "datasets" / "tiny-model" / shard.name), framework="numpy") as f:
                ok = (f.get_tensor(name) == tensor).all()
            click.echo(f"   {node_dir.name}: {name} read through its own mount, identical: {bool(ok)}")
            if not ok:
                raise click.ClickException(f"{node_dir.name} read a different tensor")
        copies = (origin.bytes_sent - sent) / sum(files.values())
        click.echo(f"   the origin sent {format_size(origin.bytes_sent - sent)} for the two nodes ({copies:.2f} copies of "
                   "the dataset): they fetched different blocks and traded them as peers")
        if keep:
            click.echo(f"\nleft running: ls {mnt}/tiny-model; stop with SYNCBIT_SOCKET={work}/agent.sock syncbit unmount")
            return
        say("8. cleaning up")
    finally:
        if not keep:
            for node_dir in cluster_agents:
                subprocess.run([sys.executable, "-m", "syncbit", "unmount"], capture_output=True,
                               env={**env, "SYNCBIT_SOCKET": str(node_dir / "agent.sock")})
            if server is not None:
                server.terminate()
                server.wait()
            if started:
                subprocess.run([sys.executable, "-m", "syncbit", "unmount"], env=env, capture_output=True)
            if origin is not None:
                origin.stop()
            shutil.rmtree(work, ignore_errors=True)
    click.secho("demo finished", fg="green", bold=True)
