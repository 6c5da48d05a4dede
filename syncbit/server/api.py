"""The control plane's HTTP+JSON API under ``/v1/`` (Starlette on hypercorn's trio worker).

Bad input is a 4xx with ``{"error": <SyncbitError class>, "message": ...}``,
the shape the CLI turns back into the same error and exit code; a 500 is a
bug. Bodies are read with a size limit before they are parsed.
"""

from __future__ import annotations

import json
import logging
import time

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import (
    AccessDenied, ConfigError, DatasetNotFound, HostileName, MalformedURI, RevisionNotFound, SourceNotFound,
    SyncbitError, UnknownScheme,
)
from . import metrics
from .controlplane import ControlPlane, check_name
from .scheduler import Assignment, parse_selector

log = logging.getLogger(__name__)

MAX_BODY = 16 * 2**20
MAX_WAIT = 60.0


class BodyTooLarge(ConfigError):
    pass


def _status_of(e: SyncbitError) -> int:
    if isinstance(e, BodyTooLarge):
        return 413
    if isinstance(e, DatasetNotFound | SourceNotFound | RevisionNotFound):
        return 404
    if isinstance(e, AccessDenied):
        return 403
    if isinstance(e, ConfigError | MalformedURI | UnknownScheme | HostileName):
        return 400
    return 502  # the source failed: not the client's fault, not ours either


def error_response(e: SyncbitError) -> JSONResponse:
    return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=_status_of(e))


