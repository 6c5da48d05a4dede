"""KubeController in process: a real ControlPlane on a real Store, a real KubeClient, the API server emulator.

The control plane is driven as the agents drive it (``cp.heartbeat`` bodies
with dataset reports, as in test_controlplane_kubernetes.py); a liveness task
runs ``check_liveness`` as the server does. The emulator (tests/servers/kube.py)
plays the cluster: the tests assert the exact objects it stores, every stored
version of them (``history``) and what the controller sent (``requests``).

``RESYNC`` is 0.25 s here (10 s in the server) and ``SETTLE`` 0.02 s, so that
"N more reconciles" is quick to wait for; the tests that are about the
controller reacting to a change at once (and not at the next resync) set a
long ``RESYNC`` themselves.
"""

from __future__ import annotations

import base64
import logging

import pytest
import trio

from syncbit.config import KubernetesConfig
from syncbit.k8s import controller as controller_module
from syncbit.k8s.client import KubeClient
from syncbit.k8s.controller import KubeController
from syncbit.server.controlplane import ControlPlane
from syncbit.server.scheduler import Assignment
from syncbit.server.store import Store

SIZE = 10_000
LABEL_A = "dataset.syncbit.io/a"
LABEL_B = "dataset.syncbit.io/b"
TAINT = {"key": "syncbit.io/syncing", "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
GATE = {"name": "syncbit.io/datasets"}
CONDITION = "syncbit.io/datasets-ready"
WEBHOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


# -- objects --

def node(name: str, labels: dict | None = None, taints: list | None = None) -> dict:
    obj = {"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}}
    if taints is not None:
        obj["spec"] = {"taints": taints}
    return obj


def pod(name: str, datasets: str, *, gated: bool = True, node_name: str | None = None, phase: str = "Pending",
        affinity: dict | None = None, conditions: list | None = None, readiness: bool = True,
        namespace: str = "ml") -> dict:
    """A pod as the webhook leaves it (gate and readiness gate), or already bound (``node_name``)."""
    spec: dict = {"containers": [{"name": "main", "image": "vllm:1"}]}
    if readiness:
        spec["readinessGates"] = [{"conditionType": CONDITION}]
    if gated:
        spec["schedulingGates"] = [dict(GATE)]
    if node_name:
        spec["nodeName"] = node_name
    if affinity:
        spec["affinity"] = affinity
    status: dict = {"phase": phase}
    if conditions:
        status["conditions"] = conditions
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": {"syncbit.io/datasets": datasets}},
            "spec": spec, "status": status}


def dataset_labels(obj: dict | None) -> dict | None:
    if obj is None:
        return None
    return {k: v for k, v in (obj["metadata"].get("labels") or {}).items() if k.startswith("dataset.syncbit.io/")}


def taints(obj: dict) -> list:
    return (obj.get("spec") or {}).get("taints") or []


def condition(obj: dict) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == CONDITION), None)


