"""Agent configuration: YAML file, then ``SYNCBIT_*`` environment, then flags.

Built once by the entry point into a frozen ``AgentConfig`` and passed down
explicitly; nothing reads the environment at import time. Unknown keys are
errors, not ignored: a typo in a quota must not silently mean "no quota".
"""

from __future__ import annotations

import dataclasses
import os
import socket as _socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .units import parse_duration, parse_size

DEFAULT_SOCKET = "/run/syncbit/agent.sock"
DEFAULT_BLOCK_SIZE = 4 * 2**20
# Per-dataset source options a dataset entry may carry (each source checks its own).
SOURCE_OPTIONS = ("endpoint_url", "region")
_DATASET_KEYS = {"name", "uri", "pin", *SOURCE_OPTIONS}


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the agent registers at start (``datasets:`` in the config)."""

    name: str
    uri: str
    pin: bool = True
    # Source options for this dataset (S3: endpoint_url, region).
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = field(default_factory=_socket.gethostname)
    labels: Mapping[str, str] = field(default_factory=dict)
    mountpoint: str = "/datasets"
    cache_dir: str = "/var/lib/syncbit"
    # Bytes, or a fraction of the cache filesystem when given as "80%".
    cache_quota: int | float = 0.8
    cache_high_watermark: float = 0.95
    cache_low_watermark: float = 0.85
    # Never fill the cache filesystem past this many free bytes.
    min_free_disk: int = 1 * 2**30
    socket: str = DEFAULT_SOCKET
    block_size: int = DEFAULT_BLOCK_SIZE
    # Bytes fetched ahead of a sequential reader.
    readahead: int = 64 * 2**20
    # Concurrent source requests for background prefetch / for reads.
    prefetch_concurrency: int = 4
    read_concurrency: int = 8
    # A read that cannot be served within this time gets EIO.
    fetch_deadline: float = 60.0
    # Blocks written are made durable (syncfs) in a group commit this often.
    commit_interval: float = 5.0
    # Kernel readahead window for the mount (read_ahead_kb of its bdi).
    kernel_read_ahead_kb: int = 4096
    log_level: str = "INFO"
    log_format: str = "text"
    datasets: tuple[DatasetSpec, ...] = ()
    # The control plane (http://host:7070); absent: standalone.
    server: str | None = None
    heartbeat_interval: float = 5.0
    # Prometheus /metrics over TCP (host:port); the local socket serves it too.
    metrics_listen: str | None = None
    # Peers: serve blocks on this address, to agents with the same cluster secret.
    peer_listen: str | None = None
    peer_advertise: str | None = None  # what other nodes dial; default: peer_listen
    cluster_secret_file: str | None = None
    peer_upload_slots: int = 8
    # Bytes/s for all uploads to / downloads from peers together; 0: unlimited.
    peer_upload_rate: int = 0
    peer_download_rate: int = 0
    # A registry mirror (the pull subset of the OCI Distribution API) over the oci:// datasets.
    registry_mirror_listen: str | None = None
    # ... and images that are no dataset yet become one when a runtime pulls them through it.
    registry_mirror_pull_through: bool = False
    # Registries reached over plain http (besides loopback ones): "host:port,...".
    insecure_registries: tuple[str, ...] = ()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


_SIZE_KEYS = {"min_free_disk", "block_size", "readahead", "peer_upload_rate", "peer_download_rate"}
_DURATION_KEYS = {"fetch_deadline", "commit_interval", "heartbeat_interval", "node_down_after"}
_INT_KEYS = {"prefetch_concurrency", "read_concurrency", "kernel_read_ahead_kb", "peer_upload_slots"}
_FLOAT_KEYS = {"cache_high_watermark", "cache_low_watermark"}
_BOOL_KEYS = {"registry_mirror_pull_through"}
_FIELDS = {f.name for f in dataclasses.fields(AgentConfig)}


def _convert(key: str, value: Any) -> Any:
    if key in _SIZE_KEYS:
        return parse_size(value, key=key)
    if key in _DURATION_KEYS:
        return parse_duration(value, key=key)
    if key in _INT_KEYS:
        try:
            n = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if n < 1 and key != "kernel_read_ahead_kb" or n < 0:
            raise ConfigError(f"{key}: must be at least {0 if key == 'kernel_read_ahead_kb' else 1}, got {n}")
        return n
    if key in _FLOAT_KEYS:
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not 0 < v <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {v}")
        return v
    if key in _BOOL_KEYS:
        return _parse_bool(key, value)
    if key == "insecure_registries":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError("insecure_registries: expected a list of host:port")
        return tuple(i.strip() for i in items if i.strip())
    if key == "cache_quota":
        s = str(value).strip()
        try:
            share = float(s)
        except ValueError:
            share = None
        if share is not None and 0 < share <= 1 and not isinstance(value, bool):
            return share  # a share of the filesystem, as the default 0.8 is; the same from the environment
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ConfigError(f"cache_quota: cannot parse {value!r}") from None
            if not 0 < pct <= 100:
                raise ConfigError(f"cache_quota: percentage must be in (0, 100], got {s}")
            return pct / 100
        quota = parse_size(value, key=key)
        if quota <= 0:
            raise ConfigError(f"cache_quota: must be more than 0, got {value!r}")
        return quota
    if key == "labels":
        if isinstance(value, str):  # env form: "gpu=h100,zone=a"
            items = [kv for kv in value.split(",") if kv]
            bad = [kv for kv in items if "=" not in kv]
            if bad:
                raise ConfigError(f"labels: expected key=value items, got {', '.join(bad)}")
            value = dict(kv.split("=", 1) for kv in items)
        if not isinstance(value, Mapping):
            raise ConfigError("labels: expected a mapping of label -> value")
        return {str(k): str(v) for k, v in value.items()}
    if key == "datasets":
        if not isinstance(value, list):
            raise ConfigError("datasets: expected a list of {name, uri}")
        specs = []
        for item in value:
            if not isinstance(item, Mapping) or set(item) - _DATASET_KEYS or "uri" not in item or "name" not in item:
                raise ConfigError(f"datasets: each entry needs name and uri (and optionally "
                                  f"{', '.join(sorted(_DATASET_KEYS - {'name', 'uri'}))}), got {item!r}")
            options = {k: str(item[k]) for k in SOURCE_OPTIONS if item.get(k) is not None}
            pin = _parse_bool("datasets: pin", item.get("pin", True))
            specs.append(DatasetSpec(str(item["name"]), str(item["uri"]), pin, options))
        return tuple(specs)
    if key == "log_format" and value not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {value!r}")
    if key == "log_level":
        if not isinstance(value, str) or value.upper() not in _LOG_LEVELS:
            raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
        return value.upper()
    if key == "server":
        return check_server_url(str(value))
    if key in ("listen", "metrics_listen", "peer_listen", "peer_advertise", "registry_mirror_listen"):
        return check_listen(str(value), key)
    if value is None or not isinstance(value, str | int | float) or isinstance(value, bool):
        # YAML's empty value, a list or a mapping: str() would make a path of "None" or "['a', 'b']"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return str(value).lower() in ("true", "1", "yes")


def check_server_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server: expected http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def check_listen(value: str, key: str = "listen") -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return value


def _read_yaml(path: str | os.PathLike, fields: set[str]) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    unknown = {str(k) for k in raw} - fields
    if unknown:
        raise ConfigError(f"config {path}: unknown keys: {', '.join(sorted(unknown))}")
    return dict(raw)


def load_agent_config(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """File, then ``SYNCBIT_<KEY>`` environment, then ``overrides`` (flags)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(path, _FIELDS))
    for key in _FIELDS - {"datasets"}:
        env_value = env.get(f"SYNCBIT_{key.upper()}")
        if env_value is not None:
            values[key] = env_value
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key}")
        if value is not None:
            values[key] = value
    converted = {k: _convert(k, v) for k, v in values.items()}
    cfg = AgentConfig(**converted)
    if cfg.cache_low_watermark >= cfg.cache_high_watermark:
        raise ConfigError("cache_low_watermark must be below cache_high_watermark")
    if cfg.block_size < 64 * 1024 or cfg.block_size > 256 * 2**20:
        raise ConfigError("block_size must be between 64KiB and 256MiB")
    if cfg.peer_listen and not (cfg.cluster_secret_file and cfg.server):
        raise ConfigError("peer_listen needs cluster_secret_file (peers authenticate) and server (the tracker)")
    if cfg.peer_listen and not cfg.peer_advertise and cfg.peer_listen.rpartition(":")[0] in ("0.0.0.0", "::", "[::]"):
        raise ConfigError("peer_listen on a wildcard address needs peer_advertise: the address other nodes dial")
    return cfg


