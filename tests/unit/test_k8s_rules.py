"""The Kubernetes contract as pure functions: node labels and taints, pod gates and conditions, the webhook.

The webhook's JSON Patch is applied with the ``jsonpatch`` library (RFC 6902),
as the API server would, and the result is checked object by object.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json

import jsonpatch
import pytest
from cryptography import x509

from syncbit.config import load_server_config
from syncbit.errors import ConfigError
from syncbit.k8s import nodes, pods, webhook
from syncbit.k8s.certs import webhook_certificate
from tests.servers.kube import merge_patch


def node(labels=None, taints=None, rv="7"):
    return {"metadata": {"name": "n1", "labels": dict(labels or {}), "resourceVersion": rv},
            "spec": {"taints": list(taints or [])}}


# RFC 7386, as the API server applies application/merge-patch+json (the emulator's own).
merge = merge_patch


# -- nodes ---------------------------------------------------------------------

def test_node_patch_sets_ready_labels_and_removes_only_ours():
    n = node({"kubernetes.io/hostname": "n1", "dataset.syncbit.io/old": "ready", "gpu": "h100"})
    patch = nodes.node_patch(n, {"llama"})
    assert patch == {"metadata": {"labels": {"dataset.syncbit.io/llama": "ready", "dataset.syncbit.io/old": None}}}
    after = merge(n, patch)
    assert after["metadata"]["labels"] == {"kubernetes.io/hostname": "n1", "gpu": "h100",
                                           "dataset.syncbit.io/llama": "ready"}
    assert nodes.node_patch(after, {"llama"}) is None, "a node that is as it should be gets no write"


def test_node_patch_keep_holds_existing_labels_but_adds_none():
    n = node({"dataset.syncbit.io/a": "ready"})
    assert nodes.node_patch(n, set(), keep={"a"}) is None
    assert nodes.node_patch(n, set(), keep={"b"}) == {"metadata": {"labels": {"dataset.syncbit.io/a": None}}}


def test_taint_is_added_and_removed_keeping_other_taints_and_the_resource_version():
    other = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
    n = node(taints=[other])
    patch = nodes.node_patch(n, set(), taint=True)
    assert patch["spec"]["taints"] == [other, {"key": "syncbit.io/syncing", "value": "true", "effect": "NoSchedule"}]
    assert patch["metadata"]["resourceVersion"] == "7", "taints are replaced whole: only over what was read"
    tainted = merge(n, patch)
    assert nodes.has_taint(tainted)
    assert nodes.node_patch(tainted, set(), taint=True) is None
    assert nodes.node_patch(tainted, set(), taint=None) is None, "None leaves the taint alone"
    cleared = merge(tainted, nodes.node_patch(tainted, set(), taint=False))
    assert cleared["spec"]["taints"] == [other]


def test_foreign_labels_exclude_ours():
    n = node({"zone": "a", "dataset.syncbit.io/x": "ready"})
    assert nodes.foreign_labels(n) == {"zone": "a"}
    assert nodes.ready_datasets(n) == {"x"}


# -- pods ------------------------------------------------------------------------

def pod(annotation="llama,data", **spec):
    meta = {"name": "p", "namespace": "ml", "resourceVersion": "42"}
    if annotation is not None:
        meta["annotations"] = {"syncbit.io/datasets": annotation}
    return {"metadata": meta, "spec": {"containers": [{"name": "main", "image": "x"}], **spec}, "status": {}}


def test_requested_datasets_parses_and_refuses_bad_names():
    assert pods.requested_datasets(pod(" llama , data,llama ")) == ("llama", "data")
    assert pods.requested_datasets(pod(None)) is None
    for bad in ("", " , ", "../etc", "a" * 64, "trailing-", "Bad Name"):
        with pytest.raises(ConfigError):
            pods.requested_datasets(pod(bad))


def test_release_patch_adds_affinity_and_lifts_only_our_gate():
    p = pod(schedulingGates=[{"name": "other.io/gate"}, {"name": "syncbit.io/datasets"}])
    after = merge(p, pods.release_patch(p, ("llama", "data")))
    assert after["spec"]["schedulingGates"] == [{"name": "other.io/gate"}]
    terms = after["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "dataset.syncbit.io/llama", "operator": "In", "values": ["ready"]},
        {"key": "dataset.syncbit.io/data", "operator": "In", "values": ["ready"]}]}]
    assert not pods.is_gated(after)
    # Only our gate: the field goes away altogether.
    lone = pod(schedulingGates=[{"name": "syncbit.io/datasets"}])
    assert "schedulingGates" not in merge(lone, pods.release_patch(lone, ("llama",)))["spec"]


def test_release_patch_narrows_every_existing_term():
    """Kubernetes lets a gated pod's affinity only narrow: each term keeps its own expressions."""
    gpu = {"key": "gpu", "operator": "In", "values": ["h100"]}
    zone = {"key": "zone", "operator": "In", "values": ["a"]}
    p = pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [gpu]}, {"matchExpressions": [zone]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}]}},
        schedulingGates=[{"name": "syncbit.io/datasets"}])
    after = merge(p, pods.release_patch(p, ("llama",)))
    na = after["spec"]["affinity"]["nodeAffinity"]
    ours = {"key": "dataset.syncbit.io/llama", "operator": "In", "values": ["ready"]}
    assert na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [gpu, ours]}, {"matchExpressions": [zone, ours]}]
    assert na["preferredDuringSchedulingIgnoredDuringExecution"] == [{"weight": 1, "preference": {}}]


