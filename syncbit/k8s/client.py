"""A thin Kubernetes API client on trio: plain JSON dicts in and out, over kr8s.

kr8s is built on anyio and httpx, so it runs under ``trio.run`` (the tests do
exactly that). It is used for what is tedious to get right -- credentials from
a kubeconfig (tokens, client certificates, exec plugins, CA data) or a pod's
service account, re-reading them on 401, the HTTP session -- and every call
goes through its raw ``Api.call_api``: its object classes (``Pod``, ``Node``)
never leave this module, callers see the API server's JSON.

Three kr8s habits are worked around here:

* ``kr8s.asyncio.api()`` caches one ``Api`` per thread and event loop and
  tells loops apart by ``id(asyncio.get_running_loop())``; under trio there is
  no asyncio loop, so every trio run in a thread shares one cache slot and a
  second client could get the first one's session. ``KubeClient`` builds its
  own ``Api`` (``bypass_factory=True``) and takes it out of that cache.
* kr8s reads the kubeconfig before the service account; ``connect`` prefers
  the pod's service account (``_credentials_source``).
* kr8s retries a 401 or 403 three times after re-reading the credentials, so a
  request that RBAC forbids costs four round trips before it fails.

``watch`` is the list-then-watch loop of a reconciling controller, with
reconnects (``trio.sleep`` backoff), resumption from the last
``resourceVersion`` and a fresh list when the server answers 410 Gone.

Errors leave as ``KubeError`` with one readable line; a missing object is
``None`` from the ``get_*`` methods.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import trio
from kr8s import APITimeoutError, ServerError
from kr8s._api import Api

from ..errors import SyncbitError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_MERGE_PATCH = "application/merge-patch+json"
_WEBHOOKS = "admissionregistration.k8s.io/v1"
# kind -> (apiVersion, plural, Kind) for ``watch``; pods are watched in all namespaces.
WATCH_KINDS = {"nodes": ("v1", "nodes", "Node"), "pods": ("v1", "pods", "Pod")}
_EVENT_TYPES = ("Normal", "Warning")


class KubeError(SyncbitError, ConnectionError):
    """The Kubernetes API refused a request or could not be reached.

    ``status`` is the HTTP status (None when there was no answer), ``reason``
    the Status reason (``Forbidden``, ``Conflict``, ``Invalid``, ``Expired``...).
    """

    exit_code = 20

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _credentials_source(kubeconfig: str | os.PathLike | None, environ=None,
                        service_account_dir: str | None = None) -> tuple[str, str]:
    """Where ``connect`` takes credentials from: ("kubeconfig", path) or ("in-cluster", service account dir).

    An explicit kubeconfig first; else the pod's service account (in a cluster:
    ``KUBERNETES_SERVICE_HOST`` set and a token mounted); else ``$KUBECONFIG``
    (``:``-separated files, as kubectl) or ``~/.kube/config``.
    """
    environ = os.environ if environ is None else environ
    service_account_dir = service_account_dir or SERVICE_ACCOUNT_DIR
    if kubeconfig:
        return "kubeconfig", os.fspath(kubeconfig)
    if environ.get("KUBERNETES_SERVICE_HOST") and os.path.isfile(os.path.join(service_account_dir, "token")):
        return "in-cluster", service_account_dir
    return "kubeconfig", environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


class KubeClient:
    """Plain-dict access to the few Kubernetes objects Syncbit touches. Build with ``await KubeClient.connect()``."""

    # Watch tuning (class attributes so that tests can shorten them).
    watch_timeout = 290.0  # seconds a watch request asks the server to keep the stream (timeoutSeconds)
    watch_slack = 30.0  # a stream silent this long after its timeout has passed is presumed dead
    backoff_initial = 0.2
    backoff_max = 30.0
    list_page = 500

    def __init__(self, api: Api, source: str) -> None:
        self._api = api
        self.source = source  # "kubeconfig <path>" or "in-cluster <dir>", for messages
        self.server = api.auth.server

    # -- connection --

    @classmethod
    async def connect(cls, kubeconfig: str | os.PathLike | None = None) -> KubeClient:
        """Load credentials (see ``_credentials_source`` for the order) and check that the server answers."""
        kind, where = _credentials_source(kubeconfig)
        if kubeconfig and not os.path.isfile(where):
            raise KubeError(f"kubeconfig {where}: no such file")
        if kind == "in-cluster":
            api = Api(bypass_factory=True, serviceaccount=where)
            # kr8s would read $KUBECONFIG / ~/.kube/config before the service account;
            # False is its own marker for "no kubeconfig" (KubeAuth.reauthenticate).
            api.auth._kubeconfig_path_or_dict = False
        else:
            api = Api(bypass_factory=True, kubeconfig=where)
        _forget_cached(api)
        try:
            await api.auth  # reads the files (anyio), runs exec plugins; no request yet
        except Exception as e:  # kr8s fails here with ValueError, KeyError, IndexError, OSError, YAMLError...
            raise KubeError(f"no usable Kubernetes credentials ({kind} {where}): {e}") from e
        client = cls(api, f"{kind} {where}")
        try:
            await client.version()
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        return client

    async def aclose(self) -> None:
        # kr8s has no public close; its session is created lazily in call_api.
        session = self._api._session
        if session is not None and not session.is_closed:
            await session.aclose()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def version(self) -> dict:
        """``GET /version`` (also the reachability check of ``connect``)."""
        async with self._call("GET", "GET /version", version="", base="/version") as r:
            return _json(r, "GET /version")

    # -- objects --

    async def get_node(self, name: str) -> dict | None:
        return await self._get("v1", "nodes", name)

    async def patch_node(self, name: str, merge_patch: dict) -> dict:
        """Apply a JSON merge patch (RFC 7386: null removes a key, lists are replaced whole) to a Node."""
        return await self._patch("v1", "nodes", name, merge_patch)

    async def get_pod(self, namespace: str, name: str) -> dict | None:
        return await self._get("v1", "pods", name, namespace=namespace)

    async def patch_pod(self, namespace: str, name: str, merge_patch: dict) -> dict:
        """Merge-patch a Pod (metadata and spec; the API server ignores ``status`` here)."""
        return await self._patch("v1", "pods", name, merge_patch, namespace=namespace)

    async def patch_pod_status(self, namespace: str, name: str, merge_patch: dict) -> dict:
        """Merge-patch a Pod's status subresource. ``status.conditions`` is a list: the patch replaces it whole."""
        return await self._patch("v1", "pods", name, merge_patch, namespace=namespace, subresource="status")

    async def create_event(self, obj: dict, *, reason: str, message: str, type: str = "Normal",
                           component: str = "syncbit") -> None:
        """Record a core v1 Event about ``obj`` (a Pod or Node as returned by this client).

        Events about cluster-scoped objects (Nodes) go to the ``default``
        namespace, as the kubelet's do.
        """
        if type not in _EVENT_TYPES:
            raise ValueError(f"event type must be one of {_EVENT_TYPES}, not {type!r}")
        meta = obj.get("metadata") or {}
        name, namespace = meta["name"], meta.get("namespace")
        kind = obj.get("kind") or ("Pod" if namespace else "Node")
        involved = {"apiVersion": obj.get("apiVersion", "v1"), "kind": kind, "name": name}
        for key in ("namespace", "uid", "resourceVersion"):
            if meta.get(key):
                involved[key] = meta[key]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event_ns = namespace or "default"
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": event_ns},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": type,
            "source": {"component": component}, "reportingComponent": component,
            "reportingInstance": socket.gethostname(), "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        what = f"POST events {event_ns}/{event['metadata']['name']}"
        async with self._call("POST", what, version="v1", namespace=event_ns, url="events",
                              content=json.dumps(event)):
            pass

    async def patch_webhook_ca(self, name: str, ca_pem: bytes) -> None:
        """Set ``clientConfig.caBundle`` of every webhook of the MutatingWebhookConfiguration ``name``.

        A merge patch replaces lists, so the full ``webhooks`` list is read and
        written back, with the read ``resourceVersion`` as a precondition; on a
        409 (someone changed it in between) it is read again. Nothing is written
        when every entry already carries this CA.
        """
        bundle = base64.b64encode(ca_pem).decode()
        for attempt in range(5):
            config = await self._get(_WEBHOOKS, "mutatingwebhookconfigurations", name)
            if config is None:
                raise KubeError(f"MutatingWebhookConfiguration {name!r} not found: apply the webhook manifest first",
                                status=404, reason="NotFound")
            webhooks = config.get("webhooks") or []
            if all((w.get("clientConfig") or {}).get("caBundle") == bundle for w in webhooks):
                return
            patched = [{**w, "clientConfig": {**(w.get("clientConfig") or {}), "caBundle": bundle}} for w in webhooks]
            patch = {"metadata": {"resourceVersion": config["metadata"]["resourceVersion"]}, "webhooks": patched}
            try:
                await self._patch(_WEBHOOKS, "mutatingwebhookconfigurations", name, patch)
                return
            except KubeError as e:
                if e.status != 409 or attempt == 4:
                    raise

    # -- watch --

    async def watch(self, kind: str) -> AsyncIterator[tuple[str, Any]]:
        """List, then watch ``kind`` ("nodes", or "pods" in all namespaces), forever; cancel to stop.

        Yields ``("SYNC", [obj, ...])`` first: the complete current set, to be
        taken as the whole truth (whatever the consumer knew and is not in it
        is gone). Then ``("ADDED" | "MODIFIED" | "DELETED", obj)`` as they
        happen. A dropped stream or a failed request is retried with backoff
        (logged as a warning) from the last seen ``resourceVersion``, without a
        new SYNC and without missing an event; when the server no longer has
        that version (410 Gone) the kind is listed again and a new SYNC comes.
        Objects carry ``kind`` and ``apiVersion`` (a real server leaves them
        out of list items; this adds them). BOOKMARKs are consumed here.

        Use ``async for``; a consumer that stops early should close the
        generator (``contextlib.aclosing``) to drop the connection at once.
        """
        if kind not in WATCH_KINDS:
            raise ValueError(f"cannot watch {kind!r}: one of {sorted(WATCH_KINDS)}")
        version, plural, kind_name = WATCH_KINDS[kind]
        rv: str | None = None
        backoff = self.backoff_initial
        while True:
            fresh = False  # listed in this round: a 410 now is not worth an immediate second list
            try:
                if rv is None:
                    items, rv = await self._list_all(version, plural, kind_name)
                    backoff, fresh = self.backoff_initial, True
                    yield "SYNC", items
                started, seen = trio.current_time(), 0
                async with aclosing(self._watch_from(version, plural, kind_name, rv)) as events:
                    async for etype, obj in events:
                        seen += 1
                        backoff, fresh = self.backoff_initial, False
                        rv = obj["metadata"].get("resourceVersion") or rv
                        if etype != "BOOKMARK":
                            yield etype, obj
                # The server ended the stream (its timeoutSeconds): go on from rv at once,
                # unless streams end as soon as they start (then back off as for an error).
                if seen or trio.current_time() - started > 1.0:
                    continue
                log.warning("watch %s: the server ended the watch as soon as it began; retrying in %.1f s", kind, backoff)
            except _Gone:
                log.info("watch %s: resourceVersion %s is gone, listing again", kind, rv)
                rv = None
                if not fresh:
                    continue
            except KubeError as e:
                log.warning("watch %s: %s; retrying in %.1f s", kind, e, backoff)
            await trio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.backoff_max)

    async def _list_all(self, version: str, plural: str, kind_name: str) -> tuple[list[dict], str]:
        items: list[dict] = []
        params: dict[str, Any] = {"limit": self.list_page}
        while True:
            async with self._call("GET", f"LIST {plural}", version=version, url=plural, params=params) as r:
                body = _json(r, f"LIST {plural}")
            for item in body.get("items") or []:
                item.setdefault("kind", kind_name)
                item.setdefault("apiVersion", version)
                items.append(item)
            meta = body.get("metadata") or {}
            if not meta.get("continue"):
                return items, meta.get("resourceVersion") or "0"
            params = {"limit": self.list_page, "continue": meta["continue"]}

    async def _watch_from(self, version: str, plural: str, kind_name: str, rv: str):
        """One watch request from ``rv``: yields (type, obj) until the server ends it; raises _Gone or KubeError.

        No cancel scope is held across a ``yield`` (trio forbids it in async
        generators): the silence deadline is applied to each read alone.
        """
        params = {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(max(1, round(self.watch_timeout * random.uniform(0.9, 1.0))))}
        deadline = trio.current_time() + self.watch_timeout + self.watch_slack
        what = f"WATCH {plural} from {rv}"
        async with self._call("GET", what, version=version, url=plural, params=params, stream=True) as r:
            lines = r.aiter_lines()
            try:
                while True:
                    with trio.move_on_after(max(0.0, deadline - trio.current_time())) as silent:
                        try:
                            line = await lines.__anext__()
                        except StopAsyncIteration:
                            return
                        except httpx.HTTPError as e:
                            raise KubeError(f"Kubernetes API {what}: stream broken: {_describe(e)}") from e
                    if silent.cancelled_caught:
                        raise KubeError(f"Kubernetes API {what}: no data for {self.watch_slack:.0f} s after "
                                        f"the watch timeout; reconnecting")
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                        etype, obj = event["type"], event["object"]
                    except (ValueError, KeyError, TypeError) as e:
                        raise KubeError(f"Kubernetes API {what}: unreadable event {line[:200]!r}") from e
                    if etype == "ERROR":
                        if obj.get("code") == 410:
                            raise _Gone()
                        raise KubeError(f"Kubernetes API {what}: {obj.get('code')} {obj.get('reason')}: "
                                        f"{obj.get('message')}", status=obj.get("code"), reason=obj.get("reason"))
                    if etype != "BOOKMARK":
                        obj.setdefault("kind", kind_name)
                        obj.setdefault("apiVersion", version)
                    yield etype, obj
            finally:
                await _finish(lines)

    # -- plumbing --

    async def _get(self, version: str, plural: str, name: str, *, namespace: str | None = None) -> dict | None:
        what = f"GET {plural} {_ref(namespace, name)}"
        try:
            async with self._call("GET", what, version=version, namespace=namespace, url=f"{plural}/{name}") as r:
                return _json(r, what)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def _patch(self, version: str, plural: str, name: str, merge_patch: dict, *,
                     namespace: str | None = None, subresource: str | None = None) -> dict:
        url = f"{plural}/{name}" + (f"/{subresource}" if subresource else "")
        what = f"PATCH {plural}{'/' + subresource if subresource else ''} {_ref(namespace, name)}"
        async with self._call("PATCH", what, version=version, namespace=namespace, url=url,
                              content=json.dumps(merge_patch), headers={"Content-Type": _MERGE_PATCH}) as r:
            return _json(r, what)

    @asynccontextmanager
    async def _call(self, method: str, what: str, **kwargs):
        """kr8s ``call_api`` with its errors (and httpx's) turned into KubeError; ``what`` names the request."""
        try:
            async with self._api.call_api(method, **kwargs) as response:
                yield response
        except ServerError as e:
            raise _server_error(what, e) from e
        except APITimeoutError as e:
            raise KubeError(f"Kubernetes API {what}: no answer from {self.server} (timeout)") from e
        except httpx.HTTPError as e:
            raise KubeError(f"Kubernetes API {what}: cannot reach {self.server}: {_describe(e)}") from e
        except OSError as e:  # ssl.SSLError from the credentials' CA or client certificate files
            raise KubeError(f"Kubernetes API {what}: {self.server}: {_describe(e)}") from e


