"""The agent's local API: HTTP+JSON on a Unix socket (mode 0600).

Starlette for routing, served by hypercorn's trio worker inside the agent's
nursery. Errors travel as ``{"error": <SyncbitError class>, "message": ...}``
so the CLI can rebuild them with their exit codes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigError, DatasetNotFound, SyncbitError
from .datasets import FAILED, READY

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)


def _error(e: SyncbitError, status: int = 400) -> JSONResponse:
    if isinstance(e, DatasetNotFound):
        status = 404
    return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=status)


def build_app(agent: Agent) -> Starlette:
    async def status(request: Request):
        return JSONResponse(agent.status())

    async def add_dataset(request: Request):
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("uri"), str):
                raise ConfigError("request needs a JSON object with a 'uri' string")
            options = body.get("options") or {}
            if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
                raise ConfigError("'options' must be an object of strings")
            ds = await agent.add_dataset(body.get("name"), body["uri"], pin=bool(body.get("pin", True)),
                                         options=options)
            return JSONResponse(agent.dataset_status(ds))
        except json.JSONDecodeError:
            return _error(ConfigError("request body is not JSON"))
        except SyncbitError as e:
            return _error(e)
        except ClientDisconnect:  # the CLI went away mid-request: nobody to answer
            return Response(status_code=499)

    async def get_dataset(request: Request):
        try:
            ds = agent.get(request.path_params["name"])
            # Long-poll: ?wait=S returns early when the state changes.
            wait = float(request.query_params.get("wait", 0))
            if wait > 0 and ds.state not in (READY, FAILED):
                with trio.move_on_after(min(wait, 30)):
                    await ds.changed.wait()
            return JSONResponse(agent.dataset_status(ds))
        except SyncbitError as e:
            return _error(e)

    async def prefetch(request: Request):
        try:
            ds = agent.get(request.path_params["name"])
            agent.pin(ds)
            return JSONResponse(agent.dataset_status(ds))
        except SyncbitError as e:
            return _error(e)

    async def evict(request: Request):
        try:
            freed = await agent.evict(request.path_params["name"])
            return JSONResponse({"freed_bytes": freed, **agent.dataset_status(agent.get(request.path_params["name"]))})
        except SyncbitError as e:
            return _error(e)

    async def shutdown(request: Request):
        # Answer first, then stop: cancelling now would cut this response.
        agent.shutdown(delay=0.2)
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/metrics", metrics_endpoint(agent)),
        Route("/v1/status", status),
        Route("/v1/datasets", add_dataset, methods=["POST"]),
        Route("/v1/datasets/{name}", get_dataset),
        Route("/v1/datasets/{name}/prefetch", prefetch, methods=["POST"]),
        Route("/v1/datasets/{name}/evict", evict, methods=["POST"]),
        Route("/v1/shutdown", shutdown, methods=["POST"]),
    ])


def metrics_endpoint(agent: Agent):
    async def metrics(request: Request):
        from ..metrics import render

        return Response(render(agent), media_type="text/plain; version=0.0.4")
    return metrics


def health_endpoints(agent: Agent):
    """``/healthz``: the agent's loop answers. ``/readyz``: and its FUSE mount is in the mount table."""
    async def healthz(request: Request):
        return Response("ok\n", media_type="text/plain")

    async def readyz(request: Request):
        from .mountpoint import mount_entry

        # In a thread: resolving the mountpoint's path is a FUSE request to this very loop.
        entry = await trio.to_thread.run_sync(mount_entry, agent.config.mountpoint)
        if entry is None or entry[1] != "fuse.syncbit":
            return Response(f"not mounted at {agent.config.mountpoint}\n", status_code=503, media_type="text/plain")
        return Response("ok\n", media_type="text/plain")
    return [Route("/healthz", healthz), Route("/readyz", readyz)]


async def serve_metrics(agent: Agent, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``/metrics`` and the health probes over TCP (Prometheus, kubelet); the API stays on its socket."""
    cfg = HypercornConfig()
    cfg.bind = [listen]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("syncbit.agent.metrics.server")
    cfg.graceful_timeout = 1.0
    app = Starlette(routes=[Route("/metrics", metrics_endpoint(agent)), *health_endpoints(agent)])
    await serve(app, cfg, task_status=task_status)


async def serve_api(agent: Agent, socket_path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = HypercornConfig()
    cfg.bind = [f"unix:{socket_path}"]
    cfg.umask = 0o177  # the socket is 0600: the API can register datasets
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("syncbit.agent.api.server")
    cfg.graceful_timeout = 1.0
    try:
        await serve(build_app(agent), cfg, task_status=task_status)
    finally:
        try:
            os.unlink(socket_path)
        except OSError:
            pass
