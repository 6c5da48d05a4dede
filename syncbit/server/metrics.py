"""Prometheus metrics of the control plane (``GET /metrics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .controlplane import ControlPlane

REGISTRY = CollectorRegistry()
HEARTBEAT_SECONDS = Histogram(
    "syncbit_server_heartbeat_seconds", "Time to handle one agent heartbeat", registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
NODES = Gauge("syncbit_server_nodes", "Registered nodes by liveness", ["up"], registry=REGISTRY)
PLACEMENTS = Gauge("syncbit_server_placements", "Dataset placements by state", ["dataset", "state"],
                   registry=REGISTRY)
DATASETS = Gauge("syncbit_server_datasets", "Datasets known to the control plane", registry=REGISTRY)


def render(cp: ControlPlane) -> bytes:
    # Gauges are read from the state at scrape time: nothing to keep in step.
    nodes = cp.nodes_view()
    NODES.labels(up="true").set(sum(n["up"] for n in nodes))
    NODES.labels(up="false").set(sum(not n["up"] for n in nodes))
    PLACEMENTS.clear()
    counts: dict[tuple[str, str], int] = {}
    for p in cp.store.placements():
        counts[(p["dataset"], p["state"])] = counts.get((p["dataset"], p["state"]), 0) + 1
    for (ds, state), n in counts.items():
        PLACEMENTS.labels(dataset=ds, state=state).set(n)
    DATASETS.set(len(cp.store.datasets()))
    return generate_latest(REGISTRY)
