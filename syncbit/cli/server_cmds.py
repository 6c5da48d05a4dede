"""Control-plane commands: server, dataset add/ls/rm/update, assign, unassign, nodes, wait, cluster status."""

from __future__ import annotations

import json
import time

import click

from ..config import load_server_config, socket_path_for_cli
from ..errors import AgentNotRunning, ConfigError, DatasetFailed, DatasetNotFound, WaitTimeout
from ..units import format_size
from .client import AgentClient
from .server_client import ServerClient


server_option = click.option("--server", "server_url", envvar="SYNCBIT_SERVER", required=True,
                             help="Control plane URL (or SYNCBIT_SERVER).")


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Server config (YAML).")
@click.option("--db", help="State database (SQLite) path.")
@click.option("--listen", help="HOST:PORT to serve the API on (default 0.0.0.0:7070).")
@click.option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")
def server(config_path, db, listen, log_level):
    """Run the control plane (foreground): datasets, assignments, scheduler, node state."""
    import trio

    from ..logs import setup_logging
    from ..server.server import Server

    cfg = load_server_config(config_path, overrides={"db": db, "listen": listen, "log_level": log_level})
    setup_logging(cfg.log_level, cfg.log_format)
    trio.run(Server(cfg).run)


@click.group()
def dataset():
    """Datasets on the control plane."""


@dataset.command("add")
@click.argument("name")
@click.argument("uri")
@click.option("--endpoint-url", help="S3: endpoint of an S3-compatible store.")
@click.option("--region", help="S3: region.")
@server_option
def dataset_add(name, uri, endpoint_url, region, server_url):
    """Register dataset NAME at URI: the control plane resolves and pins a snapshot."""
    options = {k: v for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v}
    with ServerClient(server_url) as c:
        d = c.call("POST", "/v1/datasets", json={"name": name, "uri": uri, "options": options})
    click.echo(f"{d['name']}: snapshot {d['revision']}, {d['files']} files, {format_size(d['bytes_total'])}")


@dataset.command("ls")
@click.option("--json", "as_json", is_flag=True)
@server_option
def dataset_ls(as_json, server_url):
    """List datasets with their snapshot and where they are placed."""
    with ServerClient(server_url) as c:
        ds = c.call("GET", "/v1/datasets")["datasets"]
    if as_json:
        click.echo(json.dumps(ds, indent=2))
        return
    click.echo(f"{'DATASET':20} {'REVISION':18} {'SIZE':>10} {'NODES':>5}  URI")
    for d in ds:
        click.echo(f"{d['name']:20} {str(d['revision'])[:18]:18} {format_size(d['bytes_total']):>10} "
                   f"{len(d['nodes']):>5}  {d['uri']}")


@dataset.command("rm")
@click.argument("name")
@server_option
def dataset_rm(name, server_url):
    """Remove dataset NAME (its assignment too: nodes unpin it)."""
    with ServerClient(server_url) as c:
        c.call("DELETE", f"/v1/datasets/{name}")
    click.echo(f"{name}: removed")


@dataset.command("update")
@click.argument("name")
@click.option("--revision", help="hf:// only: the branch, tag or commit to move to.")
@server_option
def dataset_update(name, revision, server_url):
    """Resolve a new snapshot of NAME; nodes that hold it prefetch it, then switch."""
    with ServerClient(server_url) as c:
        d = c.call("POST", f"/v1/datasets/{name}/update", json={"revision": revision} if revision else {})
    click.echo(f"{d['name']}: snapshot {d['revision']}")


@click.command()
@click.argument("name")
@click.option("--nodes", help="Comma-separated node names.")
@click.option("--selector", help="Label selector: key=value[,key=value...].")
@click.option("--replicas", type=int, help="With --selector: how many nodes (default: every matching node).")
@click.option("--spread-by", help="With --replicas: a label whose values are failure domains (zone, rack).")
@click.option("--switch-now", is_flag=True, help="New snapshots become current at once, not when complete.")
@click.option("--taint-until-ready", is_flag=True,
              help="Kubernetes: taint the nodes syncbit.io/syncing:NoSchedule until the dataset is complete there.")
@server_option
def assign(name, nodes, selector, replicas, spread_by, switch_now, taint_until_ready, server_url):
    """Put dataset NAME on nodes by name, or by label selector with replicas and spread."""
    if (nodes is None) == (selector is None):
        raise ConfigError("assign takes exactly one of --nodes and --selector")
    body = {"nodes": nodes, "selector": selector, "replicas": replicas, "spread_by": spread_by,
            "switch": "immediate" if switch_now else "complete", "taint_until_ready": taint_until_ready}
    with ServerClient(server_url) as c:
        d = c.call("PUT", f"/v1/datasets/{name}/assignment", json=body)
    placed = ", ".join(sorted(d["nodes"])) or "no node yet"
    click.echo(f"{name}: placed on {placed}")
    problem = (d.get("assignment") or {}).get("problem")
    if problem:
        click.echo(f"  note: {problem}", err=True)


