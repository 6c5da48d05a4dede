"""Kubernetes mode end to end: a real server and real agents against the API server emulator.

The emulator (tests/servers/kube.py) stands in for the cluster: Nodes and Pods
are real objects there, and every change the controller makes is a stored
version, so the tests assert exact objects and whole label histories. The
webhook is called over HTTPS with the CA the server patched into its
MutatingWebhookConfiguration, as the API server would; its JSON Patch is
applied and the pod created. The test plays the scheduler (``bind``) and the
kubelet (pod phase); everything else is Syncbit.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import subprocess
import sys
import time

import httpx
import jsonpatch
import pytest

from tests.conftest import _free_port, write_tree
from tests.integration.test_control_plane import (
    agents_for,
    cli,
    dataset_files,
    placed,
    wait_until,
)
from tests.servers.proxy import FaultProxy

WEBHOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
LABEL = "dataset.syncbit.io/llama"
TAINT = {"key": "syncbit.io/syncing", "value": "true", "effect": "NoSchedule"}


def node(name, labels):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]}}


def pod(name, datasets, **spec):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ml", "annotations": {"syncbit.io/datasets": datasets}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm:1", "args": ["--model", "/datasets/llama"]}],
                     **spec}}


def admit(webhook_url: str, ca_pem: bytes, obj: dict) -> dict:
    """What the API server does: send the AdmissionReview over TLS to the webhook, apply its patch."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "uid-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "operation": "CREATE", "namespace": obj["metadata"]["namespace"], "object": obj}}
    r = httpx.post(webhook_url, json=review, verify=ctx, timeout=10)
    r.raise_for_status()
    resp = r.json()["response"]
    assert resp["uid"] == "uid-1"
    if not resp["allowed"]:
        raise PermissionError(resp["status"]["message"])
    return jsonpatch.apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))


def condition(p):
    return next((c for c in (p.get("status") or {}).get("conditions") or []
                 if c["type"] == "syncbit.io/datasets-ready"), None)


def events_for(kube, name):
    return [(e["reason"], e["message"]) for e in kube.list("events", "ml")
            if e["involvedObject"]["name"] == name]


