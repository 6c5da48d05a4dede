#!/usr/bin/env python3
"""OCI benchmark: ``skopeo copy`` through an agent's registry mirror, cold and warm, against straight
from the registry, same run.

Run as root with the venv's interpreter (FUSE, ``drop_caches``)::

    /work/venv/bin/python tools/bench/oci_bench.py [--size 1GiB] [--repeat 3] [--workdir /tmp] [--keep]

The issue it answers (7): "A 1 GiB single-layer image: skopeo copy through the
agent mirror, cold and warm, vs. skopeo copy straight from the registry, same
run."

The registry is Debian's ``docker-registry`` on loopback
(``tests/servers/registry.py``); the image is one uncompressed layer of
``--size`` random bytes (random: compression would measure gzip). Each
repetition, after ``sync`` + ``drop_caches`` before every contestant:

1. baseline: ``skopeo copy docker://REGISTRY/bench/big:v1 oci:DIR:v1``;
2. cold: a fresh agent (empty cache, ``registry_mirror_listen``) registers
   ``oci://REGISTRY/bench/big:v1`` unpinned (no background prefetch: every
   byte is pulled by skopeo's reads through the mirror), then
   ``skopeo copy docker://MIRROR/bench/big:v1 oci:DIR:v1``; timed from the
   registration (it resolves the manifest) to the end of the copy;
3. warm: the same copy again from the same agent (everything cached, page
   cache dropped).

Every copy's layer is checked against the pushed digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests/servers/registry.py is not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import SyncbitAgent, drop_caches, log, median, parse_size  # noqa: E402

from tests.conftest import _free_port  # noqa: E402
from tests.servers.registry import RegistryServer, build_image, build_layer  # noqa: E402


def skopeo_copy(src: str, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.monotonic()
    # --preserve-digests: skopeo would otherwise compress the layer on the way (measuring gzip).
    subprocess.run(["skopeo", "copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{src}",
                    f"oci:{dest}:v1"],
                   check=True, capture_output=True, text=True, timeout=1800)
    return time.monotonic() - t0


def check_copy(dest: Path, layer_digest: str) -> None:
    h = hashlib.sha256()
    with open(dest / "blobs" / "sha256" / layer_digest[7:], "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    if "sha256:" + h.hexdigest() != layer_digest:
        raise SystemExit(f"the copy in {dest} does not match {layer_digest}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install docker-registry skopeo)")
    work = Path(tempfile.mkdtemp(prefix="oci-bench-", dir=args.workdir))
    reg = RegistryServer(work / "registry").start()
    times: dict[str, list[float]] = {"registry": [], "cold": [], "warm": []}
    try:
        log(f"building and pushing a {args.size / 2**20:.0f} MiB single-layer image")
        with open("/dev/urandom", "rb") as f:
            payload = f.read(args.size)
        layer = build_layer({"blob.bin": payload}, compress=False)
        del payload
        image = build_image([layer])
        reg.push("bench/big", image, "v1")
        digest, size = layer.digest, layer.size
        del image, layer
        for rep in range(args.repeat):
            drop_caches()
            t = skopeo_copy(f"{reg.address}/bench/big:v1", work / "direct")
            check_copy(work / "direct", digest)
            times["registry"].append(t)
            shutil.rmtree(work / "direct")

            mirror = f"127.0.0.1:{_free_port()}"
            agent = SyncbitAgent(work / f"mnt{rep}", work / f"cache{rep}", work / f"agent{rep}.sock")
            agent.env["SYNCBIT_REGISTRY_MIRROR_LISTEN"] = mirror
            agent.start()
            try:
                drop_caches()
                t0 = time.monotonic()
                agent.register(f"oci://{reg.address}/bench/big:v1", "big", pin=False)
                copy_time = skopeo_copy(f"{mirror}/bench/big:v1", work / "cold")
                times["cold"].append(time.monotonic() - t0)
                check_copy(work / "cold", digest)
                shutil.rmtree(work / "cold")
                drop_caches()
                times["warm"].append(skopeo_copy(f"{mirror}/bench/big:v1", work / "warm"))
                check_copy(work / "warm", digest)
                shutil.rmtree(work / "warm")
            finally:
                agent.stop()
            log(f"rep {rep + 1}: registry {times['registry'][-1]:.2f}s, cold {times['cold'][-1]:.2f}s "
                f"(copy {copy_time:.2f}s), warm {times['warm'][-1]:.2f}s")
    finally:
        reg.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = median(times["registry"])
    print(f"\n{size / 2**20:.0f} MiB single-layer image, skopeo copy to an OCI directory, "
          f"{args.repeat} repetitions (median [min-max]); page cache dropped before each")
    print(f"{'path':44} {'time s':>22} {'MB/s':>8} {'x registry':>11}")
    for key, label in (("registry", "straight from the registry (baseline)"),
                       ("cold", "through the agent mirror, cold"), ("warm", "through the agent mirror, warm")):
        xs = times[key]
        m = median(xs)
        print(f"{label:44} {m:8.2f} [{min(xs):.2f}-{max(xs):.2f}] {size / m / 1e6:8.0f} {base / m:11.2f}")
    print(json.dumps({k: v for k, v in times.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