def test_condition_patch_keeps_kubelet_conditions_and_writes_only_changes():
    p = pod(readinessGates=[{"conditionType": "syncbit.io/datasets-ready"}])
    p["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    t0, t1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
    first = merge(p, pods.condition_patch(p, False, "DatasetsNotReady", "syncing", t0))
    assert first["status"]["conditions"][0] == {"type": "Ready", "status": "False"}
    assert pods.condition(first)["status"] == "False" and pods.condition(first)["lastTransitionTime"] == t0
    assert pods.condition_patch(first, False, "DatasetsNotReady", "syncing", t1) is None
    # Same status, new message: the transition time stays.
    second = merge(first, pods.condition_patch(first, False, "DatasetsNotReady", "still syncing", t1))
    assert pods.condition(second)["lastTransitionTime"] == t0
    third = merge(second, pods.condition_patch(second, True, "DatasetsReady", "complete", t1))
    assert pods.condition(third)["status"] == "True" and pods.condition(third)["lastTransitionTime"] == t1
    assert [c["type"] for c in third["status"]["conditions"]] == ["Ready", "syncbit.io/datasets-ready"]


def test_uses_node_until_the_pod_finishes():
    p = pod(nodeName="n1")
    p["status"]["phase"] = "Running"
    assert pods.uses_node(p)
    p["status"]["phase"] = "Succeeded"
    assert not pods.uses_node(p)
    assert not pods.uses_node(pod())


# -- webhook ---------------------------------------------------------------------

def review(obj, operation="CREATE"):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": operation, "namespace": "ml", "object": obj}}


def applied(obj, answer):
    resp = answer["response"]
    assert resp["uid"] == "u-1" and resp["allowed"] is True
    if "patch" not in resp:
        return obj
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(obj), ops)


