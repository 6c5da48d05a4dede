"""The agent's Prometheus metrics (``/metrics`` on the local socket and on ``metrics_listen``).

Counters that code increments live here; gauges are read from the agent's
state at scrape time, so there is nothing to keep in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .agent.agent import Agent

REGISTRY = CollectorRegistry()
BYTES = Counter("syncbit_agent_bytes", "Bytes by origin: 'source' and 'peer' fetched, 'cache' served from "
                "cache files", ["origin"], registry=REGISTRY)
FETCH_SECONDS = Histogram(
    "syncbit_agent_block_fetch_seconds", "Time from a run's request to a block stored in the cache",
    ["origin"], registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PEER_BYTES = Counter("syncbit_agent_peer_bytes", "Bytes exchanged with peers", ["direction", "peer"],
                     registry=REGISTRY)
RELAY_BYTES = Counter("syncbit_agent_relay_bytes", "Of the peer bytes, those of blocks passed on while they "
                      "arrived from the source", ["direction"], registry=REGISTRY)
PEER_ERRORS = Counter("syncbit_agent_peer_errors", "Peer fetches that failed, by reason", ["reason"],
                      registry=REGISTRY)
_CACHE_BYTES = Gauge("syncbit_agent_cache_bytes", "Bytes of block files held", registry=REGISTRY)
_CACHE_QUOTA = Gauge("syncbit_agent_cache_quota_bytes", "Cache quota", registry=REGISTRY)
_CACHE_BLOCKS = Gauge("syncbit_agent_cache_blocks", "Block files held", registry=REGISTRY)
_HITS = Gauge("syncbit_agent_cache_hits", "Block opens served from the cache since start", registry=REGISTRY)
_MISSES = Gauge("syncbit_agent_cache_misses", "Block opens that had to fetch since start", registry=REGISTRY)
_EVICTED = Gauge("syncbit_agent_evicted_blocks", "Blocks evicted since start", registry=REGISTRY)
_DATASETS = Gauge("syncbit_agent_datasets", "Datasets by state", ["state"], registry=REGISTRY)
_DATASET_BYTES = Gauge("syncbit_agent_dataset_bytes", "Bytes of a dataset's snapshot, cached and total",
                       ["dataset", "kind"], registry=REGISTRY)
_CONNECTED = Gauge("syncbit_agent_control_plane_connected", "1 when the last heartbeat was answered",
                   registry=REGISTRY)


def render(agent: Agent) -> bytes:
    st = agent.cache.statistics()
    _CACHE_BYTES.set(st.bytes)
    _CACHE_QUOTA.set(st.quota)
    _CACHE_BLOCKS.set(st.blocks)
    _HITS.set(st.hits)
    _MISSES.set(st.misses)
    _EVICTED.set(st.evicted_blocks)
    _DATASETS.clear()
    _DATASET_BYTES.clear()
    counts: dict[str, int] = {}
    for ds in agent.datasets.values():
        counts[ds.state] = counts.get(ds.state, 0) + 1
        if ds.snapshot is not None:
            _DATASET_BYTES.labels(dataset=ds.name, kind="total").set(ds.snapshot.total_size)
            _DATASET_BYTES.labels(dataset=ds.name, kind="cached").set(agent.cached_bytes(ds.snapshot))
    for state, n in counts.items():
        _DATASETS.labels(state=state).set(n)
    _CONNECTED.set(1 if agent.link is not None and agent.link.connected else 0)
    return generate_latest(REGISTRY)