def _heartbeats(server) -> float:
    for line in server.api("GET", "/metrics").text.splitlines():
        if line.startswith("syncbit_server_heartbeat_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def labels_over_time(kube, name):
    return [None if v is None else {k: val for k, val in v.items() if k.startswith("dataset.syncbit.io/")}
            for v in kube.label_history("nodes", name)]


@pytest.fixture
def cluster(tmp_path, kube_emulator, server_factory, agent_factory, origin_factory):
    kube = kube_emulator
    kube.create(node("n0", {"gpu": "h100"}))
    kube.create(node("n1", {"gpu": "a10"}))
    wport = _free_port()
    kube.create({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                 "metadata": {"name": "syncbit"},
                 "webhooks": [{"name": "pods.syncbit.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                               "clientConfig": {"url": f"https://127.0.0.1:{wport}/mutate-pods"}}]},
                resource=WEBHOOKS)
    server = server_factory(node_down_after="60s", kubernetes={
        "enabled": True, "kubeconfig": str(kube.kubeconfig), "webhook_listen": f"127.0.0.1:{wport}",
        "webhook_dns_names": ["127.0.0.1"]})
    # The agents report no labels: what assignments select on comes from the Node objects.
    agents = agents_for(agent_factory, server, {"n0": {}, "n1": {}})
    wait_until(lambda: len(server.api("GET", "/v1/nodes").json()["nodes"]) == 2, what="2 nodes registered")
    files = dataset_files()
    origin = origin_factory(write_tree(tmp_path / "src", files))
    proxy = FaultProxy(origin.url).start()
    yield kube, server, agents, files, proxy, f"https://127.0.0.1:{wport}/mutate-pods"
    proxy.stop()


def test_labels_taint_gate_affinity_readiness_and_pinning(cluster):
    kube, server, agents, _, proxy, webhook_url = cluster
    wait_until(lambda: kube.get(WEBHOOKS, "syncbit")["webhooks"][0]["clientConfig"].get("caBundle"), what="the CA bundle patched")
    ca = base64.b64decode(kube.get(WEBHOOKS, "syncbit")["webhooks"][0]["clientConfig"]["caBundle"])

    # A pod that asks before the dataset exists: admitted, gated, and told why.
    early = admit(webhook_url, ca, pod("early", "llama"))
    assert early["spec"]["schedulingGates"] == [{"name": "syncbit.io/datasets"}]
    assert early["spec"]["readinessGates"] == [{"conditionType": "syncbit.io/datasets-ready"}]
    assert early["spec"]["volumes"] == [{"name": "syncbit-datasets",
                                         "hostPath": {"path": "/datasets", "type": "Directory"}}]
    assert early["spec"]["containers"][0]["volumeMounts"] == [{
        "name": "syncbit-datasets", "mountPath": "/datasets", "readOnly": True, "mountPropagation": "HostToContainer"}]
    kube.create(early)
    wait_until(lambda: condition(kube.get("pods", "early", "ml")), what="a condition on the gated pod")
    c = condition(kube.get("pods", "early", "ml"))
    assert c["status"] == "False" and c["message"] == "no node has the data yet: dataset llama is not known to the control plane"
    assert ("DatasetsNotReady", c["message"]) in events_for(kube, "early")
    with pytest.raises(PermissionError, match="invalid dataset name"):
        admit(webhook_url, ca, pod("bad", "llama,../x"))

    # Added and assigned by a Node label, tainted while it syncs (the source fails for now).
    cli(server, "dataset", "add", "llama", proxy.url)
    proxy.fail_next(10_000)
    cli(server, "assign", "llama", "--selector", "gpu=h100", "--taint-until-ready")
    assert placed(server, "llama") == {"n0"}
    wait_until(lambda: TAINT in kube.get("nodes", "n0")["spec"]["taints"], what="n0 tainted")
    assert kube.get("nodes", "n0")["spec"]["taints"][0]["key"] == "nvidia.com/gpu", "other taints kept"
    assert TAINT not in kube.get("nodes", "n1")["spec"]["taints"]
    wait_until(lambda: "not ready on n0" in (condition(kube.get("pods", "early", "ml")) or {}).get("message", ""),
               what="the condition follows the dataset's state")
    assert kube.get("pods", "early", "ml")["spec"]["schedulingGates"], "still gated: no node has the data"

    # The source recovers: n0 completes, is labelled, loses the taint; the gate is lifted.
    proxy.clear_faults()
    cli(server, "wait", "llama", "--timeout", "60")
    wait_until(lambda: kube.get("nodes", "n0")["metadata"]["labels"].get(LABEL) == "ready", what="n0 labelled")
    wait_until(lambda: TAINT not in kube.get("nodes", "n0")["spec"]["taints"], what="n0 untainted")
    assert LABEL not in kube.get("nodes", "n1")["metadata"]["labels"]
    wait_until(lambda: not kube.get("pods", "early", "ml")["spec"].get("schedulingGates"), what="gate lifted")
    spec = kube.get("pods", "early", "ml")["spec"]
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] \
        == [{"matchExpressions": [{"key": LABEL, "operator": "In", "values": ["ready"]}]}]
    assert ("DatasetsPlaced", "llama ready on 1 node(s): scheduling gate lifted") in events_for(kube, "early")

    # The scheduler binds it, the kubelet runs it: the readiness condition turns True.
    kube.bind("early", "ml", "n0")
    kube.patch("pods", "early", {"status": {"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, *kube.get("pods", "early", "ml")["status"]["conditions"]]}},
        "ml", subresource="status")
    wait_until(lambda: condition(kube.get("pods", "early", "ml"))["status"] == "True", what="condition True")
    p = kube.get("pods", "early", "ml")
    assert condition(p)["message"] == "llama complete on node n0"
    assert {c["type"] for c in p["status"]["conditions"]} == {"PodScheduled", "syncbit.io/datasets-ready"}

    # Unassigned while the pod runs on n0: the label goes, the data stays pinned there.
    cli(server, "unassign", "llama")
    wait_until(lambda: LABEL not in kube.get("nodes", "n0")["metadata"]["labels"], what="label removed")
    wait_until(lambda: agents["n0"].dataset("llama")["held"], what="held for the running pod")
    assert agents["n0"].dataset("llama")["pinned"]
    wait_until(lambda: condition(kube.get("pods", "early", "ml"))["status"] == "False", what="not ready any more")
    kube.delete("pods", "early", "ml")
    wait_until(lambda: not agents["n0"].dataset("llama")["pinned"], what="unpinned after the pod is gone")
    # One label, set once and removed once; the taint on and off once.
    assert [h for i, h in enumerate(labels_over_time(kube, "n0")) if i == 0 or h != labels_over_time(kube, "n0")[i - 1]] \
        == [{}, {LABEL: "ready"}, {}]
    taints = [TAINT in (v or {}).get("spec", {}).get("taints", []) for v in kube.history("nodes", "n0")]
    assert [t for i, t in enumerate(taints) if i == 0 or t != taints[i - 1]] == [False, True, False]


def test_restarts_of_agent_and_server_do_not_flap_labels(cluster):
    kube, server, agents, _, proxy, _ = cluster
    cli(server, "dataset", "add", "llama", proxy.url)
    cli(server, "assign", "llama", "--selector", "gpu=h100")
    cli(server, "wait", "llama", "--timeout", "60")
    wait_until(lambda: kube.get("nodes", "n0")["metadata"]["labels"].get(LABEL) == "ready", what="n0 labelled")
    versions = len(kube.history("nodes", "n0"))

    agents["n0"].stop()
    agents["n0"].start()
    cli(server, "wait", "llama", "--node", "n0", "--timeout", "30")
    server.stop()
    server.start()
    # The restarted server has heard from nobody yet, then hears from both nodes again
    # (its heartbeat counter starts from zero; each node beats every 0.5 s).
    wait_until(lambda: _heartbeats(server) >= 8, what="heartbeats to the restarted server", timeout=30)
    time.sleep(3)  # several reconciles
    history = kube.history("nodes", "n0")
    assert len(history) == versions, [v["metadata"]["labels"] for v in history[versions:]]
    assert kube.get("nodes", "n0")["metadata"]["labels"][LABEL] == "ready"
    # And the scheduler still sees the Node's labels after the restart.
    assert placed(server, "llama") == {"n0"}


_POD_READER = r"""
import errno, sys, time
path, deadline = sys.argv[1], time.monotonic() + 90
last = None
while time.monotonic() < deadline:
    try:
        with open(path, "rb") as f:
            state = f"ok {len(f.read())}"
    except OSError as e:
        state = f"err {errno.errorcode.get(e.errno, e.errno)}"
    if state != last:
        print(state, flush=True)
        last = state
    time.sleep(0.05)
"""


def test_a_pods_view_of_the_mount_comes_back_after_an_agent_crash(tmp_path, origin_factory, agent_factory):
    """The DaemonSet's Bidirectional hostPath and a pod's HostToContainer mount, as mount namespaces.

    The host side is a shared mount (what Bidirectional makes); the pod is a
    process in its own mount namespace whose mounts are slaves of the host's
    (what HostToContainer makes). After ``kill -9`` of the agent the pod sees
    "Transport endpoint is not connected"; the next agent removes the stale
    mount and mounts again, and the pod reads again without being restarted.
    """
    files = dataset_files()
    origin = origin_factory(write_tree(tmp_path / "src", files))
    agent = agent_factory(start=False)
    agent.mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(agent.mnt), str(agent.mnt)], check=True)
    subprocess.run(["mount", "--make-shared", str(agent.mnt)], check=True)
    pod = None
    try:
        agent.start()
        agent.cli("pull", origin.url, "--name", "llama")
        target = agent.mnt / "llama" / "weights.bin"
        pod = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", sys.executable, "-c", _POD_READER,
                                str(target)], stdout=subprocess.PIPE, text=True)
        seen: list[str] = []

        def next_state(want: str, timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = pod.stdout.readline().strip()
                seen.append(line)
                if line.startswith(want):
                    return
            raise AssertionError(f"pod never saw {want!r}: {seen}")

        size = len(files["weights.bin"])
        next_state(f"ok {size}")
        agent.stop(signal.SIGKILL)
        next_state("err ENOTCONN")
        agent.start()
        next_state(f"ok {size}")
        assert "stale mount" in agent.log().lower(), agent.log()[-2000:]
    finally:
        if pod is not None:
            pod.kill()
            pod.wait()
            pod.stdout.close()
        agent.stop()
        subprocess.run(["umount", "-l", str(agent.mnt)], capture_output=True)
