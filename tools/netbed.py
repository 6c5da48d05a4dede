"""A multi-host test bed on one machine: network namespaces on a bridge, links shaped with tc.

Each host is a network namespace with one veth interface (``eth0``,
``10.X.0.N/24``, X derived from the prefix) whose other end is a port of a
bridge in the root namespace (which gets ``.254``, so tests can reach every
host).
Bandwidth is shaped with ``tbf`` on both ends of each veth (the kernel here
has no ``netem``: no delay or loss). Processes run with
``nsenter --net=/run/netns/NAME``, which changes only the network namespace:
FUSE mounts made inside stay visible to the test (``ip netns exec`` would give
them a private mount namespace).

Needs root, ``ip`` and ``tc``. Everything is removed on ``close()``, also after
a failed run: names carry a prefix, and stale ones from a killed run are
removed at the start.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth_host: str  # inside the namespace, named eth0
    veth_bridge: str  # the bridge port, in the root namespace

    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]


class NetBed:
    def __init__(self, prefix: str = "sb", rate: str = "200mbit", subnet: str | None = None) -> None:
        self.prefix = prefix
        self.rate = rate
        # One /24 per prefix, so that two beds (a test and a benchmark) can coexist.
        self.subnet = subnet or f"10.{77 + sum(prefix.encode()) % 100}.0"
        self.bridge = f"{prefix}br0"
        self.hosts: dict[str, Host] = {}
        self._cleanup_stale()
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")

    def _cleanup_stale(self) -> None:
        for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-"):
                _sh("ip", "netns", "del", name, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
            if name.startswith(self.prefix) and name[len(self.prefix):-1].isdigit():
                _sh("ip", "link", "del", name, check=False)  # a veth left by a killed run

    def add_host(self, name: str, rate: str | None = None) -> Host:
        n = len(self.hosts) + 1
        host = Host(name, f"{self.prefix}-{name}", f"{self.subnet}.{n}", f"{self.prefix}{n}h", f"{self.prefix}{n}b")
        _sh("ip", "netns", "add", host.netns)
        _sh("ip", "link", "add", host.veth_host, "type", "veth", "peer", "name", host.veth_bridge)
        _sh("ip", "link", "set", host.veth_bridge, "master", self.bridge)
        _sh("ip", "link", "set", host.veth_bridge, "up")
        _sh("ip", "link", "set", host.veth_host, "netns", host.netns)
        ns = ["ip", "-n", host.netns]
        _sh(*ns, "link", "set", host.veth_host, "name", "eth0")
        _sh(*ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _sh(*ns, "link", "set", "eth0", "up")
        _sh(*ns, "link", "set", "lo", "up")
        self.hosts[name] = host
        self.shape(host, rate or self.rate)
        return host

    def shape(self, host: Host, rate: str) -> None:
        """Limit the host's link to ``rate`` each way (tbf on both ends of its veth)."""
        tbf = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
        _sh("tc", "-n", host.netns, "qdisc", "replace", "dev", "eth0", *tbf)  # what the host sends
        _sh("tc", "qdisc", "replace", "dev", host.veth_bridge, *tbf)  # what it receives

    def link(self, host: Host, up: bool) -> None:
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up" if up else "down")

    def close(self) -> None:
        for host in self.hosts.values():
            _sh("ip", "netns", "del", host.netns, check=False)  # deletes its veth pair too
        _sh("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