async def read_json(request: Request, limit: int = MAX_BODY) -> dict:
    """The request's JSON object, read with a size limit (BodyTooLarge, ConfigError)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("request body is not JSON") from None
    if not isinstance(value, dict):
        raise ConfigError("request body must be a JSON object")
    return value


def _str(body: dict, key: str, required: bool = True) -> str | None:
    v = body.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key!r} must be a non-empty string")
    return v


def _options(body: dict) -> dict[str, str]:
    options = body.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
        raise ConfigError("'options' must be an object of strings")
    return options


def assignment_from(name: str, body: dict) -> tuple[Assignment, str]:
    nodes = body.get("nodes")
    selector = body.get("selector")
    if nodes is not None:
        if isinstance(nodes, str):
            nodes = [n.strip() for n in nodes.split(",") if n.strip()]
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ConfigError("'nodes' must be a list of node names")
        nodes = tuple(check_name(n, "node") for n in nodes)
    if selector is not None:
        if isinstance(selector, str):
            selector = parse_selector(selector)
        elif not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
            raise ConfigError("'selector' must be an object of label -> value, or 'key=value,...'")
    replicas = body.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool)):
        raise ConfigError("'replicas' must be an integer")
    spread_by = _str(body, "spread_by", required=False)
    taint = body.get("taint_until_ready", False)
    if not isinstance(taint, bool):
        raise ConfigError("'taint_until_ready' must be true or false")
    switch = body.get("switch", "complete")
    return Assignment(name, nodes, selector, replicas, spread_by, taint), switch


def build_app(cp: ControlPlane) -> Starlette:
    def endpoint(fn):
        async def wrapped(request: Request):
            try:
                return await fn(request)
            except SyncbitError as e:
                return error_response(e)
            except ClientDisconnect:  # the caller went away mid-request (an agent stopping): nobody to answer
                return Response(status_code=499)
        return wrapped

    async def status(request: Request):
        return JSONResponse(cp.status())

    async def nodes(request: Request):
        return JSONResponse({"nodes": cp.nodes_view()})

    async def heartbeat(request: Request):
        started = time.perf_counter()
        body = await read_json(request)
        answer = cp.heartbeat(request.path_params["name"], body)
        metrics.HEARTBEAT_SECONDS.observe(time.perf_counter() - started)
        return JSONResponse(answer)

    async def desired(request: Request):
        # Long-polled by agents beside their heartbeats: an assignment reaches a node at once.
        name = check_name(request.path_params["name"], "node")
        try:
            since = int(request.query_params.get("version", "-1"))
            timeout = min(MAX_WAIT, max(0.0, float(request.query_params.get("timeout", "0"))))
        except ValueError:
            raise ConfigError("version must be an integer and timeout a number of seconds") from None
        version, desired = await cp.desired_wait(name, since, timeout)
        if desired is None:  # held until the timeout and nothing changed for this node
            return JSONResponse({"version": version, "epoch": cp.epoch, "unchanged": True})
        return JSONResponse({"version": version, "epoch": cp.epoch, "desired": desired})

    async def list_datasets(request: Request):
        return JSONResponse({"datasets": [cp.dataset_view(d["name"]) for d in cp.store.datasets()]})

    async def add_dataset(request: Request):
        body = await read_json(request)
        return JSONResponse(await cp.add_dataset(check_name(_str(body, "name")), _str(body, "uri"), _options(body)),
                            status_code=201)

    async def get_dataset(request: Request):
        return JSONResponse(cp.dataset_view(request.path_params["name"]))

    async def delete_dataset(request: Request):
        cp.remove_dataset(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"]})

    async def update_dataset(request: Request):
        body = await read_json(request)
        return JSONResponse(await cp.update_dataset(request.path_params["name"],
                                                    _str(body, "revision", required=False)))

    async def put_assignment(request: Request):
        name = request.path_params["name"]
        a, switch = assignment_from(name, await read_json(request))
        return JSONResponse(cp.assign(name, a, switch))

    async def delete_assignment(request: Request):
        cp.unassign(request.path_params["name"])
        return JSONResponse({"unassigned": request.path_params["name"]})

    async def wait(request: Request):
        name = request.path_params["name"]
        node = request.query_params.get("node") or None
        try:
            timeout = min(MAX_WAIT, max(0.0, float(request.query_params.get("timeout", "0"))))
        except ValueError:
            raise ConfigError("timeout must be a number of seconds") from None
        with trio.move_on_after(timeout):
            while True:
                state, reason = cp.wait_state(name, node)
                if state != "waiting":
                    break
                await cp.changed.wait()
        state, reason = cp.wait_state(name, node)
        return JSONResponse({"dataset": name, "node": node, "state": state, "reason": reason})

    async def snapshot(request: Request):
        text = cp.store.snapshot_json(request.path_params["id"])
        if text is None:
            raise DatasetNotFound(f"no snapshot {request.path_params['id']!r}")
        return Response(text, media_type="application/json")

    async def manifest(request: Request):
        body = await read_json(request)
        fos = body.get("file_objects")
        if not isinstance(fos, list) or not all(isinstance(f, str) for f in fos) or len(fos) > 100_000:
            raise ConfigError("'file_objects' must be a list of file-object ids")
        return JSONResponse({"blocks": {fo: {str(i): b for i, b in m.items()}
                                        for fo, m in cp.store.manifest(fos).items()}})

    async def lookup(request: Request):
        body = await read_json(request)
        wait = body.get("wait", 0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 60:
            raise ConfigError("'wait' must be a number of seconds (at most 60)")
        grants = body.get("grants")
        if grants is not None and (not isinstance(grants, int) or isinstance(grants, bool) or grants < 0):
            raise ConfigError("'grants' must be a non-negative integer")
        return JSONResponse({"items": await cp.lookup_wait(check_name(_str(body, "node"), "node"), body.get("items"),
                                                           claim=body.get("claim") is True, wait=wait,
                                                           grants=grants)})

    async def have(request: Request):
        body = await read_json(request)
        return JSONResponse({"refused_blocks": cp.have(_str(body, "node"), body.get("blocks"))})

    async def prometheus(request: Request):
        return Response(metrics.render(cp), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v1/status", endpoint(status)),
        Route("/v1/nodes", endpoint(nodes)),
        Route("/v1/nodes/{name}/heartbeat", endpoint(heartbeat), methods=["PUT", "POST"]),
        Route("/v1/nodes/{name}/desired", endpoint(desired)),
        Route("/v1/datasets", endpoint(list_datasets)),
        Route("/v1/datasets", endpoint(add_dataset), methods=["POST"]),
        Route("/v1/datasets/{name}", endpoint(get_dataset)),
        Route("/v1/datasets/{name}", endpoint(delete_dataset), methods=["DELETE"]),
        Route("/v1/datasets/{name}/update", endpoint(update_dataset), methods=["POST"]),
        Route("/v1/datasets/{name}/assignment", endpoint(put_assignment), methods=["PUT"]),
        Route("/v1/datasets/{name}/assignment", endpoint(delete_assignment), methods=["DELETE"]),
        Route("/v1/datasets/{name}/wait", endpoint(wait)),
        Route("/v1/snapshots/{id}", endpoint(snapshot)),
        Route("/v1/manifest", endpoint(manifest), methods=["POST"]),
        Route("/v1/peers/lookup", endpoint(lookup), methods=["POST"]),
        Route("/v1/peers/have", endpoint(have), methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    return Starlette(routes=routes)
