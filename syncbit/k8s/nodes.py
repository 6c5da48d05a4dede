"""What a Kubernetes Node should carry for Syncbit: pure functions over Node dicts.

Labels ``dataset.syncbit.io/<dataset>=ready`` where the dataset is complete on
the node, and the taint ``syncbit.io/syncing:NoSchedule`` while an assignment
marked ``--taint-until-ready`` is incomplete there. ``node_patch`` answers
with a JSON merge patch that touches only Syncbit's own keys, or None when
the Node already is as it should be: the controller writes only changes, so
a restart of the agent or the server never removes and re-adds a label.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

LABEL_PREFIX = "dataset.syncbit.io/"
READY = "ready"
TAINT_KEY = "syncbit.io/syncing"
TAINT_EFFECT = "NoSchedule"


def dataset_label(dataset: str) -> str:
    return LABEL_PREFIX + dataset


def ready_datasets(node: Mapping) -> set[str]:
    """The datasets the Node's labels say are ready there."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    return {k[len(LABEL_PREFIX):] for k, v in labels.items() if k.startswith(LABEL_PREFIX) and v == READY}


def foreign_labels(node: Mapping) -> dict[str, str]:
    """The Node's labels that Syncbit does not write (what assignments select on)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    return {k: v for k, v in labels.items() if not k.startswith(LABEL_PREFIX)}


def has_taint(node: Mapping) -> bool:
    return any(t.get("key") == TAINT_KEY and t.get("effect") == TAINT_EFFECT
               for t in (node.get("spec") or {}).get("taints") or [])


def node_patch(node: Mapping, ready: Set[str], *, keep: Set[str] = frozenset(), taint: bool | None = None) -> dict | None:
    """A merge patch making the Node's dataset labels exactly ``ready``, or None if nothing changes.

    Datasets in ``keep`` keep a label they already have and get none they
    lack (a node the server has not heard from since it started). ``taint``
    None leaves the taint as it is.
    """
    labels = (node.get("metadata") or {}).get("labels") or {}
    patch_labels: dict[str, str | None] = {}
    for name in ready:
        if labels.get(dataset_label(name)) != READY:
            patch_labels[dataset_label(name)] = READY
    for key in labels:
        if key.startswith(LABEL_PREFIX) and key[len(LABEL_PREFIX):] not in ready | keep:
            patch_labels[key] = None  # merge patch: null removes the key
    patch: dict = {}
    if patch_labels:
        patch["metadata"] = {"labels": patch_labels}
    if taint is not None and taint != has_taint(node):
        # A merge patch replaces lists whole: send the Node's other taints back unchanged.
        others = [t for t in (node.get("spec") or {}).get("taints") or []
                  if not (t.get("key") == TAINT_KEY and t.get("effect") == TAINT_EFFECT)]
        patch["spec"] = {"taints": others + ([{"key": TAINT_KEY, "value": "true", "effect": TAINT_EFFECT}]
                                             if taint else [])}
        # ... and only if nobody changed them meanwhile (409 Conflict otherwise: read again, retry).
        rv = (node.get("metadata") or {}).get("resourceVersion")
        if rv:
            patch.setdefault("metadata", {})["resourceVersion"] = rv
    return patch or None
