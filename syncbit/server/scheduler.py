"""Which nodes hold which dataset: a pure function of nodes and assignments.

No I/O, no clock: the server feeds it the nodes it knows (up or down, labels,
free space, what each holds) and an assignment, and writes the answer down.
Placements are sticky: a node that holds a replica keeps it while it stays
eligible, so a new node joining does not reshuffle data that is already in
place; replicas move only when a node goes down, stops matching, or runs out
of space.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import ConfigError

_LABEL_KEY = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    up: bool = True
    free_bytes: int = 0  # space the node's cache can still take
    held_bytes: Mapping[str, int] = field(default_factory=dict)  # dataset -> bytes of it already cached


@dataclass(frozen=True)
class Assignment:
    dataset: str
    nodes: tuple[str, ...] | None = None  # explicit node names; or
    selector: Mapping[str, str] | None = None  # label selector (all must match)
    replicas: int | None = None  # None: every eligible node
    spread_by: str | None = None  # a label whose values are failure domains
    # Kubernetes: nodes carry the syncbit.io/syncing:NoSchedule taint until the dataset is complete.
    taint_until_ready: bool = False

    def __post_init__(self) -> None:
        if (self.nodes is None) == (self.selector is None):
            raise ConfigError("an assignment takes either node names or a label selector")
        if self.nodes is not None and (self.replicas is not None or self.spread_by is not None):
            raise ConfigError("--replicas and --spread-by go with --selector, not with --nodes")
        if self.nodes is not None and not self.nodes:
            raise ConfigError("--nodes needs at least one node name")
        if self.selector is not None and not self.selector:
            raise ConfigError("an empty selector would match every node: give at least one key=value")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        for k, v in (self.selector or {}).items():
            check_label(k, v)
        if self.spread_by is not None and (not isinstance(self.spread_by, str) or not _LABEL_KEY.fullmatch(self.spread_by)):
            raise ConfigError(f"--spread-by: {self.spread_by!r} is not a label name")


@dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...]  # chosen nodes, in a stable order
    problem: str | None = None  # why fewer nodes than wanted, if so


def check_label(key: str, value: str) -> None:
    # fullmatch: '$' would also accept a trailing newline.
    if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key) or len(key) > 317:
        raise ConfigError(f"{key!r} is not a valid label name")
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value) or len(value) > 63:
        raise ConfigError(f"{value!r} is not a valid label value (for {key})")


def parse_selector(text: str) -> dict[str, str]:
    """``gpu=h100,zone=a`` -> {"gpu": "h100", "zone": "a"}; malformed input is a ConfigError."""
    selector: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"malformed selector item {item!r}: expected key=value")
        key, value = key.strip(), value.strip()
        check_label(key, value)
        if key in selector and selector[key] != value:
            raise ConfigError(f"selector names {key!r} twice with different values")
        selector[key] = value
    if not selector:
        raise ConfigError("empty selector: expected key=value[,key=value...]")
    return selector


def eligible(node: NodeView, a: Assignment, size: int) -> str | None:
    """None if ``node`` may hold the dataset, else the reason it may not."""
    if not node.up:
        return "down"
    if a.selector is not None and any(node.labels.get(k) != v for k, v in a.selector.items()):
        return "labels do not match"
    need = size - node.held_bytes.get(a.dataset, 0)
    if need > node.free_bytes:
        return f"needs {need} bytes, has {node.free_bytes} free"
    return None


def place(a: Assignment, nodes: list[NodeView], size: int, current: set[str] | frozenset[str] = frozenset()) -> Placement:
    """The nodes that should hold ``a.dataset`` (``size`` bytes), given where it is now (``current``)."""
    by_name = {n.name: n for n in nodes}
    if a.nodes is not None:
        # Named nodes are the operator's choice: placed even when down or not
        # yet registered; their state tells the rest.
        missing = [n for n in a.nodes if n not in by_name]
        problem = f"not registered: {', '.join(missing)}" if missing else None
        return Placement(tuple(dict.fromkeys(a.nodes)), problem)

    ok = [n for n in nodes if eligible(n, a, size) is None]
    if a.replicas is None:
        chosen = sorted(n.name for n in ok)
        return Placement(tuple(chosen), None if chosen else _nobody(a, nodes, size))

    # Keep replicas where they are, then fill, spreading over domains.
    keep = sorted((n for n in ok if n.name in current), key=lambda n: n.name)
    chosen = []
    domains: dict[str, int] = {}
    for n in keep:
        if len(chosen) < a.replicas:
            chosen.append(n)
            domains[_domain(n, a)] = domains.get(_domain(n, a), 0) + 1
    candidates = [n for n in ok if n.name not in {c.name for c in chosen}]
    while len(chosen) < a.replicas and candidates:
        # Fewest replicas in its domain, then the most data already held
        # (less to move), then the most free space, then the name.
        best = min(candidates, key=lambda n: (domains.get(_domain(n, a), 0), -n.held_bytes.get(a.dataset, 0),
                                              -n.free_bytes, n.name))
        chosen.append(best)
        candidates.remove(best)
        domains[_domain(best, a)] = domains.get(_domain(best, a), 0) + 1
    names = tuple(sorted(n.name for n in chosen))
    if len(names) < a.replicas:
        why = _nobody(a, nodes, size) if not names else \
            f"only {len(names)} of {a.replicas} replicas placeable ({_reasons(a, nodes, size)})"
        return Placement(names, why)
    return Placement(names)


def _domain(n: NodeView, a: Assignment) -> str:
    return n.labels.get(a.spread_by, "") if a.spread_by else ""


def _reasons(a: Assignment, nodes: list[NodeView], size: int) -> str:
    counts: dict[str, int] = {}
    for n in nodes:
        why = eligible(n, a, size)
        if why is not None:
            key = "too little space" if why.startswith("needs") else why
            counts[key] = counts.get(key, 0) + 1
    if not nodes:
        return "no nodes registered"
    if not counts:
        return f"all {len(nodes)} registered nodes are eligible"
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _nobody(a: Assignment, nodes: list[NodeView], size: int) -> str:
    return f"no eligible node ({_reasons(a, nodes, size)})"