def affinity_terms(obj: dict) -> list:
    return obj["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]


def changes(values: list) -> list:
    """``values`` without consecutive repeats: what an observer of one field saw change."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def requirement(label: str) -> dict:
    return {"key": label, "operator": "In", "values": ["ready"]}


# -- the rig --

class Rig:
    """A store, control planes on it (``restart_plane``), controllers on them (``start``), and the emulator."""

    def __init__(self, tmp_path, kube, nursery: trio.Nursery) -> None:
        self.tmp_path = tmp_path
        self.kube = kube
        self.nursery = nursery
        self.store = Store(tmp_path / "server.db")
        self.cp = ControlPlane(self.store)
        self.clients: list[KubeClient] = []
        self._scopes: dict[int, trio.CancelScope] = {}  # id(controller) -> the scope it runs in

    async def add_datasets(self, *names: str) -> None:
        for name in names:
            src = self.tmp_path / f"src-{name}"
            src.mkdir()
            (src / "w.bin").write_bytes(name.encode() * SIZE)
            await self.cp.add_dataset(name, src.as_uri())

    def beat(self, name: str, labels: dict | None = None, **datasets: str | tuple[str, bool]) -> dict:
        """A heartbeat from the agent on ``name``: ``a="ready"`` or ``a=("syncing", True)`` (state, complete)."""
        reports = {}
        for ds, st in datasets.items():
            state, complete = st if isinstance(st, tuple) else (st, None)
            rep = {"snapshot": self.cp.store.dataset(ds)["snapshot"], "state": state,
                   "bytes_cached": SIZE if state == "ready" else 0, "bytes_total": SIZE}
            if complete is not None:
                rep["complete"] = complete
            reports[ds] = rep
        return self.cp.heartbeat(name, {"labels": labels or {}, "free": 10**9, "datasets": reports})

    def restart_plane(self) -> ControlPlane:
        """What a server restart does to the control plane: a new one on the same store."""
        self.cp.flush()
        self.cp = ControlPlane(self.store)
        self.cp.hold_placements(True)  # as server.py does in Kubernetes mode, until the Nodes are listed
        return self.cp

    async def start(self, webhook_ca: bytes | None = None) -> KubeController:
        """A controller on the current control plane, with its own client, started as the server starts it."""
        client = await KubeClient.connect(str(self.kube.kubeconfig))
        client.backoff_initial, client.backoff_max = 0.05, 0.5
        self.clients.append(client)
        ctl = KubeController(self.cp, KubernetesConfig(enabled=True), client, webhook_ca=webhook_ca)
        scope = self._scopes[id(ctl)] = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await ctl.run(task_status=task_status)

        await self.nursery.start(run)
        await until(lambda: ctl.reconciles > 0, "the controller's first reconcile")
        return ctl

    def stop(self, ctl: KubeController) -> None:
        self._scopes.pop(id(ctl)).cancel()

    async def liveness(self) -> None:
        """As the server's liveness loop: reschedules asked for by heartbeats and Node labels, marks nodes down."""
        while True:
            self.cp.check_liveness()
            await trio.sleep(0.02)


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not within {timeout} s: {what}")


async def reconciles(ctl: KubeController, count: int, timeout: float = 5.0) -> None:
    """Wait until the controller has reconciled ``count`` more times."""
    target = ctl.reconciles + count
    await until(lambda: ctl.reconciles >= target, f"{count} reconciles", timeout)


@pytest.fixture
async def rig(tmp_path, kube_emulator, monkeypatch):
    monkeypatch.setattr(controller_module, "RESYNC", 0.25)
    monkeypatch.setattr(controller_module, "SETTLE", 0.02)
    async with trio.open_nursery() as nursery:
        r = Rig(tmp_path, kube_emulator, nursery)
        nursery.start_soon(r.liveness)
        yield r
        nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        for client in r.clients:
            await client.aclose()
    r.store.close()


# -- Node labels --

async def test_labels_on_ready_nodes_only_and_stale_ones_removed(rig):
    kube = rig.kube
    await rig.add_datasets("a", "b")
    kube.create(node("n1", {"zone": "z1", LABEL_B: "ready"}))  # b is not ready on n1 (any more)
    kube.create(node("n2", {"zone": "z2"}))
    # No agent has ever run here: whatever dataset label it has is stale, the rest is not ours.
    kube.create(node("n3", {"zone": "z3", LABEL_A: "ready", "dataset.syncbit.io/gone": "ready"},
                     taints=[GPU_TAINT, TAINT]))
    rig.beat("n1")
    rig.beat("n2")
    rig.beat("n4")  # an agent whose node has no Node object: nothing is created for it
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n2", "n4")))
    rig.cp.assign("b", Assignment("b", nodes=("n1",)))
    rig.beat("n1", a="ready", b="syncing")
    rig.beat("n2", a="syncing")
    rig.beat("n4", a="ready")

    ctl = await rig.start()
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")
    await until(lambda: dataset_labels(kube.get("nodes", "n3")) == {}, "n3's stale labels removed")
    await reconciles(ctl, 2)
    assert kube.get("nodes", "n1")["metadata"]["labels"] == {"kubernetes.io/hostname": "n1", "zone": "z1",
                                                             LABEL_A: "ready"}
    assert kube.get("nodes", "n2")["metadata"]["labels"] == {"kubernetes.io/hostname": "n2", "zone": "z2"}
    assert kube.get("nodes", "n3")["metadata"]["labels"] == {"kubernetes.io/hostname": "n3", "zone": "z3"}
    assert taints(kube.get("nodes", "n3")) == [GPU_TAINT], "our stale taint removed, the other kept"
    assert kube.get("nodes", "n4") is None
    # One write each where something changed (adding a and removing b in the same one), none elsewhere.
    assert [dataset_labels(v) for v in kube.history("nodes", "n1")] == [{LABEL_B: "ready"}, {LABEL_A: "ready"}]
    assert len(kube.history("nodes", "n2")) == 1
    assert len(kube.history("nodes", "n3")) == 2
    [sent] = kube.requests("PATCH", r"/nodes/n3$")
    assert sent["body"] == {"metadata": {"labels": {LABEL_A: None, "dataset.syncbit.io/gone": None},
                                         "resourceVersion": kube.history("nodes", "n3")[0]["metadata"][
                                             "resourceVersion"]},
                            "spec": {"taints": [GPU_TAINT]}}

    # b completes on n1, a stops being complete on n1 (a new snapshot not yet there): labels follow.
    rig.beat("n1", a=("syncing", False), b="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_B: "ready"}, "n1 relabelled")
    # A Node object that appears later is labelled as soon as it is seen.
    kube.create(node("n4", {"zone": "z4"}))
    await until(lambda: dataset_labels(kube.get("nodes", "n4")) == {LABEL_A: "ready"}, "n4 labelled")
    assert kube.get("nodes", "n4")["metadata"]["labels"]["zone"] == "z4"


async def test_unheard_node_keeps_its_label_across_a_server_restart_until_it_reports(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    for n in ("n1", "n2", "n3"):
        kube.create(node(n))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n2", "n3")))
    rig.beat("n1", a="ready")
    rig.beat("n2", a=("syncing", True))  # staging a new snapshot while it serves the complete old one
    rig.beat("n3", a="ready")
    ctl = await rig.start()
    for n in ("n1", "n2", "n3"):
        await until(lambda n=n: dataset_labels(kube.get("nodes", n)) == {LABEL_A: "ready"}, f"{n} labelled")
    versions = {n: len(kube.history("nodes", n)) for n in ("n1", "n2", "n3")}

    # The server restarts: a new control plane on the same store, which has heard from nobody yet.
    rig.stop(ctl)
    cp = rig.restart_plane()
    assert cp.node_datasets()["n2"] == {"ready": set(), "tainting": set(), "up": True, "heard": False}
    ctl = await rig.start()
    await reconciles(ctl, 3)
    assert {n: len(kube.history("nodes", n)) for n in versions} == versions, "nothing written"

    # n1 reports what it had: nothing changes. n2 reports its new snapshot incomplete and the old one
    # gone: it loses the label. n3 never reports and goes down: it loses it too.
    rig.beat("n1", a="ready")
    rig.beat("n2", a=("syncing", False))
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {}, "n2 unlabelled")
    await reconciles(ctl, 2)
    assert dataset_labels(kube.get("nodes", "n3")) == {LABEL_A: "ready"}, "unheard and not down: kept"
    cp.live["n3"].last_seen -= 3600
    await until(lambda: dataset_labels(kube.get("nodes", "n3")) == {}, "n3 (down) unlabelled")
    assert [dataset_labels(v) for v in kube.history("nodes", "n1")] == [{}, {LABEL_A: "ready"}]
    assert [dataset_labels(v) for v in kube.history("nodes", "n2")] == [{}, {LABEL_A: "ready"}, {}]
    assert [dataset_labels(v) for v in kube.history("nodes", "n3")] == [{}, {LABEL_A: "ready"}, {}]


async def test_down_node_loses_its_label_and_gets_it_back_when_up(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1", {"zone": "z1"}))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    rig.beat("n1", a="ready")
    await rig.start()
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")

    rig.cp.live["n1"].last_seen -= 3600  # no heartbeat for an hour: the liveness check marks it down
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {}, "n1 unlabelled")
    assert kube.get("nodes", "n1")["metadata"]["labels"]["zone"] == "z1"
    rig.beat("n1", a="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled again")
    assert [dataset_labels(v) for v in kube.history("nodes", "n1")] == [{}, {LABEL_A: "ready"}, {}, {LABEL_A: "ready"}]


# -- taints --

async def test_syncing_taint_until_ready_keeps_other_taints(rig):
    kube = rig.kube
    await rig.add_datasets("a", "b")
    kube.create(node("n1", taints=[GPU_TAINT]))
    kube.create(node("n2", taints=[GPU_TAINT]))
    rig.beat("n1")
    rig.beat("n2")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",), taint_until_ready=True))
    rig.cp.assign("b", Assignment("b", nodes=("n2",)))  # no taint option: n2 is never tainted
    rig.beat("n1", a="syncing")
    rig.beat("n2", b="syncing")
    ctl = await rig.start()
    await until(lambda: taints(kube.get("nodes", "n1")) == [GPU_TAINT, TAINT], "n1 tainted")

    rig.beat("n1", a="ready")
    await until(lambda: taints(kube.get("nodes", "n1")) == [GPU_TAINT], "n1 untainted")
    rig.beat("n2", b="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {LABEL_B: "ready"}, "n2 labelled")
    await reconciles(ctl, 2)
    history = kube.history("nodes", "n1")
    # On, then off together with the label: one write each.
    assert [(taints(v), dataset_labels(v)) for v in history] == [
        ([GPU_TAINT], {}), ([GPU_TAINT, TAINT], {}), ([GPU_TAINT], {LABEL_A: "ready"})]
    assert all(taints(v) == [GPU_TAINT] for v in kube.history("nodes", "n2"))
    # The taint list is replaced whole, so the write is conditional on the version it was computed from.
    for sent, before in zip(kube.requests("PATCH", r"/nodes/n1$"), history[:-1], strict=True):
        assert sent["body"]["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


# -- scheduling --

async def test_node_object_labels_drive_scheduling(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1", {"gpu": "a10"}))
    kube.create(node("n2", {"gpu": "h100"}))
    rig.beat("n1", labels={"role": "worker"})  # the agents know nothing about GPUs
    rig.beat("n2", labels={"role": "worker"})
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", selector={"gpu": "h100"}))
    assert rig.cp.dataset_view("a")["nodes"] == {}
    await rig.start()
    await until(lambda: set(rig.cp.dataset_view("a")["nodes"]) == {"n2"}, "placed by the Node label")
    assert [d["dataset"] for d in rig.cp.desired("n2")] == ["a"]
    view = {n["name"]: n["labels"] for n in rig.cp.nodes_view()}
    assert view["n2"] == {"role": "worker", "kubernetes.io/hostname": "n2", "gpu": "h100"}

    # The cluster's labels change: the placement follows; our own labels are not the Node's labels.
    rig.beat("n2", a="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {LABEL_A: "ready"}, "n2 labelled")
    assert "dataset.syncbit.io/a" not in {n["name"]: n["labels"] for n in rig.cp.nodes_view()}["n2"]
    kube.patch("nodes", "n1", {"metadata": {"labels": {"gpu": "h100"}}})
    kube.patch("nodes", "n2", {"metadata": {"labels": {"gpu": "a10"}}})
    await until(lambda: set(rig.cp.dataset_view("a")["nodes"]) == {"n1"}, "moved with the Node labels")
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {}, "n2 no longer holds it")
    # A Node that is deleted takes its labels out of scheduling.
    kube.delete("nodes", "n1")
    await until(lambda: rig.cp.dataset_view("a")["nodes"] == {}, "nothing matches any more")


# -- gated pods --

async def test_gated_pod_with_data_nowhere_stays_gated_with_one_event_per_message(rig, monkeypatch):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1"))
    rig.beat("n1")
    rig.cp.check_liveness()
    kube.create(pod("early", "a"))
    kube.create(pod("typo", "a,Not_A_Label!"))  # the webhook refuses these; one made before it was installed
    monkeypatch.setattr(controller_module, "RESYNC", 0.05)
    ctl = await rig.start()

    first = "no node has the data yet: dataset a is not placed on any node (not assigned to any node)"
    await until(lambda: condition(kube.get("pods", "early", "ml")) is not None, "a condition")
    p = kube.get("pods", "early", "ml")
    assert condition(p) == {"type": CONDITION, "status": "False", "reason": "DatasetsNotReady", "message": first,
                            "lastProbeTime": None, "lastTransitionTime": condition(p)["lastTransitionTime"]}
    await reconciles(ctl, 10)
    events = kube.list("events", "ml")
    assert sorted((e["involvedObject"]["name"], e["type"], e["reason"], e["message"]) for e in events) == [
        ("early", "Warning", "DatasetsNotReady", first),
        ("typo", "Warning", "InvalidDatasets", ("invalid dataset name 'Not_A_Label!': use at most 63 letters, "
                                                 "digits, '.', '_' and '-', starting and ending with a letter or "
                                                 "digit (it is also a Kubernetes label name)"))]
    assert len(kube.history("pods", "early", "ml")) == 2, "the condition written once"
    assert condition(kube.get("pods", "typo", "ml")) is None

    # The reason changes (placed, syncing): one more event, the condition follows; still gated.
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    rig.beat("n1", a="syncing")
    second = "no node has the data yet: not ready on n1 (syncing)"
    await until(lambda: condition(kube.get("pods", "early", "ml"))["message"] == second, "the new reason")
    await reconciles(ctl, 10)
    messages = [e["message"] for e in kube.list("events", "ml") if e["involvedObject"]["name"] == "early"]
    assert sorted(messages) == sorted([first, second])
    p = kube.get("pods", "early", "ml")
    assert p["spec"]["schedulingGates"] == [GATE] and "affinity" not in p["spec"]
    assert kube.requests("PATCH", r"/pods/early$") == [], "the pod itself is not written while gated"
    assert [(condition(v) or {}).get("message") for v in kube.history("pods", "early", "ml")] == [None, first, second]


async def test_gated_pod_released_when_one_node_has_every_dataset(rig):
    kube = rig.kube
    await rig.add_datasets("a", "b")
    for n in ("n1", "n2", "n3"):
        kube.create(node(n))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n3")))
    rig.cp.assign("b", Assignment("b", nodes=("n2", "n3")))
    rig.beat("n1", a="ready")
    rig.beat("n2", b="ready")
    rig.beat("n3", a="syncing", b="syncing")
    kube.create(pod("web", "a,b"))
    ctl = await rig.start()

    apart = "no node has all of a, b ready (a on n1; b on n2)"
    await until(lambda: (condition(kube.get("pods", "web", "ml")) or {}).get("message") == apart, "told why")
    await reconciles(ctl, 2)
    assert kube.get("pods", "web", "ml")["spec"]["schedulingGates"] == [GATE]
    assert [(e["reason"], e["message"]) for e in kube.list("events", "ml")] == [("DatasetsNotReady", apart)]
    told = kube.list("events", "ml")[0]["metadata"]["name"]

    rig.beat("n3", a="ready", b="ready")
    await until(lambda: not kube.get("pods", "web", "ml")["spec"].get("schedulingGates"), "gate lifted")
    spec = kube.get("pods", "web", "ml")["spec"]
    assert "schedulingGates" not in spec
    assert spec["affinity"] == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [requirement(LABEL_A), requirement(LABEL_B)]}]}}}
    assert spec["readinessGates"] == [{"conditionType": CONDITION}]
    # Affinity in and gate out in one write: no version has the gate without the affinity it needs.
    history = kube.history("pods", "web", "ml")
    assert [(bool(v["spec"].get("schedulingGates")), "affinity" in v["spec"]) for v in history][:3] == [
        (True, False), (True, False), (False, True)]
    [sent] = kube.requests("PATCH", r"/pods/web$")
    assert sent["body"] == {"spec": {"affinity": spec["affinity"], "schedulingGates": None},
                            "metadata": {"resourceVersion": history[1]["metadata"]["resourceVersion"]}}
    assert dataset_labels(kube.get("nodes", "n3")) == {LABEL_A: "ready", LABEL_B: "ready"}
    await reconciles(ctl, 2)
    assert [(e["reason"], e["message"]) for e in kube.list("events", "ml") if e["metadata"]["name"] != told] == [
        ("DatasetsPlaced", "a, b ready on 1 node(s): scheduling gate lifted")]
    # ... and the condition stops saying why it was gated (one more version, its status).
    history = kube.history("pods", "web", "ml")
    assert len(history) == 4 and history[3]["spec"] == history[2]["spec"]
    assert condition(history[3])["message"] == \
        "a, b ready on 1 node(s): scheduling gate lifted; waiting to be scheduled on one of them"


