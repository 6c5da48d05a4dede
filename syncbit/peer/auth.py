"""Cluster-secret request signatures for the peer protocol (pure).

Every peer request carries ``X-Syncbit-Time`` (unix seconds) and
``X-Syncbit-Auth``: hex HMAC-SHA256, keyed with the cluster secret, over
``METHOD\\nPATH\\nTIME``. A request outside ``max_skew`` seconds of the
receiver's clock is refused, which bounds replays to that window; replaying a
GET for a content-addressed block gains an attacker nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

TIME_HEADER = "x-syncbit-time"
AUTH_HEADER = "x-syncbit-auth"
NODE_HEADER = "x-syncbit-node"
MAX_SKEW = 300.0


def load_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cluster_secret_file {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"cluster_secret_file {path}: the secret must be at least 16 bytes")
    return secret


def sign(secret: bytes, method: str, path: str, timestamp: int) -> str:
    msg = f"{method.upper()}\n{path}\n{timestamp}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def auth_headers(secret: bytes, method: str, path: str, now: float, node: str) -> dict[str, str]:
    ts = int(now)
    return {TIME_HEADER: str(ts), AUTH_HEADER: sign(secret, method, path, ts), NODE_HEADER: node}


def verify(secret: bytes, method: str, path: str, headers: Mapping[str, str], now: float,
           max_skew: float = MAX_SKEW) -> bool:
    ts, mac = headers.get(TIME_HEADER), headers.get(AUTH_HEADER)
    if not ts or not mac or not ts.isdigit() or abs(now - int(ts)) > max_skew:
        return False
    return hmac.compare_digest(sign(secret, method, path, int(ts)), mac)