def socket_path_for_cli(config_path: str | None, env: Mapping[str, str] | None = None) -> str:
    """Where the CLI finds the agent: --config, SYNCBIT_CONFIG, SYNCBIT_SOCKET, default."""
    env = os.environ if env is None else env
    config_path = config_path or env.get("SYNCBIT_CONFIG")
    if config_path:
        return load_agent_config(config_path, env=env).socket
    return env.get("SYNCBIT_SOCKET", DEFAULT_SOCKET)


@dataclass(frozen=True)
class KubernetesConfig:
    """``kubernetes:`` in the server config: node labels, taints, the pod webhook (docs/kubernetes.md)."""

    enabled: bool = False
    # Empty: the in-cluster service account, then $KUBECONFIG / ~/.kube/config.
    kubeconfig: str = ""
    # The agents' mount on the host, given to pods as a hostPath.
    mount_root: str = "/datasets"
    webhook_listen: str = "0.0.0.0:8443"
    # The MutatingWebhookConfiguration whose caBundle the server sets to its own CA.
    webhook_name: str = "syncbit"
    webhook_dns_names: tuple[str, ...] = ("syncbit-server.syncbit.svc",)
    # A certificate mounted from a Secret instead of a generated one (then nothing is patched).
    webhook_cert_file: str = ""
    webhook_key_file: str = ""


