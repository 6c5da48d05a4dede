"""The CLI's client for the control plane's API (HTTP+JSON)."""

from __future__ import annotations

import httpx

from ..errors import ServerUnreachable, SyncbitError, error_from_dict


class ServerClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=httpx.Timeout(300.0, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach the control plane at {self.url}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise SyncbitError(f"control plane answered HTTP {r.status_code} without JSON") from None
        if r.status_code >= 400:
            raise error_from_dict(body)
        return body