async def _finish(lines) -> None:
    """End an httpx line iterator that we stop reading early.

    ``aiter_lines`` sits on a chain of async generators down to httpcore;
    closing the top one leaves the inner ones suspended, and trio warns
    (ResourceWarning) when they are garbage collected. Resumed inside a
    cancelled scope, the chain reads on to its next checkpoint and the
    Cancelled raised there unwinds every frame of it.
    """
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            while True:
                await lines.__anext__()
        except StopAsyncIteration:
            pass
        except Exception:  # the stream is being dropped; how it ends does not matter
            pass


class _Gone(Exception):
    """The watch's resourceVersion is no longer available (410): list again."""


def _forget_cached(api: Api) -> None:
    # Api.__init__ registers itself in kr8s's per-thread/loop instance cache (keyed
    # "<thread>.0" under trio); kr8s.asyncio.api() callers must not be handed ours.
    for instances in Api._instances.values():
        for key, value in list(instances.items()):
            if value is api:
                del instances[key]


def _server_error(what: str, e: ServerError) -> KubeError:
    response = e.response
    code = response.status_code if response is not None else None
    reason, message = None, str(e)
    if response is not None:
        try:
            body = response.json()
        except (ValueError, httpx.ResponseNotRead):
            body = None
        if isinstance(body, dict) and body.get("kind") == "Status":
            reason, message = body.get("reason"), body.get("message") or message
        else:
            reason = response.reason_phrase
            try:
                text = response.text.strip()
            except httpx.ResponseNotRead:
                text = ""
            message = text[:300] or reason
    return KubeError(f"Kubernetes API {what}: {code} {reason}: {message}", status=code, reason=reason)


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise KubeError(f"Kubernetes API {what}: answer is not JSON: {response.text[:200]!r}",
                        status=response.status_code) from e


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _ref(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


__all__ = ["WATCH_KINDS", "KubeClient", "KubeError"]