_KUBE_FIELDS = {f.name for f in dataclasses.fields(KubernetesConfig)}


def _kubernetes_config(value: Any, env: Mapping[str, str]) -> KubernetesConfig:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError("kubernetes: expected a mapping (enabled, kubeconfig, webhook_listen, ...)")
    unknown = {str(k) for k in value} - _KUBE_FIELDS
    if unknown:
        raise ConfigError(f"kubernetes: unknown keys: {', '.join(sorted(unknown))}")
    values = dict(value)
    for key in _KUBE_FIELDS:
        env_value = env.get(f"SYNCBIT_KUBERNETES_{key.upper()}")
        if env_value is not None:
            values[key] = env_value
    out: dict[str, Any] = {}
    for key, v in values.items():
        if key == "enabled":
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"kubernetes.enabled: expected true or false, got {v!r}")
                v = v.lower() in ("true", "1", "yes")
            out[key] = bool(v)
        elif key == "webhook_dns_names":
            names = v.split(",") if isinstance(v, str) else v
            if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError("kubernetes.webhook_dns_names: expected a list of DNS names")
            out[key] = tuple(n.strip() for n in names)
        elif key == "webhook_listen":
            out[key] = check_listen(str(v), "kubernetes.webhook_listen")
        else:
            out[key] = "" if v is None else str(v)
    cfg = KubernetesConfig(**out)
    if bool(cfg.webhook_cert_file) != bool(cfg.webhook_key_file):
        raise ConfigError("kubernetes: webhook_cert_file and webhook_key_file go together")
    return cfg


@dataclass(frozen=True)
class ServerConfig:
    """The control plane's configuration (``syncbit server --config``)."""

    listen: str = "0.0.0.0:7070"
    db: str = "/var/lib/syncbit-server/state.sqlite"
    # A node with no heartbeat for this long is down and its replicas move.
    node_down_after: float = 30.0
    # What agents are told to use (their own heartbeat_interval is the first guess).
    heartbeat_interval: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    # Registries reached over plain http (besides loopback ones), for oci:// datasets.
    insecure_registries: tuple[str, ...] = ()
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)


_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


def load_server_config(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    env = os.environ if env is None else env
    values: dict[str, Any] = _read_yaml(path, _SERVER_FIELDS) if path is not None else {}
    for key in _SERVER_FIELDS - {"kubernetes"}:
        env_value = env.get(f"SYNCBIT_{key.upper()}")
        if env_value is not None:
            values[key] = env_value
    for key, value in (overrides or {}).items():
        if key not in _SERVER_FIELDS:
            raise ConfigError(f"unknown setting {key}")
        if value is not None:
            values[key] = value
    kube = _kubernetes_config(values.pop("kubernetes", None), env)
    return ServerConfig(**{k: _convert(k, v) for k, v in values.items()}, kubernetes=kube)


def export_insecure_registries(registries: tuple[str, ...]) -> None:
    """Make the ``insecure_registries`` setting visible to oci:// sources, which read it
    where every key can also be given: ``SYNCBIT_INSECURE_REGISTRIES``."""
    if registries:
        os.environ["SYNCBIT_INSECURE_REGISTRIES"] = ",".join(registries)