@click.command()
@click.argument("name")
@server_option
def unassign(name, server_url):
    """Remove NAME's assignment: nodes unpin it (eviction may then reclaim it)."""
    with ServerClient(server_url) as c:
        c.call("DELETE", f"/v1/datasets/{name}/assignment")
    click.echo(f"{name}: unassigned")


@click.command()
@click.option("--json", "as_json", is_flag=True)
@server_option
def nodes(as_json, server_url):
    """Registered nodes: up or down, labels, free space, datasets."""
    with ServerClient(server_url) as c:
        ns = c.call("GET", "/v1/nodes")["nodes"]
    if as_json:
        click.echo(json.dumps(ns, indent=2))
        return
    click.echo(f"{'NODE':20} {'UP':4} {'FREE':>10}  LABELS")
    for n in ns:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
        click.echo(f"{n['name']:20} {'yes' if n['up'] else 'no':4} {format_size(n['free']):>10}  {labels}")


def cluster_status(server_url: str, as_json: bool) -> None:
    with ServerClient(server_url) as c:
        st = c.call("GET", "/v1/status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    names = [n["name"] for n in st["nodes"]]
    width = max([8, *map(len, names)])
    click.echo(f"{'DATASET':20} " + " ".join(f"{n:>{width}}" for n in names))
    for d in st["datasets"]:
        cells = []
        for n in names:
            p = d["nodes"].get(n)
            if p is None:
                cells.append("-")
            elif p["state"] == "syncing" and p["bytes_total"]:
                cells.append(f"{p['bytes_cached'] / p['bytes_total']:.0%}")
            else:
                cells.append(p["state"])
        click.echo(f"{d['name']:20} " + " ".join(f"{c:>{width}}" for c in cells))
        problem = (d.get("assignment") or {}).get("problem")
        if problem:
            click.echo(f"  note: {problem}")
    down = [n["name"] for n in st["nodes"] if not n["up"]]
    if down:
        click.echo(f"down: {', '.join(down)}")


@click.command()
@click.argument("name")
@click.option("--node", help="Wait for this node only (default: every node NAME is placed on).")
@click.option("--timeout", type=float, default=0, help="Give up after this many seconds (0: wait forever).")
@click.option("--server", "server_url", envvar="SYNCBIT_SERVER",
              help="Ask this control plane (or SYNCBIT_SERVER); without one, this node's agent.")
@click.option("--local", is_flag=True, help="Ask this node's agent, even when SYNCBIT_SERVER is set.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="SYNCBIT_CONFIG",
              help="Agent config, for its socket (--local).")
def wait(name, node, timeout, server_url, local, config_path):
    """Exit 0 once NAME is ready (on NODE, or everywhere it is placed); non-zero with the reason if not.

    Made for initContainers, sidecar startup probes and scripts. With
    --local (or no control plane given) it asks this node's agent over its
    socket and waits through an agent that is not running yet or has not
    been assigned NAME yet.
    """
    deadline = time.monotonic() + timeout if timeout else None
    if local or not server_url:
        if node:
            raise ConfigError("--node needs the control plane (--server or SYNCBIT_SERVER), not the local agent")
        _wait_local(name, timeout, deadline, socket_path_for_cli(config_path))
        return
    with ServerClient(server_url) as c:
        while True:
            left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
            params = {"timeout": str(left), **({"node": node} if node else {})}
            r = c.call("GET", f"/v1/datasets/{name}/wait", params=params)
            if r["state"] == "ready":
                click.echo(f"{name}: ready" + (f" on {node}" if node else ""))
                return
            if r["state"] == "failed":
                raise DatasetFailed(f"dataset {name} failed: {r['reason']}")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"dataset {name} not ready after {timeout:g}s: {r['reason']}")


def _wait_local(name: str, timeout: float, deadline: float | None, socket_path: str) -> None:
    while True:
        left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
        try:
            with AgentClient(socket_path) as c:
                d = c.dataset(name, wait=max(left, 0.01))  # long-polled by the agent
            if d["state"] == "ready":
                click.echo(f"{name}: ready on this node ({d['path']})")
                return
            if d["state"] == "failed":
                raise DatasetFailed(f"dataset {name} failed on this node: {d['error']}")
            reason = f"{d['state']}, {format_size(d['bytes_cached'])} of {format_size(d['bytes_total'])}"
        except (AgentNotRunning, DatasetNotFound) as e:
            # The agent may start after this pod, or hear of the assignment later: keep waiting.
            reason = str(e)
            time.sleep(max(0.0, min(1.0, left)))
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"dataset {name} not ready on this node after {timeout:g}s: {reason}")


def register(group: click.Group) -> None:
    for cmd in (server, dataset, assign, unassign, nodes, wait):
        group.add_command(cmd)
