"""Agent commands: daemon/mount (start), pull, prefetch, status, evict, unmount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click

from ..config import AgentConfig, load_agent_config, socket_path_for_cli
from ..errors import AgentNotRunning, DatasetFailed, MountError
from ..units import format_size
from .client import AgentClient

# The agent's worker threads (source bodies, hashing, block files) spend
# most of their time in calls that release the GIL and need it back for a
# few lines of Python in between; while the trio thread runs Python, each
# waits up to the switch interval (5 ms by default: measured here, a 2 ms
# GIL-free call returned after 7.4 ms next to a busy thread). At 1 ms a cold
# read through the mount went from 0.71 to 0.77 of curl (5 paired runs),
# cached reads unchanged (docs/performance.md).
GIL_SWITCH_INTERVAL = 0.001

_config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                              envvar="SYNCBIT_CONFIG", help="Agent config (YAML).")


def _raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one, as daemons do.

    The cache keeps up to OPEN_BLOCK_FILES block files open; with the usual
    soft limit of 1024 that left the agent no descriptor for anything else
    (the cache sizes its table from the limit in any case).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # a container that forbids it: the cache uses half of what there is


def _run_agent(cfg: AgentConfig, foreground: bool, argv: list[str]) -> None:
    if foreground:
        import trio

        from ..agent.agent import Agent
        from ..logs import setup_logging

        setup_logging(cfg.log_level, cfg.log_format)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        _raise_fd_limit()
        trio.run(Agent(cfg).run)
        return
    _detach(cfg, argv)


def _detach(cfg: AgentConfig, argv: list[str]) -> None:
    """Start the agent in its own session and return once its mount is live."""
    os.makedirs(cfg.cache_dir, exist_ok=True)
    log_path = os.path.join(cfg.cache_dir, "agent.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncbit", *argv, "--foreground"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    deadline = time.monotonic() + 60
    with AgentClient(cfg.socket) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = open(log_path, errors="replace").read()[-2000:]
                err = MountError(f"the agent exited with status {proc.returncode}; its log {log_path} ends:\n{tail}")
                if 0 < proc.returncode < 128:
                    err.exit_code = proc.returncode  # its own reason (11: already running, 2: config...)
                raise err
            try:
                if client.status().get("pid") == proc.pid:  # ours, not another agent on that socket
                    click.echo(f"agent {proc.pid} is serving {cfg.mountpoint} (log: {log_path})")
                    return
            except AgentNotRunning:
                pass
            time.sleep(0.1)
    proc.terminate()
    raise MountError(f"the agent did not come up within 60s; see {log_path}")


@click.command()
@_config_option
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd, containers, tests).")
@click.option("--mountpoint", help="Where datasets appear (default /datasets).")
@click.option("--cache-dir", help="Block cache directory.")
@click.option("--socket", help="Local API socket.")
@click.option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")
def daemon(config_path, foreground, mountpoint, cache_dir, socket, log_level):
    """Run the agent: FUSE mount, block cache, prefetcher and local API."""
    cfg = load_agent_config(config_path, overrides={
        "mountpoint": mountpoint, "cache_dir": cache_dir, "socket": socket, "log_level": log_level})
    argv = ["daemon"] + (["--config", config_path] if config_path else []) + _flags(
        mountpoint=mountpoint, cache_dir=cache_dir, socket=socket, log_level=log_level)
    _run_agent(cfg, foreground, argv)


@click.command()
@click.argument("mountpoint")
@click.option("--cache-dir", required=True, help="Block cache directory.")
@click.option("--cache-quota", help="Cache quota: a size (50GiB) or a share of the filesystem (80%).")
@click.option("--socket", help="Local API socket (default /run/syncbit/agent.sock).")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached.")
@click.option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")
def mount(mountpoint, cache_dir, cache_quota, socket, foreground, log_level):
    """Start an agent with defaults, serving MOUNTPOINT from the cache in --cache-dir."""
    cfg = load_agent_config(None, overrides={
        "mountpoint": os.path.abspath(mountpoint), "cache_dir": os.path.abspath(cache_dir),
        "cache_quota": cache_quota, "socket": socket, "log_level": log_level})
    argv = ["mount", cfg.mountpoint] + _flags(cache_dir=cfg.cache_dir, cache_quota=cache_quota,
                                               socket=socket, log_level=log_level)
    _run_agent(cfg, foreground, argv)


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _client(config_path: str | None) -> AgentClient:
    return AgentClient(socket_path_for_cli(config_path))


@click.command()
@click.argument("uri")
@click.option("--name", help="Dataset name (default: the last part of the URI).")
@click.option("--no-wait", is_flag=True, help="Register and start prefetching, then return.")
@click.option("--endpoint-url", help="S3: endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL, then AWS).")
@click.option("--region", help="S3: region (default: AWS_REGION / the AWS config).")
@_config_option
def pull(uri, name, no_wait, endpoint_url, region, config_path):
    """Register the dataset at URI, prefetch it with progress, print its path."""
    if "://" not in uri and os.path.exists(uri):
        uri = os.path.abspath(uri)
    options = {k: v for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v}
    with _client(config_path) as client:
        ds = client.pull(uri, name, options)
        if not no_wait:
            ds = _wait_with_progress(client, ds)
    click.echo(ds["path"])


def _wait_with_progress(client: AgentClient, ds: dict) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=True, console=_stderr_console()) as progress:
        task = progress.add_task(ds["name"], total=ds["bytes_total"], completed=ds["bytes_cached"])
        while ds["state"] not in ("ready", "failed"):
            ds = client.dataset(ds["name"], wait=0.5)
            progress.update(task, completed=ds["bytes_cached"])
    if ds["state"] == "failed":
        raise DatasetFailed(f"dataset {ds['name']} failed: {ds['error']}")
    click.echo(f"{ds['name']}: {format_size(ds['bytes_total'])} in {ds['files']} files, ready", err=True)
    return ds


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@click.command()
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Start prefetching and return.")
@_config_option
def prefetch(name, no_wait, config_path):
    """Pin dataset NAME and fetch all of it into the cache."""
    with _client(config_path) as client:
        ds = client.prefetch(name)
        if not no_wait:
            ds = _wait_with_progress(client, ds)
    click.echo(ds["path"])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (shape in docs/cli.md).")
@click.option("--server", "server_url", envvar="SYNCBIT_SERVER",
              help="Show the cluster (node x dataset) from this control plane (or SYNCBIT_SERVER).")
@click.option("--local", is_flag=True, help="This node's agent, even when SYNCBIT_SERVER is set.")
@_config_option
def status(as_json, server_url, local, config_path):
    """This agent's datasets and cache; or, with --server, the cluster's node x dataset matrix."""
    if server_url and not local:
        from .server_cmds import cluster_status

        cluster_status(server_url, as_json)
        return
    with _client(config_path) as client:
        st = client.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    c = st["cache"]
    click.echo(f"node {st['node_name']}  mount {st['mountpoint']}")
    click.echo(f"cache {c['dir']}: {format_size(c['bytes'])} of {format_size(c['quota'])} quota, "
               f"{c['blocks']} blocks, hit ratio {c['hit_ratio']:.1%}, {c['evicted_blocks']} evicted")
    if not st["datasets"]:
        click.echo("no datasets")
        return
    click.echo(f"{'DATASET':20} {'STATE':8} {'REVISION':18} {'CACHED':>22}  PIN  SOURCE")
    for d in st["datasets"]:
        pct = d["bytes_cached"] / d["bytes_total"] if d["bytes_total"] else 1.0
        cached = f"{format_size(d['bytes_cached'])}/{format_size(d['bytes_total'])} {pct:4.0%}"
        click.echo(f"{d['name']:20} {d['state']:8} {str(d['revision'])[:18]:18} {cached:>22}  "
                   f"{'yes' if d['pinned'] else 'no':4} {d['uri']}")
        if d["error"]:
            click.echo(f"  error: {d['error']}")


@click.command()
@click.argument("name")
@_config_option
def evict(name, config_path):
    """Unpin dataset NAME and drop its cached blocks (it stays readable, lazily)."""
    with _client(config_path) as client:
        r = client.evict(name)
    click.echo(f"{name}: freed {format_size(r['freed_bytes'])}")


@click.command()
@_config_option
def unmount(config_path):
    """Stop the agent cleanly; its mount goes away."""
    with _client(config_path) as client:
        client.shutdown()
        sock = client.socket_path
    deadline = time.monotonic() + 30
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.1)
    click.echo("agent stopped")


def register(group: click.Group) -> None:
    for cmd in (daemon, mount, pull, prefetch, status, evict, unmount):
        group.add_command(cmd)
    group.add_command(daemon, name="agent")
