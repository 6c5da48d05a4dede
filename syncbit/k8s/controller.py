"""The control plane's Kubernetes controller: Node labels and taints, pod gates and conditions.

It watches Nodes and Pods and reconciles, whenever the control plane's state
or a watched object changes (and every ``RESYNC`` seconds regardless):

- Node labels ``dataset.syncbit.io/<dataset>=ready`` and the
  ``syncbit.io/syncing`` taint (nodes.py), written only when they differ:
  a node the server has not heard from since it started keeps its labels
  until it reports, so restarts never make them flap.
- The Node's own labels go to the scheduler (``ControlPlane.set_node_labels``),
  so assignments select on real node labels.
- Gated pods (webhook.py gave them the gate): once some node has every
  dataset they ask for, their node affinity requires those labels and the
  gate is lifted; until then the pod stays gated with a condition message
  and an event that say why.
- Bound pods: the readiness condition follows the data on their node, and
  the datasets they use stay pinned there (``ControlPlane.set_in_use``)
  after an unassignment, until the last such pod is gone.

Patches carry the resourceVersion they were computed from; a conflict or
an API error is logged and retried at the next reconcile.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

import trio

from ..config import KubernetesConfig
from ..errors import ConfigError, DatasetNotFound
from ..server.controlplane import ControlPlane
from . import nodes as node_rules
from . import pods as pod_rules
from .client import KubeClient, KubeError

log = logging.getLogger(__name__)

RESYNC = 10.0  # seconds between full reconciles when nothing wakes the controller
SETTLE = 0.5  # collect a burst of changes (heartbeats of syncing nodes) into one reconcile


class KubeController:
    def __init__(self, cp: ControlPlane, cfg: KubernetesConfig, client: KubeClient,
                 webhook_ca: bytes | None = None) -> None:
        self.cp = cp
        self.cfg = cfg
        self.client = client
        self.webhook_ca = webhook_ca
        self.nodes: dict[str, dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.synced = {"nodes": False, "pods": False}
        self._kick = trio.Event()
        self._said: dict[tuple[str, str], str] = {}  # pod -> the last event message it got
        self.reconciles = 0
        self._reasons: dict[tuple[str, str | None], str] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, "nodes")
            nursery.start_soon(self._watch, "pods")
            if self.webhook_ca is not None:
                nursery.start_soon(self._trust_webhook_ca)
            nursery.start_soon(self._reconcile_loop)
            task_status.started()

    # -- watches -------------------------------------------------------------

    async def _watch(self, kind: str) -> None:
        async for event, obj in self.client.watch(kind):
            if event == "SYNC":
                self._replace(kind, obj)
                self.synced[kind] = True
                if kind == "nodes":
                    self.cp.hold_placements(False)  # the Node labels are known now
            elif event == "DELETED":
                self._forget(kind, obj)
            else:
                self._store(kind, obj)
            self._kick.set()

    def _replace(self, kind: str, objs: list[dict]) -> None:
        if kind == "nodes":
            names = {o["metadata"]["name"] for o in objs}
            for gone in set(self.nodes) - names:
                self._forget(kind, self.nodes[gone])
        else:
            self.pods.clear()
            keys = {pod_rules.key(o) for o in objs}
            self._said = {k: v for k, v in self._said.items() if k in keys}
        for o in objs:
            self._store(kind, o)

    def _store(self, kind: str, obj: dict) -> None:
        if kind == "nodes":
            name = obj["metadata"]["name"]
            self.nodes[name] = obj
            self.cp.set_node_labels(name, node_rules.foreign_labels(obj))
        else:
            self.pods[pod_rules.key(obj)] = obj

    def _forget(self, kind: str, obj: dict) -> None:
        if kind == "nodes":
            name = obj["metadata"]["name"]
            self.nodes.pop(name, None)
            self.cp.set_node_labels(name, None)
        else:
            self.pods.pop(pod_rules.key(obj), None)
            self._said.pop(pod_rules.key(obj), None)

    async def _trust_webhook_ca(self) -> None:
        """Put the generated CA into the MutatingWebhookConfiguration (retried until it works)."""
        delay = 1.0
        while True:
            try:
                await self.client.patch_webhook_ca(self.cfg.webhook_name, self.webhook_ca)
                log.info("webhook: CA bundle set on MutatingWebhookConfiguration %s", self.cfg.webhook_name)
                return
            except KubeError as e:
                log.warning("webhook: cannot set the CA bundle of %s: %s (retrying in %.0fs)",
                            self.cfg.webhook_name, e, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)

    # -- reconcile -------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            # Taken before reconciling: a change that lands while a write is awaited
            # fires these and is reconciled next, not at the next RESYNC.
            changed = self.cp.changed
            self._kick = trio.Event()
            if all(self.synced.values()):
                try:
                    await self.reconcile()
                except (KubeError, ConfigError) as e:
                    log.warning("kubernetes: reconcile stopped early: %s (retrying)", e)
            with trio.move_on_after(RESYNC):
                async with trio.open_nursery() as nursery:
                    async def first(wait) -> None:
                        await wait()
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(first, changed.wait)
                    nursery.start_soon(first, self._kick.wait)
            await trio.sleep(SETTLE)

    async def reconcile(self) -> None:
        self.reconciles += 1
        self._reasons: dict[tuple[str, str | None], str] = {}  # _why() answers, for this reconcile
        state = self.cp.node_datasets()
        await self._nodes(state)
        ready_on = {name: (state.get(name) or {}).get("ready", set()) if name in self.nodes else set()
                    for name in self.nodes}
        in_use: dict[str, set[str]] = {}
        for pod in list(self.pods.values()):
            try:
                datasets = pod_rules.requested_datasets(pod)
            except ConfigError as e:
                await self._say(pod, "Warning", "InvalidDatasets", str(e))
                continue
            if not datasets:
                continue
            node = pod_rules.node_of(pod)
            if pod_rules.uses_node(pod):
                in_use.setdefault(node, set()).update(datasets)
            if pod_rules.is_gated(pod):
                await self._gated(pod, datasets, ready_on)
            elif node is not None and pod_rules.has_readiness_gate(pod):
                await self._bound(pod, datasets, node, ready_on.get(node, set()))
        self.cp.set_in_use({n: frozenset(d) for n, d in in_use.items()})

    async def _nodes(self, state: Mapping[str, dict]) -> None:
        for name, node in list(self.nodes.items()):
            st = state.get(name)
            if st is None:  # no agent has ever reported as this node: nothing of ours belongs there
                patch = node_rules.node_patch(node, set(), taint=False)
            elif st["up"] and not st["heard"]:
                # Not heard from since this server started: what it reported before may be out of
                # date (whether its snapshot is complete is not stored), so nothing it has is taken
                # away, and no taint is added, until it reports again.
                patch = node_rules.node_patch(node, st["ready"], keep=node_rules.ready_datasets(node), taint=None)
            else:
                # A down agent syncs nothing: no taint keeping every workload off its node.
                patch = node_rules.node_patch(node, st["ready"], taint=bool(st["tainting"]) and st["up"])
            if patch is None:
                continue
            try:
                self.nodes[name] = await self.client.patch_node(name, patch)
            except KubeError as e:
                log.warning("kubernetes: node %s: %s", name, e)
                continue
            log.info("kubernetes: node %s: %s", name, _describe(patch))

    async def _gated(self, pod: dict, datasets: tuple[str, ...], ready_on: Mapping[str, set[str]]) -> None:
        ns, name = pod_rules.key(pod)
        candidates = sorted(n for n, ready in ready_on.items() if set(datasets) <= ready)
        if candidates:
            try:
                self.pods[(ns, name)] = await self.client.patch_pod(ns, name, pod_rules.release_patch(pod, datasets))
            except KubeError as e:
                log.warning("kubernetes: pod %s/%s: cannot lift its scheduling gate: %s", ns, name, e)
                return
            message = f"{', '.join(datasets)} ready on {len(candidates)} node(s): scheduling gate lifted"
            log.info("kubernetes: pod %s/%s: %s", ns, name, message)
            await self._say(pod, "Normal", "DatasetsPlaced", message)
            await self._condition(self.pods[(ns, name)], False, "DatasetsPlaced",
                                  f"{message}; waiting to be scheduled on one of them")
            return
        message = self._why_nowhere(datasets, ready_on)
        await self._condition(pod, False, "DatasetsNotReady", message)
        await self._say(pod, "Warning", "DatasetsNotReady", message)

    async def _bound(self, pod: dict, datasets: tuple[str, ...], node: str, ready: set[str]) -> None:
        missing = [d for d in datasets if d not in ready]
        if not missing:
            await self._condition(pod, True, "DatasetsReady", f"{', '.join(datasets)} complete on node {node}")
        else:
            await self._condition(pod, False, "DatasetsNotReady", "; ".join(self._why(d, node) for d in missing))

    def _why(self, dataset: str, node: str | None) -> str:
        cached = self._reasons.get((dataset, node))
        if cached is not None:
            return cached
        try:
            state, reason = self.cp.wait_state(dataset, node)
            answer = reason or f"dataset {dataset} is {state}"
        except DatasetNotFound:
            answer = f"dataset {dataset} is not known to the control plane"
        self._reasons[(dataset, node)] = answer
        return answer

    def _why_nowhere(self, datasets: tuple[str, ...], ready_on: Mapping[str, set[str]]) -> str:
        somewhere = {d: sorted(n for n, r in ready_on.items() if d in r) for d in datasets}
        if len(datasets) > 1 and all(somewhere.values()):
            return "no node has all of " + ", ".join(datasets) + " ready (" + "; ".join(
                f"{d} on {', '.join(ns)}" for d, ns in somewhere.items()) + ")"
        return "no node has the data yet: " + "; ".join(self._why(d, None) for d in datasets if not somewhere[d])

    async def _condition(self, pod: dict, ready: bool, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = pod_rules.condition_patch(pod, ready, reason, message, now)
        if patch is None:
            return
        ns, name = pod_rules.key(pod)
        try:
            self.pods[(ns, name)] = await self.client.patch_pod_status(ns, name, patch)
        except KubeError as e:
            log.warning("kubernetes: pod %s/%s: cannot set condition %s: %s", ns, name, pod_rules.CONDITION, e)
            return
        log.info("kubernetes: pod %s/%s: %s=%s (%s)", ns, name, pod_rules.CONDITION, ready, message)

    async def _say(self, pod: dict, type_: str, reason: str, message: str) -> None:
        """An event on the pod, once per distinct message (not once per reconcile)."""
        key = pod_rules.key(pod)
        if self._said.get(key) == message:
            return
        try:
            await self.client.create_event(pod, reason=reason, message=message, type=type_)
        except KubeError as e:
            log.warning("kubernetes: pod %s/%s: cannot record event: %s", *key, e)
            return
        self._said[key] = message


def _describe(patch: Mapping) -> str:
    parts = []
    for k, v in ((patch.get("metadata") or {}).get("labels") or {}).items():
        parts.append(f"label {k}={v}" if v is not None else f"label {k} removed")
    if "spec" in patch:
        parts.append("taints " + (", ".join(f"{t['key']}:{t['effect']}" for t in patch["spec"]["taints"]) or "none"))
    return "; ".join(parts)
