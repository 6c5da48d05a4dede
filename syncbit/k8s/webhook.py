"""The mutating admission webhook for pods that carry ``syncbit.io/datasets``.

``mutate`` is pure: AdmissionReview request in, AdmissionReview response
out, with a JSON Patch that adds the scheduling gate, the read-only hostPath
volume of the mount root (``mountPropagation: HostToContainer``, so a mount
the agent makes after the pod starts still shows) at ``/datasets`` in every
container, and the readiness gate. A malformed annotation is refused at
``kubectl apply`` with a message that says why, rather than leaving a pod
gated for ever. ``app`` serves it over HTTPS (server.py runs it).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ConfigError
from ..server.api import error_response, read_json
from .pods import CONDITION, GATE, MOUNT_PATH, VOLUME, node_of, requested_datasets

log = logging.getLogger(__name__)

PATH = "/mutate-pods"
MAX_REVIEW = 8 * 2**20  # a pod spec is far smaller; the API server caps requests at 3 MiB


def pod_patch(pod: Mapping, mount_root: str) -> list[dict]:
    """JSON Patch operations giving ``pod`` what the annotation contract promises (idempotent)."""
    spec = pod.get("spec") or {}
    ops: list[dict] = []

    def append(path: str, items: list | None, value: dict) -> None:
        # "add" to a missing list must create it; "/-" appends to an existing one.
        if items is None:
            ops.append({"op": "add", "path": path, "value": [value]})
        else:
            ops.append({"op": "add", "path": path + "/-", "value": value})

    gates = spec.get("schedulingGates")
    # A pod created already bound to a node (nodeName set) cannot be gated.
    if node_of(pod) is None and not any(g.get("name") == GATE for g in gates or []):
        append("/spec/schedulingGates", gates, {"name": GATE})
    volumes = spec.get("volumes")
    if not any(v.get("name") == VOLUME for v in volumes or []):
        append("/spec/volumes", volumes, {"name": VOLUME, "hostPath": {"path": mount_root, "type": "Directory"}})
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            mounts = c.get("volumeMounts")
            if any(m.get("mountPath", "").rstrip("/") == MOUNT_PATH for m in mounts or []):
                continue  # the pod mounts something of its own there: leave it
            append(f"/spec/{kind}/{i}/volumeMounts", mounts,
                   {"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True,
                    "mountPropagation": "HostToContainer"})
    readiness = spec.get("readinessGates")
    if not any(g.get("conditionType") == CONDITION for g in readiness or []):
        append("/spec/readinessGates", readiness, {"conditionType": CONDITION})
    return ops


def mutate(review: Mapping, mount_root: str) -> dict:
    """The AdmissionReview answer for one request."""
    request = review.get("request") if isinstance(review, Mapping) else None
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ConfigError("not an AdmissionReview request (no request.uid)")
    response: dict = {"uid": request["uid"], "allowed": True}
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind")
    if kind == "Pod" and request.get("operation", "CREATE") == "CREATE" and isinstance(pod, Mapping):
        try:
            datasets = requested_datasets(pod)
        except ConfigError as e:
            response = {"uid": request["uid"], "allowed": False,
                        "status": {"code": 400, "reason": "BadRequest", "message": str(e)}}
        else:
            if datasets:
                ops = pod_patch(pod, mount_root)
                if ops:
                    response["patchType"] = "JSONPatch"
                    response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
                meta = pod.get("metadata") or {}
                log.info("webhook: pod %s/%s asks for %s: %d changes", request.get("namespace"),
                         meta.get("name") or meta.get("generateName", "") + "*", ",".join(datasets), len(ops))
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
            "response": response}


def app(mount_root: str) -> Starlette:
    async def endpoint(request: Request):
        try:
            return JSONResponse(mutate(await read_json(request, MAX_REVIEW), mount_root))
        except ConfigError as e:  # too large, not JSON, not a review: a 4xx the API server logs
            return error_response(e)

    return Starlette(routes=[Route(PATH, endpoint, methods=["POST"])])
