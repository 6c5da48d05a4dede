"""Peers on loopback: agents exchange verified blocks, authenticated with the cluster secret,
through the control plane's tracker; the source is the fallback."""

from __future__ import annotations

import random
import signal
import time

import httpx

from syncbit.model import content_id
from syncbit.peer.auth import auth_headers
from tests.conftest import _free_port, write_tree

from .test_control_plane import BS, cli, wait_until

SECRET = "correct horse battery staple 42"


def peer_agents(agent_factory, server, tmp_path, names, secret=SECRET, **config):
    out = {}
    for name in names:
        secret_file = tmp_path / f"{name}.secret"
        secret_file.write_text(secret if isinstance(secret, str) else secret[name])
        port = _free_port()
        out[name] = agent_factory(name, node_name=name, server=server.url, heartbeat_interval="0.5s",
                                  block_size=BS, peer_listen=f"127.0.0.1:{port}",
                                  cluster_secret_file=str(secret_file), **config)
        out[name].peer = f"127.0.0.1:{port}"
    wait_until(lambda: set(names) <= {n["name"] for n in server.api("GET", "/v1/nodes").json()["nodes"]},
               what="nodes")
    return out


def files_of(seed):
    rnd = random.Random(seed)
    return {"w1.bin": rnd.randbytes(6 * BS + 99), "w2.bin": rnd.randbytes(4 * BS), "c.json": b"{}"}


def first_node_ready(server, origin, agents, files):
    cli(server, "dataset", "add", "d", origin.url)
    cli(server, "assign", "d", "--nodes", "n0")
    cli(server, "wait", "d", "--timeout", "60")
    assert origin.bytes_sent >= sum(map(len, files.values()))
    # n0's bitmap and block ids reach the tracker with its next heartbeats.
    time.sleep(1.5)


def test_second_node_takes_every_block_from_the_first(tmp_path, origin_factory, server_factory, agent_factory):
    files = files_of(1)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1"])
    first_node_ready(server, origin, agents, files)
    sent = origin.bytes_sent
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--timeout", "60")
    for rel, data in files.items():
        assert (agents["n1"].mnt / "d" / rel).read_bytes() == data
    assert origin.bytes_sent == sent, "n1 took nothing from the origin: one copy left the source"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agents["n1"].sock))) as c:
        metrics = c.get("http://a/metrics").text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines() if ln and ln[0] != "#"}
    assert values['syncbit_agent_bytes_total{origin="peer"}'] == sum(map(len, files.values()))
    assert values.get('syncbit_agent_bytes_total{origin="source"}', 0.0) == 0.0


def test_peer_protocol_authentication_and_errors(tmp_path, origin_factory, server_factory, agent_factory):
    files = files_of(2)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0"])
    first_node_ready(server, origin, agents, files)
    bid = content_id(files["c.json"])
    url = f"http://{agents['n0'].peer}/v1/blocks/{bid}"
    secret = SECRET.encode()
    ok = httpx.get(url, headers=auth_headers(secret, "GET", f"/v1/blocks/{bid}", time.time(), "t"))
    assert ok.status_code == 200 and ok.content == files["c.json"]
    tries = {
        "no signature": {},
        "wrong secret": auth_headers(b"another secret of 16+ bytes", "GET", f"/v1/blocks/{bid}", time.time(), "t"),
        "signature for another path": auth_headers(secret, "GET", "/v1/blocks/" + "0" * 64, time.time(), "t"),
        "stale timestamp (replay)": auth_headers(secret, "GET", f"/v1/blocks/{bid}", time.time() - 3600, "t"),
    }
    for what, headers in tries.items():
        assert httpx.get(url, headers=headers).status_code == 401, what
    missing = "f" * 64
    r = httpx.get(f"http://{agents['n0'].peer}/v1/blocks/{missing}",
                  headers=auth_headers(secret, "GET", f"/v1/blocks/{missing}", time.time(), "t"))
    assert r.status_code == 404
    r = httpx.get(f"http://{agents['n0'].peer}/v1/blocks/..%2f..%2fetc%2fpasswd",
                  headers=auth_headers(secret, "GET", "/v1/blocks/..%2f..%2fetc%2fpasswd", time.time(), "t"))
    assert r.status_code in (400, 401, 404) and b"root:" not in r.content
    # Garbage on the peer port: the server answers 400 or drops it, and keeps serving.
    import socket

    host, port = agents["n0"].peer.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"\x00\xff garbage \r\n\r\n" * 100)
        s.settimeout(5)
        try:
            s.recv(100)
        except (TimeoutError, ConnectionResetError):
            pass
    assert httpx.get(url, headers=auth_headers(secret, "GET", f"/v1/blocks/{bid}", time.time(), "t")).status_code \
        == 200


def test_a_peer_with_another_secret_is_refused_and_the_source_serves(tmp_path, origin_factory, server_factory,
                                                                    agent_factory):
    files = files_of(3)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1"],
                         secret={"n0": SECRET, "n1": "a different secret, also long"})
    first_node_ready(server, origin, agents, files)
    sent = origin.bytes_sent
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--timeout", "60")
    assert (agents["n1"].mnt / "d" / "w1.bin").read_bytes() == files["w1.bin"]
    assert origin.bytes_sent - sent == sum(map(len, files.values()))
    assert "refused our cluster signature" in agents["n1"].log()


