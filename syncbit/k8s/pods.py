"""The pod contract: pure functions over Pod dicts.

A pod asks for data with the annotation ``syncbit.io/datasets: a,b``. The
admission webhook (webhook.py) gives it the scheduling gate, the hostPath
volume and the readiness gate named here; the controller then narrows its
node affinity to nodes labelled ready for every dataset and lifts the gate
(Kubernetes 1.30+ allows exactly these two changes to a gated pod), and
keeps the readiness condition true while the data is complete on its node.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigError
from ..server.controlplane import check_name
from .nodes import READY, dataset_label

ANNOTATION = "syncbit.io/datasets"
GATE = "syncbit.io/datasets"
CONDITION = "syncbit.io/datasets-ready"
VOLUME = "syncbit-datasets"
MOUNT_PATH = "/datasets"


def requested_datasets(pod: Mapping) -> tuple[str, ...] | None:
    """The datasets the pod's annotation names (None without the annotation); ConfigError if malformed."""
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if value is None:
        return None
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"annotation {ANNOTATION} names no dataset (expected 'a,b')")
    for n in names:
        check_name(n)
    return tuple(dict.fromkeys(names))  # order kept, duplicates dropped


def key(pod: Mapping) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def node_of(pod: Mapping) -> str | None:
    return (pod.get("spec") or {}).get("nodeName") or None


def is_gated(pod: Mapping) -> bool:
    return any(g.get("name") == GATE for g in (pod.get("spec") or {}).get("schedulingGates") or [])


def uses_node(pod: Mapping) -> bool:
    """Bound to a node and not finished: its containers may be reading the data there."""
    phase = (pod.get("status") or {}).get("phase")
    return node_of(pod) is not None and phase not in ("Succeeded", "Failed")


def release_patch(pod: Mapping, datasets: tuple[str, ...]) -> dict:
    """A merge patch requiring nodes ready for ``datasets`` and lifting Syncbit's scheduling gate.

    Kubernetes lets a gated pod's required node affinity only narrow: each
    existing term gets the expressions added (terms are ORed, expressions
    within a term ANDed), or one term is made when there is none.
    """
    spec = pod.get("spec") or {}
    ours = [{"key": dataset_label(d), "operator": "In", "values": [READY]} for d in datasets]
    affinity = spec.get("affinity") or {}
    node_affinity = affinity.get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if terms:
        terms = [{**t, "matchExpressions": (t.get("matchExpressions") or [])
                  + [e for e in ours if e not in (t.get("matchExpressions") or [])]} for t in terms]
    else:
        terms = [{"matchExpressions": ours}]
    gates = [g for g in spec.get("schedulingGates") or [] if g.get("name") != GATE]
    patch: dict = {"spec": {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            **required, "nodeSelectorTerms": terms}}},
        "schedulingGates": gates or None,
    }}
    rv = (pod.get("metadata") or {}).get("resourceVersion")
    if rv:
        patch["metadata"] = {"resourceVersion": rv}
    return patch


def condition(pod: Mapping) -> dict | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == CONDITION:
            return c
    return None


def has_readiness_gate(pod: Mapping) -> bool:
    return any(g.get("conditionType") == CONDITION for g in (pod.get("spec") or {}).get("readinessGates") or [])


def condition_patch(pod: Mapping, ready: bool, reason: str, message: str, now: str) -> dict | None:
    """A merge patch for the pod's status setting Syncbit's condition, or None if it already says so."""
    status = "True" if ready else "False"
    current = condition(pod)
    if current is not None and (current.get("status"), current.get("reason"), current.get("message")) \
            == (status, reason, message):
        return None
    ours = {"type": CONDITION, "status": status, "reason": reason, "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now if current is None or current.get("status") != status
            else current.get("lastTransitionTime", now)}
    # A merge patch replaces the list whole: the kubelet's conditions go back unchanged,
    # and only if the pod did not change meanwhile (resourceVersion: 409 otherwise).
    others = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != CONDITION]
    patch: dict = {"status": {"conditions": others + [ours]}}
    rv = (pod.get("metadata") or {}).get("resourceVersion")
    if rv:
        patch["metadata"] = {"resourceVersion": rv}
    return patch
