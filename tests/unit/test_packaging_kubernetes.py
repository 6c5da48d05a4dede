"""The Kubernetes example manifests: they parse, their agent config loads as the DaemonSet gives it, and
every `syncbit` command line in them is one the CLI accepts (no cluster here: see docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from syncbit.cli.main import cli
from syncbit.config import load_agent_config

MANIFESTS = sorted((Path(__file__).parents[2] / "packaging" / "kubernetes").glob("*.yaml"))


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec) if doc["kind"] != "Pod" else spec
    return pod.get("initContainers", []) + pod.get("containers", [])


def syncbit_commands():
    for name, doc in documents():
        for c in containers(doc):
            for argv in (c.get("command"), c.get("startupProbe", {}).get("exec", {}).get("command"),
                         c.get("readinessProbe", {}).get("exec", {}).get("command")):
                if argv and argv[0] == "syncbit":
                    yield name, c["name"], argv[1:]


def test_there_are_manifests_for_the_agent_the_server_and_both_ways_of_waiting():
    kinds = {(name, doc["kind"]) for name, doc in documents()}
    assert {("agent-daemonset.yaml", "DaemonSet"), ("server.yaml", "Deployment"), ("server.yaml", "Service"),
            ("pod-init-container.yaml", "Pod"), ("pod-sidecar.yaml", "Pod")} <= kinds


@pytest.mark.parametrize("manifest,container,args", list(syncbit_commands()))
def test_every_syncbit_command_line_parses(manifest, container, args):
    # Parsing only: the command's options and arguments are checked, nothing runs.
    ctx = cli.make_context("syncbit", list(args), resilient_parsing=False)
    sub = cli.get_command(ctx, args[0])
    assert sub is not None, f"{manifest}/{container}: no command {args[0]!r}"
    try:
        sub.make_context(args[0], list(args[1:]))
    except click.UsageError as e:
        pytest.fail(f"{manifest}/{container}: {' '.join(args)}: {e}")


def test_the_daemonset_agent_config_loads_with_the_node_name_from_the_downward_api(tmp_path):
    cm = next(doc for name, doc in documents() if doc["kind"] == "ConfigMap")
    secret = tmp_path / "cluster.secret"
    secret.write_text("s" * 32)
    path = tmp_path / "agent.yaml"
    path.write_text(cm["data"]["agent.yaml"].replace("/etc/syncbit/cluster.secret", str(secret)))
    ds = next(doc for name, doc in documents() if doc["kind"] == "DaemonSet")
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SYNCBIT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    config = load_agent_config(str(path), env={"SYNCBIT_NODE_NAME": "node-7",
                                               "SYNCBIT_PEER_ADVERTISE": "10.0.0.7:7071"})
    assert (config.node_name, config.peer_advertise, config.mountpoint) == ("node-7", "10.0.0.7:7071", "/datasets")
    mounts = {m["mountPath"]: m for m in ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/datasets"]["mountPropagation"] == "Bidirectional"
    assert config.socket.startswith("/run/syncbit/")  # the directory pods get through a hostPath


def test_pods_mount_the_datasets_read_only_with_host_to_container_propagation():
    for name, doc in documents():
        if doc["kind"] != "Pod":
            continue
        main = doc["spec"]["containers"][0]
        mount = next(m for m in main["volumeMounts"] if m["mountPath"] == "/datasets")
        assert mount["readOnly"] is True and mount["mountPropagation"] == "HostToContainer", name