def test_a_peer_serving_corrupt_blocks_is_banned_and_never_reaches_a_reader(tmp_path, origin_factory,
                                                                           server_factory, agent_factory):
    files = files_of(4)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    # n0 flips a byte of every block it serves (the test-only fault switch).
    n0 = peer_agents(agent_factory, server, tmp_path, ["n0"], env={"SYNCBIT_TEST_CORRUPT_PEER": "1"})["n0"]
    n1 = peer_agents(agent_factory, server, tmp_path, ["n1"])["n1"]
    first_node_ready(server, origin, {"n0": n0}, files)
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--timeout", "60")
    for rel, data in files.items():
        assert (n1.mnt / "d" / rel).read_bytes() == data
    assert "sent a wrong block" in n1.log() and "banned" in n1.log()


def test_a_peer_killed_mid_transfer_falls_back_to_other_holders_or_the_source(tmp_path, origin_factory,
                                                                             server_factory, agent_factory):
    files = {"big.bin": random.Random(5).randbytes(24 * BS)}
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory(node_down_after="30s")  # the tracker keeps offering the dead peer
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1"])
    first_node_ready(server, origin, agents, files)
    agents["n0"].kill9()
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--node", "n1", "--timeout", "60")
    assert (agents["n1"].mnt / "d" / "big.bin").read_bytes() == files["big.bin"]


def test_nodes_starting_together_take_about_one_copy_from_the_source(tmp_path, origin_factory, server_factory,
                                                                    agent_factory):
    """Three nodes assigned at once: the tracker's claims make each block leave the origin about once."""
    files = {"a.bin": random.Random(6).randbytes(32 * BS), "b.bin": random.Random(7).randbytes(16 * BS)}
    total = sum(map(len, files.values()))
    origin = origin_factory(write_tree(tmp_path / "src", files))
    origin.rate = 2 * 2**20  # per response: long enough for claims and holdings to matter
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1", "n2"])
    cli(server, "dataset", "add", "d", origin.url)
    cli(server, "assign", "d", "--nodes", "n0,n1,n2")
    cli(server, "wait", "d", "--timeout", "120")
    for a in agents.values():
        for rel, data in files.items():
            assert (a.mnt / "d" / rel).read_bytes() == data
    assert origin.bytes_sent <= 1.5 * total, f"origin sent {origin.bytes_sent / total:.2f} copies"


def test_with_the_tracker_down_agents_use_the_peers_they_last_heard_of(tmp_path, origin_factory, server_factory,
                                                                      agent_factory):
    files = files_of(8)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1"])
    first_node_ready(server, origin, agents, files)
    n1 = agents["n1"]
    n1.cli("pull", origin.url, "--name", "local")  # by hand on n1: every block comes from n0
    sent = origin.bytes_sent
    n1.cli("evict", "local")  # unpinned and dropped; the holders it learnt stay in memory
    server.stop(signal.SIGKILL)
    origin.stop()
    for rel, data in files.items():
        assert (n1.mnt / "local" / rel).read_bytes() == data  # from n0, with no tracker and no origin
    assert origin.bytes_sent == sent


def test_upload_rate_limit_holds(tmp_path, origin_factory, server_factory, agent_factory):
    """n0 uploads at most 1 MiB/s: n1 cannot get 3 MiB from it faster than ~2.75 s (no upper bound asserted)."""
    files = {"w.bin": random.Random(9).randbytes(12 * BS)}  # 3 MiB
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    n0 = peer_agents(agent_factory, server, tmp_path, ["n0"], peer_upload_rate="1MiB")["n0"]
    n1 = peer_agents(agent_factory, server, tmp_path, ["n1"])["n1"]
    first_node_ready(server, origin, {"n0": n0}, files)
    sent = origin.bytes_sent
    t0 = time.monotonic()
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--timeout", "60")
    took = time.monotonic() - t0
    assert origin.bytes_sent == sent  # all from n0
    assert took >= 2.5, f"3 MiB at 1 MiB/s took {took:.2f}s"
    assert (n1.mnt / "d" / "w.bin").read_bytes() == files["w.bin"]


def agent_metrics(agent) -> dict[str, float]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.sock))) as c:
        text = c.get("http://a/metrics").text
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def test_a_reader_takes_a_block_another_node_is_fetching_as_it_arrives_there(tmp_path, origin_factory,
                                                                             server_factory, agent_factory):
    """Two nodes read the same cold file through their mounts (no prefetch): blocks that one node is
    still receiving from a slow origin reach the other by relay, and leave the origin once."""
    import threading

    files = {"w.bin": random.Random(10).randbytes(16 * BS)}  # 4 MiB
    origin = origin_factory(write_tree(tmp_path / "src", files))
    origin.rate = 1 * 2**20  # per response: each block is in flight at its fetcher for a while
    server = server_factory()
    agents = peer_agents(agent_factory, server, tmp_path, ["n0", "n1"])
    for a in agents.values():  # registered unpinned: only the read path fetches
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(a.sock)), timeout=30) as c:
            c.post("http://a/v1/datasets", json={"name": "d", "uri": origin.url, "pin": False}).raise_for_status()
    out = {}

    def read(name):
        out[name] = (agents[name].mnt / "d" / "w.bin").read_bytes()

    first = threading.Thread(target=read, args=("n0",))
    first.start()
    time.sleep(1.0)  # n0 has a run of blocks in flight from the origin
    read("n1")
    first.join(60)
    assert out == {"n0": files["w.bin"], "n1": files["w.bin"]}
    relayed = agent_metrics(agents["n1"]).get('syncbit_agent_relay_bytes_total{direction="download"}', 0.0)
    assert relayed >= BS, "n1 took at least one block from n0 while n0 was receiving it"
    assert origin.bytes_sent <= 1.25 * len(files["w.bin"]), f"origin sent {origin.bytes_sent} bytes"