async def test_release_narrows_every_existing_affinity_term(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1", {"gpu": "h100"}))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    rig.beat("n1", a="ready")
    gpu = {"key": "gpu", "operator": "In", "values": ["h100"]}
    zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}
    preferred = [{"weight": 1, "preference": {"matchExpressions": [zone]}}]
    affinity = {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [gpu]}, {"matchExpressions": [zone], "matchFields": [
                {"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": preferred},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    kube.create(pod("web", "a", affinity=affinity))
    await rig.start()
    await until(lambda: not kube.get("pods", "web", "ml")["spec"].get("schedulingGates"), "gate lifted")
    spec = kube.get("pods", "web", "ml")["spec"]
    assert affinity_terms(kube.get("pods", "web", "ml")) == [
        {"matchExpressions": [gpu, requirement(LABEL_A)]},
        {"matchExpressions": [zone, requirement(LABEL_A)],
         "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]
    assert spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == preferred
    assert spec["affinity"]["podAntiAffinity"] == affinity["podAntiAffinity"]


# -- bound pods --

async def test_bound_pod_condition_follows_the_data_and_keeps_kubelet_conditions(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1"))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    rig.beat("n1", a="syncing")
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}
    not_ready = {"type": "Ready", "status": "False", "reason": "ReadinessGatesNotReady"}
    kube.create(pod("web", "a", gated=False, node_name="n1", phase="Running", conditions=[scheduled, not_ready]))
    ctl = await rig.start()

    def ours():
        return condition(kube.get("pods", "web", "ml")) or {}

    await until(lambda: ours().get("status") == "False", "condition False")
    assert (ours()["reason"], ours()["message"]) == ("DatasetsNotReady", "not ready on n1 (syncing)")
    rig.beat("n1", a="ready")
    await until(lambda: ours().get("status") == "True", "condition True")
    assert (ours()["reason"], ours()["message"]) == ("DatasetsReady", "a complete on node n1")
    assert kube.get("pods", "web", "ml")["status"]["conditions"][:2] == [scheduled, not_ready]
    became_true = ours()["lastTransitionTime"]

    # The kubelet sees the readiness gate pass and updates its own conditions; nothing of ours is written.
    await reconciles(ctl, 2)
    ready = {"type": "Ready", "status": "True"}
    kube.patch("pods", "web", {"status": {"conditions": [scheduled, ready, ours()]}}, "ml", subresource="status")
    await reconciles(ctl, 2)
    assert kube.get("pods", "web", "ml")["status"]["conditions"] == [scheduled, ready, ours()]

    # The data goes incomplete: False again, the kubelet's latest conditions kept.
    rig.beat("n1", a=("syncing", False))
    await until(lambda: ours().get("status") == "False", "condition False again")
    assert kube.get("pods", "web", "ml")["status"]["conditions"][:2] == [scheduled, ready]
    assert ours()["lastTransitionTime"] >= became_true
    assert changes([(condition(v) or {}).get("status") for v in kube.history("pods", "web", "ml")]) == [
        None, "False", "True", "False"]
    assert kube.get("pods", "web", "ml")["status"]["phase"] == "Running"
    # A pod without the readiness gate (made before the webhook was installed) gets no condition.
    kube.create(pod("plain", "a", gated=False, node_name="n1", phase="Running", readiness=False))
    await reconciles(ctl, 3)
    assert len(kube.history("pods", "plain", "ml")) == 1


async def test_running_pods_keep_their_datasets_in_use(rig):
    kube = rig.kube
    await rig.add_datasets("a", "b")
    for n in ("n1", "n2"):
        kube.create(node(n))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    kube.create(pod("job", "a", gated=False, node_name="n1", phase="Running"))
    kube.create(pod("svc", "a,b", gated=False, node_name="n2", phase="Running"))
    kube.create(pod("waiting", "b"))  # gated, on no node: uses nothing
    kube.create(pod("done", "b", gated=False, node_name="n1", phase="Succeeded"))
    await rig.start()
    await until(lambda: rig.cp.in_use == {"n1": {"a"}, "n2": {"a", "b"}}, "in use where pods run")

    # Unassigned while used: the agent on n1 keeps it (a keep entry in what it is told to hold).
    rig.cp.unassign("a")
    assert rig.cp.desired("n1") == [{"dataset": "a", "keep": True}]
    kube.patch("pods", "job", {"status": {"phase": "Succeeded"}}, "ml", subresource="status")
    await until(lambda: rig.cp.in_use == {"n2": {"a", "b"}}, "a finished pod uses nothing")
    assert rig.cp.desired("n1") == []
    kube.delete("pods", "svc", "ml")
    await until(lambda: rig.cp.in_use == {}, "a deleted pod uses nothing")


# -- the webhook's CA --

async def test_webhook_ca_is_set_once_its_configuration_exists(rig):
    kube = rig.kube
    ca = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    await rig.start(webhook_ca=ca)  # before the webhook manifest is applied: retried (after 1 s)
    await trio.sleep(0.1)
    kube.create({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                 "metadata": {"name": "syncbit"},
                 "webhooks": [{"name": "pods.syncbit.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                               "clientConfig": {"service": {"name": "syncbit-server", "namespace": "syncbit"}}}]},
                resource=WEBHOOKS)
    await until(lambda: kube.get(WEBHOOKS, "syncbit")["webhooks"][0]["clientConfig"].get("caBundle"), "CA set", 4)
    assert kube.get(WEBHOOKS, "syncbit")["webhooks"][0]["clientConfig"] == {
        "service": {"name": "syncbit-server", "namespace": "syncbit"}, "caBundle": base64.b64encode(ca).decode()}
    assert len(kube.history(WEBHOOKS, "syncbit")) == 2


# -- resilience --

async def test_refused_node_patch_is_retried_and_converges(rig, monkeypatch, caplog):
    kube = rig.kube
    monkeypatch.setattr(controller_module, "RESYNC", 0.2)
    await rig.add_datasets("a")
    kube.create(node("n1"))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    ctl = await rig.start()
    kube.fail(r"^/api/v1/nodes/n1$", 409, method="PATCH", count=2)
    rig.beat("n1", a="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled at last")
    await reconciles(ctl, 3)
    assert len(kube.requests("PATCH", r"^/api/v1/nodes/n1$")) == 3  # refused twice, then written once
    assert [dataset_labels(v) for v in kube.history("nodes", "n1")] == [{}, {LABEL_A: "ready"}]
    assert any(r.levelno == logging.WARNING and "node n1" in r.getMessage() and "409 Conflict" in r.getMessage()
               for r in caplog.records)


async def test_concurrent_taint_change_is_not_overwritten(rig):
    """Someone adds a taint between the controller's read and its write: 409, read again, both taints kept."""
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1", taints=[GPU_TAINT]))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",), taint_until_ready=True))
    rig.beat("n1", a="ready")
    ctl = await rig.start()
    await reconciles(ctl, 1)
    drain = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    original = ctl.client.patch_node
    raced = []

    async def racing_patch(name, patch):
        if not raced:  # the operator cordons the node just before the controller's write lands
            raced.append(kube.patch("nodes", name, {"spec": {"taints": [GPU_TAINT, drain]}}))
        return await original(name, patch)

    ctl.client.patch_node = racing_patch
    before = len(kube.requests("PATCH", r"^/api/v1/nodes/n1$"))  # n1 labelled (a was ready) at the start
    rig.beat("n1", a=("syncing", False))
    await until(lambda: TAINT in taints(kube.get("nodes", "n1")), "tainted")
    assert taints(kube.get("nodes", "n1")) == [GPU_TAINT, drain, TAINT]
    cordoned = [drain in taints(v) for v in kube.history("nodes", "n1")]
    assert cordoned == [False, False, True, True], "created, labelled, cordoned, tainted: the cordon never lost"
    # Refused (computed from the version before the cordon), then written on the new version.
    assert len(kube.requests("PATCH", r"^/api/v1/nodes/n1$")) - before == 2


async def test_pod_status_errors_are_logged_and_retried(rig, monkeypatch, caplog):
    kube = rig.kube
    monkeypatch.setattr(controller_module, "RESYNC", 0.2)
    await rig.add_datasets("a")
    kube.create(node("n1"))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",)))
    rig.beat("n1", a="ready")
    kube.create(pod("web", "a", gated=False, node_name="n1", phase="Running"))
    kube.fail(r"/pods/web/status$", 500, method="PATCH", count=3, message="etcdserver: request timed out")
    await rig.start()
    await until(lambda: (condition(kube.get("pods", "web", "ml")) or {}).get("status") == "True", "condition set")
    assert len(kube.requests("PATCH", r"/pods/web/status$")) == 4
    assert len(kube.history("pods", "web", "ml")) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "cannot set condition" in r.getMessage()]
    assert len(warnings) == 3 and "500 InternalError: etcdserver: request timed out" in warnings[0]


async def test_api_server_restart_watches_resume_and_the_controller_converges(rig, monkeypatch):
    kube = rig.kube
    monkeypatch.setattr(controller_module, "RESYNC", 0.3)
    await rig.add_datasets("a")
    for n in ("n1", "n2"):
        kube.create(node(n))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n2")))
    rig.beat("n1", a="ready")
    kube.create(pod("web", "a"))
    ctl = await rig.start()
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")
    await until(lambda: not kube.get("pods", "web", "ml")["spec"].get("schedulingGates"), "gate lifted")
    await kube.watching(2)

    # The API server goes away; meanwhile n2 completes (the write fails) and n1 goes incomplete.
    await trio.to_thread.run_sync(kube.kill)
    rig.beat("n2", a="ready")
    rig.beat("n1", a=("syncing", False))
    await reconciles(ctl, 2)
    await trio.to_thread.run_sync(lambda: kube.start(port=kube.port))
    # ... and comes back with its objects: the controller writes what it could not, and sees what is new.
    kube.create(node("n3", {"gpu": "h100"}))
    kube.create(pod("late", "a", gated=False, node_name="n2", phase="Running"))
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {LABEL_A: "ready"}, "n2 labelled", 10)
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {}, "n1 unlabelled")
    await until(lambda: rig.cp.node_labels.get("n3", {}).get("gpu") == "h100", "the new Node seen")
    await until(lambda: rig.cp.in_use.get("n2") == frozenset({"a"}), "the new pod seen")
    # (Each watch resumed from its resourceVersion, or -- when the restarted server's empty watch cache
    # starts after it, as a real one's does -- got 410 and listed again: either way nothing was missed.)
    assert [dataset_labels(v) for v in kube.history("nodes", "n2")] == [{}, {LABEL_A: "ready"}]


async def test_watch_gone_lists_again_and_forgets_what_went_meanwhile(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    for n in ("n1", "n2"):
        kube.create(node(n, {"pool": "gpu"}))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", selector={"pool": "gpu"}))
    kube.create(pod("web", "a", gated=False, node_name="n1", phase="Running"))
    ctl = await rig.start()
    await until(lambda: rig.cp.in_use == {"n1": {"a"}}, "in use")
    await until(lambda: set(rig.cp.dataset_view("a")["nodes"]) == {"n1", "n2"}, "placed by Node labels")
    await kube.watching(2)

    # Cut the watches off, change things they cannot see, forget the events, let them back in.
    kube.fail(r"^/api/v1/(nodes|pods)$", 503, method="GET")
    kube.drop_watches()
    kube.delete("pods", "web", "ml")
    kube.delete("nodes", "n2")
    kube.compact()
    await trio.sleep(0.3)
    kube.clear_faults()
    await until(lambda: rig.cp.in_use == {}, "the pod gone in the new list")
    await until(lambda: set(rig.cp.dataset_view("a")["nodes"]) == {"n1"}, "the Node gone in the new list")
    assert set(ctl.nodes) == {"n1"} and ctl.pods == {}
    for plural in ("nodes", "pods"):  # listed at the start, refused while cut off, listed again
        lists = [r for r in kube.requests("GET", rf"^/api/v1/{plural}$") if "watch" not in r["query"]]
        assert len(lists) >= 2


async def test_no_writes_once_converged(rig, monkeypatch):
    kube = rig.kube
    monkeypatch.setattr(controller_module, "RESYNC", 0.02)
    await rig.add_datasets("a", "b")
    for n in ("n1", "n2", "n3"):
        kube.create(node(n, {"zone": n}, taints=[GPU_TAINT]))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n2"), taint_until_ready=True))
    rig.cp.assign("b", Assignment("b", nodes=("n3",)))
    rig.beat("n1", a="ready")
    rig.beat("n2", a="syncing")
    rig.beat("n3", b="syncing")
    kube.create(pod("gated", "b"))
    kube.create(pod("released", "a"))
    kube.create(pod("bound", "a", gated=False, node_name="n1", phase="Running"))
    kube.create(pod("waiting", "a", gated=False, node_name="n2", phase="Running"))
    kube.create(pod("typo", "B"))
    ctl = await rig.start()
    await until(lambda: not kube.get("pods", "released", "ml")["spec"].get("schedulingGates"), "released")
    await until(lambda: all(condition(kube.get("pods", p, "ml")) for p in ("gated", "bound", "waiting")),
                "every condition set")
    await reconciles(ctl, 5)
    kube.clear_requests()
    await reconciles(ctl, 50)
    writes = [r for r in kube.requests() if r["method"] != "GET"]
    assert writes == []


# -- bugs found by these tests, fixed --

async def test_change_during_a_reconcile_is_not_lost(rig, monkeypatch):
    kube = rig.kube
    monkeypatch.setattr(controller_module, "RESYNC", 60.0)
    await rig.add_datasets("a")
    for n in ("n1", "n2"):
        kube.create(node(n))
        rig.beat(n)
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1", "n2")))
    ctl = await rig.start()
    original = ctl.client.patch_node
    done = []

    async def patch_then_n2_completes(name, patch):
        result = await original(name, patch)
        if not done:
            done.append(name)
            await trio.sleep(0.3)  # the watch event of this write arrives (and wakes the loop) meanwhile
            rig.beat("n2", a="ready")  # ... then n2 completes, before this reconcile is over
        return result

    ctl.client.patch_node = patch_then_n2_completes
    rig.beat("n1", a="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")
    await until(lambda: dataset_labels(kube.get("nodes", "n2")) == {LABEL_A: "ready"}, "n2 labelled", 3)


async def test_server_restart_does_not_taint_a_node_serving_a_complete_snapshot(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1"))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", nodes=("n1",), taint_until_ready=True))
    rig.beat("n1", a=("syncing", True))
    ctl = await rig.start()
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")
    versions = len(kube.history("nodes", "n1"))
    rig.stop(ctl)
    rig.restart_plane()
    ctl = await rig.start()
    await reconciles(ctl, 2)
    rig.beat("n1", a=("syncing", True))
    await reconciles(ctl, 2)
    assert [taints(v) for v in kube.history("nodes", "n1")[versions - 1:]] == [[]]


async def test_server_restart_keeps_placements_that_select_on_node_labels(rig):
    kube = rig.kube
    await rig.add_datasets("a")
    kube.create(node("n1", {"gpu": "h100"}))
    rig.beat("n1")
    rig.cp.check_liveness()
    rig.cp.assign("a", Assignment("a", selector={"gpu": "h100"}))
    ctl = await rig.start()
    await until(lambda: set(rig.cp.dataset_view("a")["nodes"]) == {"n1"}, "placed by the Node label")
    rig.beat("n1", a="ready")
    await until(lambda: dataset_labels(kube.get("nodes", "n1")) == {LABEL_A: "ready"}, "n1 labelled")
    rig.stop(ctl)
    cp = rig.restart_plane()
    # The API server is not reachable yet (the server retries connecting); a node joins meanwhile,
    # and n1 beats as usual.
    rig.beat("n9")
    rig.beat("n1", a="ready")
    await trio.sleep(0.2)  # the liveness loop runs the reschedule the join asked for
    assert [d["dataset"] for d in cp.desired("n1")] == ["a"]
    ctl = await rig.start()
    await reconciles(ctl, 3)
    assert [dataset_labels(v) for v in kube.history("nodes", "n1")] == [{}, {LABEL_A: "ready"}]
