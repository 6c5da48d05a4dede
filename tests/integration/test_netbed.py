"""Several hosts on one machine: each agent, the control plane and the origin in its own network
namespace with its own address, links shaped with tc (tools/netbed.py)."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from netbed import NetBed  # noqa: E402

from .test_control_plane import cli, wait_until  # noqa: E402

BS = 1 * 2**20
RATE = "200mbit"
SECRET = "netbed cluster secret, 32 bytes!"


@pytest.fixture
def bed():
    with NetBed(prefix="sbt", rate=RATE) as b:
        yield b


@pytest.fixture
def cluster(tmp_path, bed, server_factory, agent_factory):
    """A control plane, an origin and four agents, each on its own shaped link."""
    files = {"model.bin": random.Random(1).randbytes(40 * BS + 1234), "config.json": b'{"x": 1}'}
    write_tree(tmp_path / "src", files)
    cp = bed.add_host("cp")
    origin_host = bed.add_host("origin")
    origin = subprocess.Popen([*origin_host.prefix(), sys.executable, "-m", "syncbit.demo.origin",
                               str(tmp_path / "src"), "8080", origin_host.address],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:  # from here on, the origin is stopped whatever fails
        url = origin.stdout.readline().strip()
        server = server_factory(host=cp.address, prefix=cp.prefix(), node_down_after="4s")
        (tmp_path / "secret").write_text(SECRET)
        agents = {}
        for i in range(4):
            host = bed.add_host(f"n{i}")
            agents[f"n{i}"] = agent_factory(
                f"n{i}", prefix=host.prefix(), node_name=f"n{i}", server=server.url, heartbeat_interval="0.5s",
                block_size=BS, peer_listen=f"{host.address}:7071", cluster_secret_file=str(tmp_path / "secret"),
                fetch_deadline="30s")
            agents[f"n{i}"].host = host
        wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 4, what="4 nodes")
        cli(server, "dataset", "add", "d", url)
        yield {"bed": bed, "server": server, "agents": agents, "files": files, "origin_host": origin_host,
               "size": sum(map(len, files.values()))}
    finally:
        origin.kill()
        origin.wait()
        origin.stdout.close()


def egress(host) -> int:
    """Bytes the host sent on its link (tc's counter on its side of the veth)."""
    out = subprocess.run(["tc", "-n", host.netns, "-s", "qdisc", "show", "dev", "eth0"], capture_output=True,
                         text=True).stdout
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


def check_bytes(agents, files):
    for a in agents:
        for rel, data in files.items():
            assert (a.mnt / "d" / rel).read_bytes() == data, (a.config["node_name"], rel)


def test_four_agents_pull_one_dataset_at_once(cluster):
    server, agents = cluster["server"], cluster["agents"]
    before = egress(cluster["origin_host"])
    t0 = time.monotonic()
    cli(server, "assign", "d", "--nodes", ",".join(agents))
    cli(server, "wait", "d", "--timeout", "180")
    took = time.monotonic() - t0
    check_bytes(agents.values(), cluster["files"])
    sent = egress(cluster["origin_host"]) - before
    # Four plain downloads would push 4 copies through the origin's link. The target (about one copy)
    # is the swarm benchmark's to measure; under a loaded CPU peers answer late and agents fall back
    # to the source sooner, so the test only holds the swarm to clearly fewer than four.
    print(f"origin sent {sent / cluster['size']:.2f} copies; all four ready in {took:.1f}s")
    assert sent < 3.0 * cluster["size"], f"origin sent {sent / cluster['size']:.2f} copies in {took:.1f}s"


def test_a_peer_killed_mid_transfer(cluster):
    server, agents = cluster["server"], cluster["agents"]
    cli(server, "assign", "d", "--nodes", ",".join(agents))
    wait_until(lambda: agents["n0"].dataset("d")["bytes_cached"] > 4 * BS, timeout=60, what="n0 mid-transfer")
    agents["n0"].kill9()
    for name in ("n1", "n2", "n3"):
        cli(server, "wait", "d", "--node", name, "--timeout", "180")
    check_bytes([agents[n] for n in ("n1", "n2", "n3")], cluster["files"])


def test_a_peer_whose_link_goes_down(cluster):
    server, agents, bed = cluster["server"], cluster["agents"], cluster["bed"]
    cli(server, "assign", "d", "--nodes", ",".join(agents))
    wait_until(lambda: agents["n1"].dataset("d")["bytes_cached"] > 4 * BS, timeout=60, what="n1 mid-transfer")
    bed.link(agents["n1"].host, up=False)
    try:
        for name in ("n0", "n2", "n3"):
            cli(server, "wait", "d", "--node", name, "--timeout", "180")
        check_bytes([agents[n] for n in ("n0", "n2", "n3")], cluster["files"])
        wait_until(lambda: not {n["name"]: n["up"] for n in server.api("GET", "/v1/nodes").json()["nodes"]}["n1"],
                   timeout=30, what="n1 marked down")
    finally:
        bed.link(agents["n1"].host, up=True)
    cli(server, "wait", "d", "--node", "n1", "--timeout", "180")  # back, and it finishes
    check_bytes([agents["n1"]], cluster["files"])


def test_the_control_plane_stopped_mid_transfer(cluster):
    server, agents = cluster["server"], cluster["agents"]
    cli(server, "assign", "d", "--nodes", ",".join(agents))
    wait_until(lambda: all(any(d["name"] == "d" for d in a.status()["datasets"]) for a in agents.values()),
               timeout=60, what="assignment received")
    server.stop(signal.SIGKILL)
    for a in agents.values():
        wait_until(lambda a=a: a.dataset("d")["state"] == "ready", timeout=180, what="ready without the server")
    check_bytes(agents.values(), cluster["files"])
