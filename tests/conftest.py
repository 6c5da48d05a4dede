"""Shared fixtures: isolated environment, real HTTP origins, real agents with real mounts."""

from __future__ import annotations

import tests.hf_env  # noqa: F401  (first: before anything imports huggingface_hub)

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from syncbit.demo.origin import OriginServer
from tests.servers.hub import HubServer
from tests.servers.kube import kube_emulator, kube_emulator_server  # noqa: F401  (fixtures)
from tests.servers.proxy import FaultProxy
from tests.servers.s3 import S3Server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("SYNCBIT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def origin_factory(tmp_path):
    servers = []

    def make(root: Path) -> OriginServer:
        srv = OriginServer(root).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def tmpfs_factory(tmp_path):
    """Mount small tmpfs filesystems (root only): disks that fill up."""
    mounted = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- S3 and Hub servers, shared by the conformance suite and the mount tests --

@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_proxy(s3_server):
    proxy = FaultProxy(s3_server.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def hub():
    with HubServer(lfs_threshold=1024, page_size=5) as server:
        yield server


@pytest.fixture
def source_env(monkeypatch, s3_server, hub):
    """The environment a user would have: AWS keys for the S3 server, HF_ENDPOINT for the Hub."""
    for key, value in s3_server.credentials.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


class AgentProc:
    """A real agent process (``syncbit daemon --foreground``) with its own mount."""

    def __init__(self, base: Path, env: dict | None = None, prefix: list[str] | None = None, **config) -> None:
        self.base = base
        self.extra_env = dict(env or {})  # e.g. a test-only fault switch
        self.prefix = list(prefix or [])  # e.g. nsenter into a network namespace
        self.mnt = base / "mnt"
        self.cache = base / "cache"
        self.sock = base / "agent.sock"
        self.log_path = base / "agent.log"
        self.config = {
            "mountpoint": str(self.mnt), "cache_dir": str(self.cache), "socket": str(self.sock),
            "node_name": "test-node", "min_free_disk": "0", "log_level": "DEBUG", **config,
        }
        self.config_path = base / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBIT_")}
        env["SYNCBIT_SOCKET"] = str(self.sock)
        return {**env, **self.extra_env}

    def start(self, wait: bool = True) -> AgentProc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "syncbit", "daemon", "--foreground", "--config",
                 str(self.config_path)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env(),
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if self.sock.exists() and os.path.ismount(self.mnt):
                r = self.cli("status", check=False)
                if r.returncode == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"agent did not come up:\n{self.log()}")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "syncbit", *args], env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"syncbit {' '.join(args)} exited {r.returncode}:\n{r.stderr}\n--- agent log ---\n"
                                 f"{self.log()[-4000:]}")
        return r

    def status(self) -> dict:
        import json

        return json.loads(self.cli("status", "--json").stdout)

    def dataset(self, name: str) -> dict:
        return next(d for d in self.status()["datasets"] if d["name"] == name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ServerProc:
    """A real control plane process (``syncbit server``) on a free loopback port."""

    def __init__(self, base: Path, host: str = "127.0.0.1", prefix: list[str] | None = None, **config) -> None:
        self.base = base
        self.prefix = list(prefix or [])
        self.port = _free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = base / "server.log"
        self.config = {"listen": f"{host}:{self.port}", "db": str(base / "state.sqlite"),
                       "node_down_after": "3s", "heartbeat_interval": "0.5s", "log_level": "DEBUG", **config}
        self.config_path = base / "server.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProc:
        import httpx

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "syncbit", "server", "--config",
                                          str(self.config_path)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(self.url + "/v1/status", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"server did not come up:\n{self.log()}")

    def api(self, method: str, path: str, **kw):
        import httpx

        return httpx.request(method, self.url + path, timeout=30, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_factory(tmp_path):
    servers: list[ServerProc] = []

    def make(name: str = "server", start: bool = True, host: str = "127.0.0.1", prefix: list[str] | None = None,
             **config) -> ServerProc:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        srv = ServerProc(base, host=host, prefix=prefix, **config)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()[-6000:]


def _force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


@pytest.fixture
def agent_factory(tmp_path):
    agents: list[AgentProc] = []

    def make(name: str = "agent", start: bool = True, env: dict | None = None, prefix: list[str] | None = None,
             **config) -> AgentProc:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        a = AgentProc(base, env=env, prefix=prefix, **config)
        agents.append(a)
        return a.start() if start else a

    yield make
    for a in agents:
        a.stop()
        _force_unmount(a.mnt)
        # Unexpected crashes show up as tracebacks in the agent's log.
        assert "Traceback" not in a.log(), a.log()[-6000:]
