"""A control plane and several agents as separate processes on loopback, each agent with its own
cache dir, mountpoint and socket; datasets from a real HTTP origin."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import write_tree

BS = 256 * 1024


def cli(server, *args, check=True, timeout=120):
    r = subprocess.run([sys.executable, "-m", "syncbit", *args, "--server", server.url], capture_output=True,
                       text=True, timeout=timeout, env={k: v for k, v in os.environ.items()
                                                        if not k.startswith("SYNCBIT_")})
    if check and r.returncode != 0:
        raise AssertionError(f"syncbit {' '.join(args)} exited {r.returncode}: {r.stderr}\n{server.log()[-3000:]}")
    return r


def agents_for(agent_factory, server, labels_by_node, **config):
    return {name: agent_factory(name, node_name=name, server=server.url, heartbeat_interval="0.5s", block_size=BS,
                                labels=labels, **config)
            for name, labels in labels_by_node.items()}


def wait_until(pred, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def placed(server, name) -> set[str]:
    return set(server.api("GET", f"/v1/datasets/{name}").json()["nodes"])


def dataset_files(seed=1):
    rnd = random.Random(seed)
    return {"weights.bin": rnd.randbytes(3 * BS + 77), "config.json": b'{"a": 1}', "sub/tok.txt": b"t" * 1000}


def test_selector_replicas_spread_restarts_and_unassign(tmp_path, origin_factory, server_factory, agent_factory):
    files = dataset_files()
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory(node_down_after="60s")  # an agent restart is not a node failure here
    agents = agents_for(agent_factory, server, {
        "n0": {"gpu": "h100", "zone": "a"}, "n1": {"gpu": "h100", "zone": "a"}, "n2": {"gpu": "h100", "zone": "b"},
        "n3": {"gpu": "a10", "zone": "b"}})
    wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 4, what="4 nodes registered")

    cli(server, "dataset", "add", "llama", origin.url)
    r = cli(server, "assign", "llama", "--selector", "gpu=h100", "--replicas", "2", "--spread-by", "zone")
    nodes = placed(server, "llama")
    assert len(nodes) == 2 and "n2" in nodes and "n3" not in nodes, (nodes, r.stdout)  # one per zone
    cli(server, "wait", "llama", "--timeout", "60")
    for name, agent in agents.items():
        if name in nodes:
            for rel, data in files.items():
                assert (agent.mnt / "llama" / rel).read_bytes() == data
            assert agent.dataset("llama")["state"] == "ready"
        else:
            assert not (agent.mnt / "llama").exists()
    status = json.loads(cli(server, "status", "--json").stdout)
    matrix = {d["name"]: {n: p["state"] for n, p in d["nodes"].items()} for d in status["datasets"]}
    assert matrix == {"llama": {n: "ready" for n in nodes}}

    # The control plane is killed and restarted: state kept; agents serve meanwhile.
    server.stop(signal.SIGKILL)
    one = agents[sorted(nodes)[0]]
    assert (one.mnt / "llama" / "weights.bin").read_bytes() == files["weights.bin"]
    server.start()
    assert placed(server, "llama") == nodes
    assert [d["name"] for d in json.loads(cli(server, "dataset", "ls", "--json").stdout)] == ["llama"]
    cli(server, "wait", "llama", "--timeout", "30")

    # An agent restarts: it comes back ready from its cache, without refetching.
    sent = origin.bytes_sent
    one.stop()
    one.start()
    cli(server, "wait", "llama", "--node", one.config["node_name"], "--timeout", "30")
    assert origin.bytes_sent == sent

    # Unassigned: nodes unpin it; the data stays readable (eviction may take it). A node where a
    # program holds a file open keeps it pinned until the file is closed.
    other = agents[sorted(nodes)[1]]
    held = open(one.mnt / "llama" / "weights.bin", "rb")
    try:
        cli(server, "unassign", "llama")
        wait_until(lambda: not other.dataset("llama")["pinned"], what="unpinned")
        ds = one.dataset("llama")
        assert ds["pinned"] and ds["held"] and ds["open_files"] == 1, ds
        assert "kept pinned while in use (1 open files)" in one.log()
        assert held.read(100) == files["weights.bin"][:100]
    finally:
        held.close()
    wait_until(lambda: not one.dataset("llama")["pinned"], what="unpinned after the last file closed")
    assert not one.dataset("llama")["held"]
    assert (one.mnt / "llama" / "config.json").read_bytes() == files["config.json"]


def test_node_killed_and_replaced(tmp_path, origin_factory, server_factory, agent_factory):
    files = dataset_files(2)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory(node_down_after="2s")
    agents = agents_for(agent_factory, server, {f"n{i}": {"role": "train"} for i in range(3)})
    wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 3, what="3 nodes")
    cli(server, "dataset", "add", "set", origin.url)
    cli(server, "assign", "set", "--selector", "role=train", "--replicas", "2")
    cli(server, "wait", "set", "--timeout", "60")
    before = placed(server, "set")
    victim = sorted(before)[0]
    agents[victim].kill9()
    wait_until(lambda: victim not in placed(server, "set") and len(placed(server, "set")) == 2, timeout=30,
               what="replacement placed")
    after = placed(server, "set")
    (spare,) = after - before
    cli(server, "wait", "set", "--timeout", "60")
    assert (agents[spare].mnt / "set" / "weights.bin").read_bytes() == files["weights.bin"]
    nodes = {n["name"]: n["up"] for n in server.api("GET", "/v1/nodes").json()["nodes"]}
    assert nodes[victim] is False and all(nodes[n] for n in after)
    assert f"node {victim} is down" in server.log()


def test_wait_ready_failed_and_timeout(tmp_path, origin_factory, server_factory, agent_factory):
    files = dataset_files(3)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents_for(agent_factory, server, {"n0": {"zone": "a"}}, fetch_deadline="2s")
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="node")
    cli(server, "dataset", "add", "ok", origin.url)
    # Nothing matches: wait times out and says why.
    cli(server, "assign", "ok", "--selector", "zone=mars")
    r = cli(server, "wait", "ok", "--timeout", "2", check=False)
    assert r.returncode == 18 and "no eligible node" in r.stderr and "labels do not match" in r.stderr
    r = cli(server, "wait", "ok", "--node", "n9", "--timeout", "1", check=False)
    assert r.returncode == 18 and "not placed on node n9" in r.stderr
    cli(server, "assign", "ok", "--nodes", "n0")
    assert cli(server, "wait", "ok", "--node", "n0", "--timeout", "60").stdout.strip() == "ok: ready on n0"

    # A dataset whose origin is gone by the time the node fetches it fails, and wait says so.
    other = tmp_path / "src2"
    origin2 = origin_factory(write_tree(other, {"x.bin": b"x" * (2 * BS)}))
    cli(server, "dataset", "add", "doomed", origin2.url)
    origin2.stop()
    cli(server, "assign", "doomed", "--nodes", "n0")
    r = cli(server, "wait", "doomed", "--timeout", "60", check=False)
    assert r.returncode == 15 and "n0:" in r.stderr and "x.bin" in r.stderr


def test_new_revision_rolls_out_while_a_reader_holds_the_old_file(tmp_path, origin_factory, server_factory,
                                                                 agent_factory):
    src = tmp_path / "src"
    old = dataset_files(4)
    origin = origin_factory(write_tree(src, old))
    server = server_factory()
    agents = agents_for(agent_factory, server, {"n0": {}, "n1": {}})
    wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 2, what="nodes")
    cli(server, "dataset", "add", "m", origin.url)
    cli(server, "assign", "m", "--nodes", "n0,n1")
    cli(server, "wait", "m", "--timeout", "60")
    rev1 = server.api("GET", "/v1/datasets/m").json()["revision"]

    reader = open(agents["n0"].mnt / "m" / "weights.bin", "rb")  # noqa: SIM115 (held across the update)
    try:
        first = reader.read(BS)
        new = random.Random(5).randbytes(3 * BS + 77)
        (src / "weights.bin").write_bytes(new)
        os.utime(src / "weights.bin", (time.time() + 5, time.time() + 5))
        r = cli(server, "dataset", "update", "m")
        rev2 = server.api("GET", "/v1/datasets/m").json()["revision"]
        assert rev2 != rev1, r.stdout
        cli(server, "wait", "m", "--timeout", "60")
        for a in agents.values():
            wait_until(lambda a=a: a.dataset("m")["revision"] == rev2, what="switch")
            assert (a.mnt / "m" / "weights.bin").read_bytes() == new
        # The open file still reads the snapshot it opened, to the end.
        assert first + reader.read() == old["weights.bin"]
    finally:
        reader.close()


def test_progressive_manifest_verifies_later_fetches_and_refuses_conflicts(tmp_path, origin_factory,
                                                                           server_factory, agent_factory):
    files = {"w.bin": random.Random(6).randbytes(2 * BS)}
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    a0 = agents_for(agent_factory, server, {"n0": {}})["n0"]
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="node")
    cli(server, "dataset", "add", "d", origin.url)
    snap = server.api("GET", "/v1/datasets/d").json()["snapshot"]
    fo = server.api("GET", f"/v1/snapshots/{snap}").json()["files"][0]["file_object"]
    # A liar reports ids for the file's blocks before anyone fetched them.
    forged = [[fo, 0, "0" * 64], [fo, 1, "1" * 64]]
    r = server.api("PUT", "/v1/nodes/liar/heartbeat", json={"capacity": 1, "free": 1, "blocks": forged})
    assert r.status_code == 200 and r.json()["refused_blocks"] == []
    cli(server, "assign", "d", "--nodes", "n0")
    r = cli(server, "wait", "d", "--timeout", "60", check=False)
    # The agent verified what the source sent against the cluster's manifest: mismatch, never served.
    assert r.returncode == 15 and "differ from the ones recorded" in r.stderr
    with pytest.raises(OSError):
        (a0.mnt / "d" / "w.bin").read_bytes()
    # A conflicting report for a recorded block is refused and logged.
    r = server.api("PUT", "/v1/nodes/liar/heartbeat", json={"capacity": 1, "free": 1,
                                                            "blocks": [[fo, 0, "2" * 64]]})
    assert r.json()["refused_blocks"] == [[fo, 0, "0" * 64]]
    assert "refused" in server.log()


def test_manifest_from_the_first_node_is_used_by_the_next(tmp_path, origin_factory, server_factory, agent_factory):
    files = dataset_files(7)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agents = agents_for(agent_factory, server, {"n0": {"r": "1"}, "n1": {"r": "2"}})
    wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 2, what="nodes")
    cli(server, "dataset", "add", "d", origin.url)
    cli(server, "assign", "d", "--nodes", "n0")
    cli(server, "wait", "d", "--timeout", "60")
    snap = server.api("GET", "/v1/snapshots/" + server.api("GET", "/v1/datasets/d").json()["snapshot"]).json()
    fos = [f["file_object"] for f in snap["files"]]
    wait_until(lambda: len(server.api("POST", "/v1/manifest", json={"file_objects": fos}).json()["blocks"]) == 3,
               what="block ids reported")
    cli(server, "assign", "d", "--nodes", "n0,n1")
    cli(server, "wait", "d", "--timeout", "60")
    # n1 took the 6 block ids n0 reported and checked its own fetches against them.
    assert "learnt 6 block ids from the control plane" in agents["n1"].log()
    for rel, data in files.items():
        assert (agents["n1"].mnt / "d" / rel).read_bytes() == data


def test_agents_keep_working_while_the_control_plane_is_down(tmp_path, origin_factory, server_factory,
                                                             agent_factory):
    files = {"big.bin": random.Random(8).randbytes(40 * BS)}
    origin = origin_factory(write_tree(tmp_path / "src", files))
    origin.rate = 2 * 2**20  # slow enough to still be syncing when the control plane goes
    server = server_factory()
    agent = agents_for(agent_factory, server, {"n0": {}})["n0"]
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="node")
    cli(server, "dataset", "add", "d", origin.url)
    cli(server, "assign", "d", "--nodes", "n0")
    wait_until(lambda: any(d["name"] == "d" for d in agent.status()["datasets"]), what="assignment received")
    server.stop()
    origin.rate = None
    wait_until(lambda: agent.dataset("d")["state"] == "ready", timeout=60, what="prefetch without the server")
    assert (agent.mnt / "d" / "big.bin").read_bytes() == files["big.bin"]
    assert "unreachable" in agent.log()
    server.start()
    cli(server, "wait", "d", "--node", "n0", "--timeout", "30")  # the agent caught up with its report


def test_bad_api_input_gets_4xx_with_a_message(tmp_path, origin_factory, server_factory):
    origin = origin_factory(write_tree(tmp_path / "src", {"a": b"a"}))
    server = server_factory()
    assert server.api("POST", "/v1/datasets", json={"name": "ok", "uri": origin.url}).status_code == 201
    cases = [
        ("POST", "/v1/datasets", {"content": b"{not json"}, 400),
        ("POST", "/v1/datasets", {"json": []}, 400),
        ("POST", "/v1/datasets", {"json": {"name": 5, "uri": origin.url}}, 400),
        ("POST", "/v1/datasets", {"json": {"name": "../etc", "uri": origin.url}}, 400),
        ("POST", "/v1/datasets", {"json": {"name": "x", "uri": "gopher://h/x"}}, 400),
        ("POST", "/v1/datasets", {"json": {"name": "x", "uri": "s3://"}}, 400),
        ("POST", "/v1/datasets", {"json": {"name": "x", "uri": origin.url + "nope/"}}, 404),
        ("POST", "/v1/datasets", {"json": {"name": "ok", "uri": origin.url}}, 400),  # exists
        ("POST", "/v1/datasets", {"content": b"{" + b" " * (17 * 2**20) + b"}"}, 413),
        ("GET", "/v1/datasets/unknown", {}, 404),
        ("DELETE", "/v1/datasets/unknown", {}, 404),
        ("PUT", "/v1/datasets/unknown/assignment", {"json": {"nodes": ["a"]}}, 404),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"selector": "gpu"}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"selector": "gpu=h100", "replicas": "two"}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"selector": "gpu=h100", "replicas": 0}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"selector": "gpu=h100", "nodes": ["a"]}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"selector": "g!=x"}}, 400),
        ("PUT", "/v1/datasets/ok/assignment", {"json": {"nodes": ["a/b"]}}, 400),
        ("POST", "/v1/datasets/ok/update", {"json": {"revision": "v2"}}, 400),  # http has no revisions
        ("PUT", "/v1/nodes/n1/heartbeat", {"json": {"capacity": -1}}, 400),
        ("PUT", "/v1/nodes/n1/heartbeat", {"json": {"datasets": {"ok": {"state": "bogus"}}}}, 400),
        ("PUT", "/v1/nodes/n1/heartbeat", {"json": {"holdings": {"s": "!!not base64"}}}, 400),
        ("PUT", "/v1/nodes/n1/heartbeat", {"json": {"blocks": [["fo", "zero", "id"]]}}, 400),
        ("PUT", "/v1/nodes/n1/heartbeat", {"json": {"labels": ["a"]}}, 400),
        ("PUT", "/v1/nodes/bad%20name/heartbeat", {"json": {}}, 400),
        ("GET", "/v1/snapshots/nope", {}, 404),
        ("GET", "/v1/datasets/ok/wait?timeout=abc", {}, 400),
        ("GET", "/v1/nodes/n1/desired?version=new", {}, 400),
        ("GET", "/v1/nodes/n1/desired?timeout=soon", {}, 400),
        ("GET", "/v1/nodes/bad%20name/desired", {}, 400),
        ("POST", "/v1/manifest", {"json": {"file_objects": "x"}}, 400),
    ]
    for method, path, kw, want in cases:
        r = server.api(method, path, **kw)
        assert r.status_code == want, (method, path, r.status_code, r.text[:200])
        body = r.json()
        assert body["message"] and body["error"], body
    assert server.api("GET", "/v1/datasets/ok").status_code == 200
    assert server.api("GET", "/v1/nodes").json()["nodes"] == [], "a refused heartbeat registered nothing"
    metrics = server.api("GET", "/metrics").text
    assert "syncbit_server_heartbeat_seconds_count" in metrics and "syncbit_server_datasets 1.0" in metrics


def test_agent_metrics_over_tcp_and_the_local_socket(tmp_path, origin_factory, agent_factory):
    import httpx

    from tests.conftest import _free_port

    files = dataset_files(9)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    port = _free_port()
    agent = agent_factory(block_size=BS, metrics_listen=f"127.0.0.1:{port}")
    agent.cli("pull", origin.url, "--name", "d")
    for rel in files:
        (agent.mnt / "d" / rel).read_bytes()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    total = sum(map(len, files.values()))
    assert values['syncbit_agent_bytes_total{origin="source"}'] == total
    assert values['syncbit_agent_bytes_total{origin="cache"}'] >= total
    assert values['syncbit_agent_dataset_bytes{dataset="d",kind="cached"}'] == total
    assert values["syncbit_agent_block_fetch_seconds_count{origin=\"source\"}"] == 6
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.sock))) as c:
        assert "syncbit_agent_cache_bytes" in c.get("http://agent/metrics").text
    # Only /metrics and the probes on the TCP port: the API that registers datasets stays on the socket.
    assert httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=10).status_code == 404
    # The kubelet's probes: alive, and ready because the mount is in the mount table.
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).text == "ok\n"
    r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    # The mount gone from under the agent (lazy unmount): not ready, while still alive.
    subprocess.run(["umount", "-l", str(agent.mnt)], check=True)
    r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert r.status_code == 503 and "not mounted" in r.text
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def test_switch_now_makes_a_new_snapshot_current_before_it_is_complete(tmp_path, origin_factory, server_factory,
                                                                      agent_factory):
    src = tmp_path / "src"
    origin = origin_factory(write_tree(src, {"f.bin": b"1" * (8 * BS)}))
    server = server_factory()
    agent = agents_for(agent_factory, server, {"n0": {}})["n0"]
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="node")
    cli(server, "dataset", "add", "d", origin.url)
    cli(server, "assign", "d", "--nodes", "n0", "--switch-now")
    cli(server, "wait", "d", "--timeout", "60")
    (src / "f.bin").write_bytes(b"2" * (8 * BS))
    os.utime(src / "f.bin", (time.time() + 5, time.time() + 5))
    origin.rate = 256 * 1024  # 8 s for the new file: the switch must not wait for it
    cli(server, "dataset", "update", "d")
    rev2 = server.api("GET", "/v1/datasets/d").json()["revision"]
    wait_until(lambda: agent.dataset("d")["revision"] == rev2, timeout=5, what="immediate switch")
    assert agent.dataset("d")["state"] == "syncing"
    with open(agent.mnt / "d" / "f.bin", "rb") as f:  # a lazy read of the new snapshot, at once
        assert f.read(10) == b"2" * 10
    origin.rate = None
    cli(server, "wait", "d", "--timeout", "60")


def test_wait_on_the_local_agent_as_an_init_container_would(tmp_path, origin_factory, server_factory, agent_factory):
    """`syncbit wait NAME --local` against the node's agent socket: it waits through an agent that is
    not running yet and a dataset not assigned yet, exits 0 when ready, 18 on timeout, 15 on failure."""
    files = dataset_files(4)
    origin = origin_factory(write_tree(tmp_path / "src", files))
    server = server_factory()
    agent = agent_factory("n0", start=False, node_name="n0", server=server.url, heartbeat_interval="0.5s",
                          block_size=BS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBIT_")}
    env["SYNCBIT_SOCKET"] = str(agent.sock)  # what a pod gets through the hostPath of the socket directory

    def local_wait(*args):
        return subprocess.Popen([sys.executable, "-m", "syncbit", "wait", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # Nothing is running yet: a short wait times out and says why.
    r = local_wait("llama", "--timeout", "1")
    out, err = r.communicate(timeout=30)
    assert r.returncode == 18 and "no agent is listening" in err, (r.returncode, err)
    # The pod's init container starts first; the agent comes up, then the assignment, then the data.
    waiter = local_wait("llama", "--timeout", "90")
    time.sleep(1.5)
    assert waiter.poll() is None
    agent.start()
    time.sleep(1.5)
    assert waiter.poll() is None  # running agent, no such dataset yet: still waiting
    cli(server, "dataset", "add", "llama", origin.url)
    cli(server, "assign", "llama", "--nodes", "n0")
    out, err = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, err
    assert "llama: ready on this node" in out
    assert (agent.mnt / "llama" / "weights.bin").read_bytes() == files["weights.bin"]
    # --local wins over SYNCBIT_SERVER; --node needs the control plane.
    r = subprocess.run([sys.executable, "-m", "syncbit", "wait", "llama", "--local", "--node", "n0"],
                       env={**env, "SYNCBIT_SERVER": server.url}, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--node needs the control plane" in r.stderr
    # A dataset that fails on this node: the wait fails at once with the reason.
    (tmp_path / "src" / "other.bin").write_bytes(random.Random(9).randbytes(BS))
    cli(server, "dataset", "add", "broken", origin.url + "other.bin")
    (tmp_path / "src" / "other.bin").write_bytes(b"changed under the pinned snapshot")
    cli(server, "assign", "broken", "--nodes", "n0")
    r = local_wait("broken", "--timeout", "60")
    out, err = r.communicate(timeout=90)
    assert r.returncode == 15 and "failed on this node" in err, (r.returncode, err)


def test_desired_state_is_long_polled_and_answers_at_once_when_an_assignment_changes(tmp_path, origin_factory,
                                                                                      server_factory):
    import threading

    origin = origin_factory(write_tree(tmp_path / "src", {"a": b"a"}))
    server = server_factory()
    server.api("PUT", "/v1/nodes/n1/heartbeat", json={"labels": {}, "free": 10**12})
    server.api("POST", "/v1/datasets", json={"name": "d", "uri": origin.url})
    first = server.api("GET", "/v1/nodes/n1/desired").json()  # no version: the answer now
    assert first["desired"] == [] and isinstance(first["version"], int) and first["epoch"]
    # Nothing changes: held until the timeout (spread over its second half), then the same version.
    t = time.monotonic()
    same = server.api("GET", f"/v1/nodes/n1/desired?version={first['version']}&timeout=2").json()
    assert same == {"version": first["version"], "epoch": first["epoch"], "unchanged": True}
    assert time.monotonic() - t >= 0.95
    # A change for other nodes (another dataset, assigned elsewhere) bumps the version but leaves
    # n1's list as it was: the poll stays held.
    server.api("POST", "/v1/datasets", json={"name": "other", "uri": origin.url})
    server.api("PUT", "/v1/datasets/other/assignment", json={"nodes": ["n9"]})
    t = time.monotonic()
    held = server.api("GET", f"/v1/nodes/n1/desired?version={first['version']}&timeout=2").json()
    assert held["unchanged"] and held["version"] > first["version"] and time.monotonic() - t >= 0.95
    # An assignment made while the poll is held answers it at once.
    got = {}

    def poll():
        t0 = time.monotonic()
        got["answer"] = server.api("GET", f"/v1/nodes/n1/desired?version={first['version']}&timeout=30").json()
        got["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    assert "answer" not in got
    server.api("PUT", "/v1/datasets/d/assignment", json={"nodes": ["n1"]})
    thread.join(10)
    assert [d["dataset"] for d in got["answer"]["desired"]] == ["d"]
    assert got["answer"]["version"] > first["version"] and got["seconds"] < 5


def test_an_assignment_reaches_an_agent_at_once_not_at_its_next_heartbeat(tmp_path, origin_factory, server_factory,
                                                                         agent_factory):
    origin = origin_factory(write_tree(tmp_path / "src", {"a.bin": b"abc" * 1000}))
    server = server_factory(heartbeat_interval="60s")  # what agents are told: the next beat is a minute away
    agent = agent_factory("n1", node_name="n1", server=server.url, heartbeat_interval="60s", block_size=BS)
    wait_until(lambda: server.api("GET", "/v1/nodes").json()["nodes"], what="the agent's first heartbeat")
    server.api("POST", "/v1/datasets", json={"name": "d", "uri": origin.url})
    time.sleep(1.0)  # the agent's long poll is now held by the server
    server.api("PUT", "/v1/datasets/d/assignment", json={"nodes": ["n1"]})
    # From the long poll, not from the heartbeat a minute later.
    wait_until(lambda: (agent.mnt / "d" / "a.bin").exists(), timeout=15, what="the dataset in the mount")
    assert (agent.mnt / "d" / "a.bin").read_bytes() == b"abc" * 1000