def test_webhook_adds_gate_volume_mounts_and_readiness_gate():
    p = pod(initContainers=[{"name": "init", "image": "x", "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}],
            volumes=[{"name": "cfg", "configMap": {"name": "c"}}])
    p["spec"]["containers"].append({"name": "side", "image": "y"})
    out = applied(p, webhook.mutate(review(p), "/datasets"))
    assert out["spec"]["schedulingGates"] == [{"name": "syncbit.io/datasets"}]
    assert out["spec"]["volumes"] == [{"name": "cfg", "configMap": {"name": "c"}},
                                      {"name": "syncbit-datasets", "hostPath": {"path": "/datasets", "type": "Directory"}}]
    mount = {"name": "syncbit-datasets", "mountPath": "/datasets", "readOnly": True,
             "mountPropagation": "HostToContainer"}
    assert out["spec"]["initContainers"][0]["volumeMounts"] == [{"name": "cfg", "mountPath": "/cfg"}, mount]
    assert [c["volumeMounts"] for c in out["spec"]["containers"]] == [[mount], [mount]]
    assert out["spec"]["readinessGates"] == [{"conditionType": "syncbit.io/datasets-ready"}]
    # Applied twice (reinvocation, a replayed request): nothing more is added.
    assert "patch" not in webhook.mutate(review(out), "/datasets")["response"]


def test_webhook_leaves_other_pods_and_bound_pods_ungated():
    plain = pod(None)
    assert webhook.mutate(review(plain), "/datasets")["response"] == {"uid": "u-1", "allowed": True}
    bound = applied(pod("llama", nodeName="n1"), webhook.mutate(review(pod("llama", nodeName="n1")), "/mnt/ds"))
    assert "schedulingGates" not in bound["spec"], "a pod created bound to a node cannot be gated"
    assert bound["spec"]["volumes"][0]["hostPath"]["path"] == "/mnt/ds"
    # A container that mounts its own /datasets keeps it.
    own = pod("llama")
    own["spec"]["containers"][0]["volumeMounts"] = [{"name": "mine", "mountPath": "/datasets/"}]
    out = applied(own, webhook.mutate(review(own), "/datasets"))
    assert out["spec"]["containers"][0]["volumeMounts"] == [{"name": "mine", "mountPath": "/datasets/"}]


def test_webhook_refuses_a_malformed_annotation_with_the_reason():
    answer = webhook.mutate(review(pod("ok,../../etc")), "/datasets")["response"]
    assert answer["allowed"] is False and answer["status"]["code"] == 400
    assert "invalid dataset name '../../etc'" in answer["status"]["message"]
    with pytest.raises(ConfigError):
        webhook.mutate({"request": {}}, "/datasets")
    with pytest.raises(ConfigError):
        webhook.mutate([1, 2], "/datasets")


async def test_webhook_app_answers_reviews_and_refuses_garbage():
    import httpx

    transport = httpx.ASGITransport(app=webhook.app("/datasets"))
    async with httpx.AsyncClient(transport=transport, base_url="https://webhook") as c:
        r = await c.post("/mutate-pods", json=review(pod("llama")))
        assert r.status_code == 200 and r.json()["response"]["patchType"] == "JSONPatch"
        for body in (b"not json", b"[]", b"{\"request\": 1}"):
            r = await c.post("/mutate-pods", content=body)
            assert r.status_code == 400, body
        r = await c.post("/mutate-pods", content=b"x" * (webhook.MAX_REVIEW + 1))
        assert r.status_code == 413


# -- certificates and config -------------------------------------------------------

def test_webhook_certificate_is_made_once_and_remade_for_new_names(tmp_path):
    cert, key, ca = webhook_certificate(tmp_path / "wh", ("syncbit-server.syncbit.svc", "127.0.0.1"))
    assert (tmp_path / "wh").stat().st_mode & 0o777 == 0o700 and key.stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca)
    leaf.verify_directly_issued_by(ca_cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["syncbit-server.syncbit.svc"]
    assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    again = webhook_certificate(tmp_path / "wh", ("syncbit-server.syncbit.svc", "127.0.0.1"))
    assert again[2] == ca, "a restart keeps the CA the webhook configuration trusts"
    renamed = webhook_certificate(tmp_path / "wh", ("other.svc",))
    assert renamed[2] != ca


def test_server_config_kubernetes_section(tmp_path):
    f = tmp_path / "server.yaml"
    f.write_text("kubernetes:\n  enabled: true\n  webhook_dns_names: [a.svc, b.svc]\n  mount_root: /mnt/ds\n")
    k = load_server_config(f, env={}).kubernetes
    assert (k.enabled, k.webhook_dns_names, k.mount_root, k.webhook_listen) == (True, ("a.svc", "b.svc"), "/mnt/ds",
                                                                                 "0.0.0.0:8443")
    assert load_server_config(env={}).kubernetes.enabled is False
    env = {"SYNCBIT_KUBERNETES_ENABLED": "yes", "SYNCBIT_KUBERNETES_WEBHOOK_DNS_NAMES": "x.svc,y.svc"}
    assert load_server_config(env=env).kubernetes.webhook_dns_names == ("x.svc", "y.svc")
    for text, why in (("kubernetes: [1]\n", "expected a mapping"), ("kubernetes: {enabld: true}\n", "unknown keys"),
                      ("kubernetes: {webhook_cert_file: /c}\n", "go together"),
                      ("kubernetes: {webhook_listen: nowhere}\n", "HOST:PORT")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_server_config(f, env={})
    with pytest.raises(ConfigError, match="true or false"):
        load_server_config(env={"SYNCBIT_KUBERNETES_ENABLED": "maybe"})
