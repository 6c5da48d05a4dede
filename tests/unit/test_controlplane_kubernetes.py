"""What the control plane tells the Kubernetes controller, and what it takes back from it.

In process, a real Store on disk and a real file:// dataset, as in
test_controlplane_heartbeat.py.
"""

from __future__ import annotations

import pytest

from syncbit.errors import ConfigError
from syncbit.server.controlplane import ControlPlane
from syncbit.server.scheduler import Assignment
from tests.unit.test_controlplane_heartbeat import two_node_plane


@pytest.fixture
async def plane(tmp_path):
    cp = await two_node_plane(tmp_path)
    yield cp
    cp.store.close()


def beat(cp: ControlPlane, node: str, state: str, complete: bool | None = None) -> dict:
    snap = cp.store.dataset("ds")["snapshot"]
    rep = {"snapshot": snap, "state": state, "bytes_cached": 0, "bytes_total": 10_000}
    if complete is not None:
        rep["complete"] = complete
    return cp.heartbeat(node, {"labels": {"role": "gpu"}, "free": 10**9, "datasets": {"ds": rep}})


async def test_ready_where_complete_and_tainting_where_incomplete(plane):
    plane.assign("ds", Assignment("ds", selector={"role": "gpu"}, taint_until_ready=True))
    beat(plane, "n1", "ready")
    beat(plane, "n2", "syncing")
    view = plane.node_datasets()
    assert view["n1"]["ready"] == {"ds"} and view["n1"]["tainting"] == set()
    assert view["n2"]["ready"] == set() and view["n2"]["tainting"] == {"ds"}
    assert view["n1"]["heard"] and view["n1"]["up"]
    # Syncing a new snapshot (or re-checking after an agent restart) with the served one complete: still ready.
    beat(plane, "n1", "syncing", complete=True)
    assert plane.node_datasets()["n1"]["ready"] == {"ds"}
    beat(plane, "n1", "syncing", complete=False)
    assert plane.node_datasets()["n1"]["ready"] == set()


async def test_a_down_node_is_ready_for_nothing_and_a_restarted_server_has_heard_from_nobody(plane, tmp_path):
    plane.assign("ds", Assignment("ds", nodes=("n1",)))
    beat(plane, "n1", "ready")
    plane.live["n1"].last_seen -= 3600
    plane.check_liveness()
    assert plane.node_datasets()["n1"] == {"ready": set(), "tainting": set(), "up": False, "heard": True}
    beat(plane, "n1", "ready")
    plane.flush()
    again = ControlPlane(plane.store)
    assert again.node_datasets()["n1"] == {"ready": {"ds"}, "tainting": set(), "up": True, "heard": False}


async def test_node_object_labels_join_the_agent_labels_and_reschedule(plane):
    plane.assign("ds", Assignment("ds", selector={"gpu": "h100"}))
    assert plane.dataset_view("ds")["nodes"] == {}
    plane.set_node_labels("n2", {"gpu": "h100", "role": "kube-wins"})
    plane.check_liveness()  # runs the reschedule the label change asked for
    assert set(plane.dataset_view("ds")["nodes"]) == {"n2"}
    assert next(n for n in plane.nodes_view() if n["name"] == "n2")["labels"] == {"gpu": "h100", "role": "kube-wins"}
    plane.set_node_labels("n2", None)
    plane.check_liveness()
    assert plane.dataset_view("ds")["nodes"] == {}


async def test_datasets_in_use_stay_desired_as_keep_entries_after_unassignment(plane):
    plane.assign("ds", Assignment("ds", nodes=("n1",)))
    assert [d["dataset"] for d in plane.desired("n1")] == ["ds"]
    plane.set_in_use({"n1": frozenset({"ds"})})
    assert [d["dataset"] for d in plane.desired("n1")] == ["ds"], "placed: the normal entry, not a second one"
    plane.unassign("ds")
    assert plane.desired("n1") == [{"dataset": "ds", "keep": True}]
    assert plane.desired("n2") == []
    plane.set_in_use({})
    assert plane.desired("n1") == []


async def test_dataset_names_must_be_kubernetes_label_names(plane, tmp_path):
    for bad in ("x" * 64, "ends-with-", "_starts", "a/b"):
        with pytest.raises(ConfigError, match="invalid dataset name"):
            await plane.add_dataset(bad, (tmp_path / "src").as_uri())
    await plane.add_dataset("x" * 63, (tmp_path / "src").as_uri())
