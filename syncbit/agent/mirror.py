"""A node-local OCI registry mirror: the pull subset of the Distribution API over this agent's datasets.

Container runtimes pull through it (containerd ``hosts.toml``, CRI-O
``registries.conf``; docs/oci.md): ``/v2/``, manifests by tag and digest,
blobs, HEAD and Range. What it serves are the ``oci://`` datasets of this
agent, read from the agent's own mount: the same read path as any program
(cache, then peers, then the upstream registry, every blob checked against
its digest), so an image assigned ahead of time is served with the upstream
gone.

The upstream of a request is containerd's ``?ns=registry`` parameter, or a
first path component that looks like a host (CRI-O's
``location = "mirror/registry"``); without either, any dataset of that
repository matches. With ``registry_mirror_pull_through``, an image that is
no dataset yet becomes one (unpinned: eviction may reclaim it) on its first
manifest request, when its upstream is known.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import SyncbitError
from ..sources.oci import parse_oci
from .datasets import READY

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


class _BlobResponse(FileResponse):
    # 1 MiB reads (Starlette's default is 64 KiB): each read is a FUSE request to this process.
    chunk_size = 1024 * 1024


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "message": message}]}, status_code=status, headers=_API_VERSION)


def split_upstream(name: str, ns: str | None) -> tuple[str | None, str]:
    """(upstream registry or None, repository) of a mirror request's repository name."""
    if ns:
        return ns, name
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


class Mirror:
    def __init__(self, agent: Agent, pull_through: bool = False) -> None:
        self.agent = agent
        self.pull_through = pull_through

    def _candidates(self, upstream: str | None, repo: str) -> list[tuple[str, str | None, str | None]]:
        """(dataset, tag, digest) of this agent's oci:// datasets of ``repo`` (at ``upstream``)."""
        out = []
        for ds in self.agent.datasets.values():
            if ds.snapshot is None or not ds.uri.startswith("oci://"):
                continue
            registry, ds_repo, tag, digest = parse_oci(ds.uri)
            if ds_repo == repo and (upstream is None or registry == upstream):
                out.append((ds.name, tag, digest))
        return out

    def _path(self, dataset: str, rel: str) -> str:
        return os.path.join(self.agent.config.mountpoint, dataset, rel)

    def _has(self, dataset: str, rel: str) -> bool:
        snap = self.agent.datasets[dataset].snapshot
        return snap is not None and any(f.path == rel for f in snap.files)

    async def manifest(self, request: Request) -> Response:
        name, ref = request.path_params["name"], request.path_params["ref"]
        upstream, repo = split_upstream(name, request.query_params.get("ns"))
        candidates = self._candidates(upstream, repo)
        if not any(ref in (tag, digest) for _, tag, digest in candidates) and not _DIGEST.match(ref) \
                and self.pull_through and upstream is not None:
            candidates = await self._pull_through(upstream, repo, ref) or candidates
        for dataset, tag, digest in candidates:
            if _DIGEST.match(ref):
                rel = f"blobs/sha256/{ref[7:]}"
                if not self._has(dataset, rel):
                    continue
                media_type = await self._media_type(dataset, rel)
                return self._file(request, dataset, rel, ref, media_type)
            if ref in (tag, digest):
                self._prefetch(dataset)
                entry = await self._index_entry(dataset)
                rel = f"blobs/sha256/{entry['digest'][7:]}"
                return self._file(request, dataset, rel, entry["digest"], entry["mediaType"])
        return _error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {name}:{ref} is not an image this node holds"
                      + ("" if self.pull_through else " (pull-through is off)"))

    async def blob(self, request: Request) -> Response:
        name, digest = request.path_params["name"], request.path_params["digest"]
        if not _DIGEST.match(digest):
            return _error(400, "DIGEST_INVALID", f"{digest!r} is not a sha256 digest")
        upstream, repo = split_upstream(name, request.query_params.get("ns"))
        rel = f"blobs/sha256/{digest[7:]}"
        for dataset, _, _ in self._candidates(upstream, repo):
            if self._has(dataset, rel):
                return self._file(request, dataset, rel, digest, "application/octet-stream")
        return _error(404, "BLOB_UNKNOWN", f"blob unknown: {digest} is in no image of {name} this node holds")

    def _file(self, request: Request, dataset: str, rel: str, digest: str, media_type: str) -> Response:
        # Read through the mount in worker threads: the FUSE requests come back to this
        # process's loop, which keeps serving them meanwhile (never a read on the loop itself).
        headers = {**_API_VERSION, "Docker-Content-Digest": digest}
        return _BlobResponse(self._path(dataset, rel), media_type=media_type, headers=headers)

    def _prefetch(self, dataset: str) -> None:
        """A runtime that asked for the manifest is about to ask for every blob: fetch them all now,
        in parallel runs, rather than each as the runtime's reads reach it."""
        ds = self.agent.datasets[dataset]
        if ds.prefetch_scope is None and ds.state != READY:
            self.agent.start_prefetch(ds)

    async def _index_entry(self, dataset: str) -> dict:
        text = await trio.to_thread.run_sync(lambda: open(self._path(dataset, "index.json"), "rb").read())
        return json.loads(text)["manifests"][0]

    async def _media_type(self, dataset: str, rel: str) -> str:
        def read() -> str:
            with open(self._path(dataset, rel), "rb") as f:
                data = f.read(4 * 2**20 + 1)
            try:
                return json.loads(data).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
            except (ValueError, AttributeError):
                return "application/octet-stream"
        return await trio.to_thread.run_sync(read)

    async def _pull_through(self, upstream: str, repo: str, ref: str) -> list:
        uri = f"oci://{upstream}/{repo}:{ref}"
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"mirror-{upstream}-{repo}-{ref}").strip("-.")[:128]
        try:
            await self.agent.add_dataset(name, uri, pin=False)
        except SyncbitError as e:
            log.warning("registry mirror: cannot pull %s through: %s", uri, e)
            return []
        log.info("registry mirror: %s is now dataset %s (pulled through)", uri, name)
        return [(name, ref, None)]

    def app(self) -> Starlette:
        async def base(request: Request) -> Response:
            return JSONResponse({}, headers=_API_VERSION)

        return Starlette(routes=[
            Route("/v2/", base, methods=["GET", "HEAD"]),
            Route("/v2/{name:path}/manifests/{ref}", self.manifest, methods=["GET", "HEAD"]),
            Route("/v2/{name:path}/blobs/{digest}", self.blob, methods=["GET", "HEAD"]),
        ])


async def serve_mirror(agent: Agent, listen: str, pull_through: bool, *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = HypercornConfig()
    cfg.bind = [listen]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("syncbit.agent.mirror.http")
    cfg.graceful_timeout = 1.0
    await serve(Mirror(agent, pull_through).app(), cfg, task_status=task_status)
