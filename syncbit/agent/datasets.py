"""Per-dataset state the agent keeps and reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..model import Snapshot

PENDING, SYNCING, READY, FAILED = "pending", "syncing", "ready", "failed"


@dataclass
class DatasetState:
    name: str
    uri: str
    snapshot: Snapshot | None = None
    options: dict[str, str] = field(default_factory=dict)  # per-dataset source options
    managed: bool = False  # assigned by the control plane (vs pulled by hand)
    staged: Snapshot | None = None  # being prefetched; becomes current when complete
    switch: str = "complete"  # or "immediate": a new snapshot becomes current at once
    pinned: bool = False
    held: bool = False  # unassigned but kept pinned while in use (open files, a pod on this node)
    state: str = PENDING
    error: str | None = None
    prefetch_scope: trio.CancelScope | None = field(default=None, repr=False)
    changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        # Wake everyone waiting for a change, then start a new generation.
        self.changed.set()
        self.changed = trio.Event()
