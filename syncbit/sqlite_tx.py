"""Transactions on SQLite connections opened in autocommit mode.

Both databases (the agent's cache index, the control plane's state) are opened
with ``isolation_level=None`` so that single statements commit at once. In that
mode ``with conn:`` begins nothing and rolls nothing back: multi-statement
changes go through ``transaction(conn)``, which does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    if conn.in_transaction:  # nested: the outer one commits or rolls back
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
