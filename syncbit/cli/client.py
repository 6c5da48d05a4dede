"""The CLI's client for the agent's local API (HTTP+JSON on a Unix socket)."""

from __future__ import annotations

import httpx

from ..errors import AgentNotRunning, SyncbitError, error_from_dict


class AgentClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path),
            base_url="http://agent",
            timeout=httpx.Timeout(300.0, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.ConnectError, FileNotFoundError):
            raise AgentNotRunning(
                f"no agent is listening on {self.socket_path} (start one with 'syncbit daemon' or "
                f"'syncbit mount', or point SYNCBIT_SOCKET/--config at it)"
            ) from None
        except httpx.TransportError as e:
            raise AgentNotRunning(f"lost the connection to the agent on {self.socket_path}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise SyncbitError(f"agent answered HTTP {r.status_code} without JSON") from None
        if r.status_code >= 400:
            raise error_from_dict(body)
        return body

    def status(self) -> dict:
        return self._call("GET", "/v1/status")

    def pull(self, uri: str, name: str | None, options: dict[str, str] | None = None) -> dict:
        body = {"uri": uri, "name": name, "pin": True}
        if options:
            body["options"] = options
        return self._call("POST", "/v1/datasets", json=body)

    def dataset(self, name: str, wait: float = 0) -> dict:
        return self._call("GET", f"/v1/datasets/{name}", params={"wait": wait} if wait else None)

    def prefetch(self, name: str) -> dict:
        return self._call("POST", f"/v1/datasets/{name}/prefetch")

    def evict(self, name: str) -> dict:
        return self._call("POST", f"/v1/datasets/{name}/evict")

    def shutdown(self) -> dict:
        return self._call("POST", "/v1/shutdown")
