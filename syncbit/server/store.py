"""The control plane's state: one SQLite file (WAL) through sqlite-utils, with a versioned schema.

Everything the server must remember across a restart lives here: nodes and
their labels, datasets and their snapshots, assignments, per-node placements
with the state agents report, the progressive manifest (block ids learnt per
file object) and the block bitmaps nodes hold. Used from the trio thread only;
statements are small. Node liveness (last heartbeat) is kept in memory by the
server and written here only when a node changes state.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import sqlite_utils

from ..errors import ConfigError
from ..model import Snapshot
from ..sqlite_tx import transaction

SCHEMA_VERSION = 1

_MIGRATIONS = {
    1: [
        """CREATE TABLE nodes (name TEXT PRIMARY KEY, labels TEXT NOT NULL, capacity INTEGER NOT NULL,
               free INTEGER NOT NULL, up INTEGER NOT NULL, registered REAL NOT NULL, last_seen REAL NOT NULL)""",
        """CREATE TABLE datasets (name TEXT PRIMARY KEY, uri TEXT NOT NULL, options TEXT NOT NULL,
               snapshot TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
        """CREATE TABLE snapshots (id TEXT PRIMARY KEY, dataset TEXT NOT NULL, json TEXT NOT NULL,
               created REAL NOT NULL)""",
        """CREATE TABLE assignments (dataset TEXT PRIMARY KEY, spec TEXT NOT NULL, switch TEXT NOT NULL,
               problem TEXT, created REAL NOT NULL)""",
        # One row per (dataset, node) the scheduler placed: the snapshot wanted
        # there and what the node last reported about it.
        """CREATE TABLE placements (dataset TEXT NOT NULL, node TEXT NOT NULL, snapshot TEXT NOT NULL,
               state TEXT NOT NULL, error TEXT, bytes_cached INTEGER NOT NULL DEFAULT 0,
               bytes_total INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, PRIMARY KEY (dataset, node))""",
        "CREATE INDEX placements_node ON placements (node)",
        # The progressive manifest: block ids as nodes first hash them.
        """CREATE TABLE manifest (fo TEXT NOT NULL, idx INTEGER NOT NULL, block TEXT NOT NULL,
               node TEXT NOT NULL, reported REAL NOT NULL, PRIMARY KEY (fo, idx)) WITHOUT ROWID""",
        # Which blocks of a snapshot a node holds: a bitmap over the snapshot's blocks in file order.
        """CREATE TABLE holdings (node TEXT NOT NULL, snapshot TEXT NOT NULL, bitmap BLOB NOT NULL,
               updated REAL NOT NULL, PRIMARY KEY (node, snapshot))""",
    ],
}


class Store:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        try:
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.db.conn.close()

    def _migrate(self) -> None:
        meta = self.db["meta"]
        if not meta.exists():
            meta.create({"key": str, "value": str}, pk="key")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise ConfigError(f"server database schema {version} is newer than this syncbit ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with transaction(self.db.conn):
                for stmt in _MIGRATIONS[v]:
                    self.db.execute(stmt)
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(v),))

    # -- nodes -------------------------------------------------------------

    def nodes(self) -> list[dict]:
        rows = list(self.db.query("SELECT * FROM nodes ORDER BY name"))
        for r in rows:
            r["labels"] = json.loads(r["labels"])
            r["up"] = bool(r["up"])
        return rows

    def put_node(self, name: str, labels: Mapping[str, str], capacity: int, free: int, up: bool, now: float) -> None:
        self.db.execute(
            """INSERT INTO nodes (name, labels, capacity, free, up, registered, last_seen) VALUES (?,?,?,?,?,?,?)
               ON CONFLICT(name) DO UPDATE SET labels=excluded.labels, capacity=excluded.capacity,
               free=excluded.free, up=excluded.up, last_seen=excluded.last_seen""",
            (name, json.dumps(dict(labels), sort_keys=True), capacity, free, int(up), now, now),
        )

    def set_node_up(self, name: str, up: bool, last_seen: float) -> None:
        self.db.execute("UPDATE nodes SET up=?, last_seen=? WHERE name=?", (int(up), last_seen, name))

    def delete_node(self, name: str) -> None:
        with transaction(self.db.conn):
            self.db.execute("DELETE FROM nodes WHERE name=?", (name,))
            self.db.execute("DELETE FROM holdings WHERE node=?", (name,))
            self.db.execute("DELETE FROM placements WHERE node=?", (name,))

    # -- datasets and snapshots --------------------------------------------------

    def datasets(self) -> list[dict]:
        rows = list(self.db.query("SELECT * FROM datasets ORDER BY name"))
        for r in rows:
            r["options"] = json.loads(r["options"])
        return rows

    def dataset(self, name: str) -> dict | None:
        row = self.db.execute("SELECT name, uri, options, snapshot, created, updated FROM datasets WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            return None
        return {"name": row[0], "uri": row[1], "options": json.loads(row[2]), "snapshot": row[3],
                "created": row[4], "updated": row[5]}

    def put_dataset(self, name: str, uri: str, options: Mapping[str, str], snap: Snapshot) -> None:
        now = time.time()
        with transaction(self.db.conn):
            self.db.execute(
                "INSERT OR IGNORE INTO snapshots (id, dataset, json, created) VALUES (?,?,?,?)",
                (snap.id, name, snap.to_json(), snap.created or now),
            )
            self.db.execute(
                """INSERT INTO datasets (name, uri, options, snapshot, created, updated) VALUES (?,?,?,?,?,?)
                   ON CONFLICT(name) DO UPDATE SET uri=excluded.uri, options=excluded.options,
                   snapshot=excluded.snapshot, updated=excluded.updated""",
                (name, uri, json.dumps(dict(options), sort_keys=True), snap.id, now, now),
            )

    def delete_dataset(self, name: str) -> None:
        with transaction(self.db.conn):
            for table, col in (("datasets", "name"), ("assignments", "dataset"), ("placements", "dataset")):
                self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (name,))
            # Snapshot ids are content ids: another dataset over the same source may share one.
            self.db.execute("""DELETE FROM snapshots WHERE id NOT IN (SELECT snapshot FROM datasets)
                               AND id NOT IN (SELECT snapshot FROM placements)""")
            self.db.execute("DELETE FROM holdings WHERE snapshot NOT IN (SELECT id FROM snapshots)")

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self.db.execute("SELECT json FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return Snapshot.from_json(row[0]) if row else None

    def snapshot_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM snapshots")]

    def snapshot_json(self, snapshot_id: str) -> str | None:
        row = self.db.execute("SELECT json FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return row[0] if row else None

    # -- assignments and placements ------------------------------------------------

    def assignments(self) -> list[dict]:
        rows = list(self.db.query("SELECT * FROM assignments ORDER BY dataset"))
        for r in rows:
            r["spec"] = json.loads(r["spec"])
        return rows

    def put_assignment(self, dataset: str, spec: Mapping, switch: str) -> None:
        self.db.execute(
            """INSERT INTO assignments (dataset, spec, switch, problem, created) VALUES (?,?,?,NULL,?)
               ON CONFLICT(dataset) DO UPDATE SET spec=excluded.spec, switch=excluded.switch""",
            (dataset, json.dumps(dict(spec), sort_keys=True), switch, time.time()),
        )

    def set_assignment_problem(self, dataset: str, problem: str | None) -> None:
        self.db.execute("UPDATE assignments SET problem=? WHERE dataset=?", (problem, dataset))

    def delete_assignment(self, dataset: str) -> None:
        with transaction(self.db.conn):
            self.db.execute("DELETE FROM assignments WHERE dataset=?", (dataset,))
            self.db.execute("DELETE FROM placements WHERE dataset=?", (dataset,))

    def placements(self, dataset: str | None = None, node: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM placements", []
        where = []
        if dataset is not None:
            where.append("dataset=?")
            args.append(dataset)
        if node is not None:
            where.append("node=?")
            args.append(node)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return list(self.db.query(sql + " ORDER BY dataset, node", args))

    def set_placements(self, dataset: str, nodes: Iterable[str], snapshot: str) -> tuple[set[str], set[str]]:
        """Make ``nodes`` the placements of ``dataset``; returns (added, removed) node names."""
        nodes = set(nodes)
        now = time.time()
        existing = {r["node"]: r for r in self.placements(dataset)}
        added, removed = nodes - set(existing), set(existing) - nodes
        with transaction(self.db.conn):
            for n in removed:
                self.db.execute("DELETE FROM placements WHERE dataset=? AND node=?", (dataset, n))
            for n in added:
                self.db.execute(
                    "INSERT INTO placements (dataset, node, snapshot, state, updated) VALUES (?,?,?,?,?)",
                    (dataset, n, snapshot, "pending", now))
            # A new snapshot of the dataset is wanted everywhere it is placed.
            self.db.execute("UPDATE placements SET snapshot=?, state='pending', error=NULL, updated=? "
                            "WHERE dataset=? AND snapshot<>?", (snapshot, now, dataset, snapshot))
        return added, removed

    def report(self, node: str, dataset: str, snapshot: str, state: str, error: str | None, cached: int,
               total: int) -> bool:
        """Record what ``node`` says about ``dataset``; True if its placement changed state."""
        row = self.db.execute("SELECT snapshot, state, error, bytes_cached FROM placements WHERE dataset=? AND node=?",
                              (dataset, node)).fetchone()
        if row is None or row[0] != snapshot:
            return False  # not placed there, or a report about an older snapshot
        if (row[1], row[2], row[3]) == (state, error, cached):
            return False
        self.db.execute("UPDATE placements SET state=?, error=?, bytes_cached=?, bytes_total=?, updated=? "
                        "WHERE dataset=? AND node=?", (state, error, cached, total, time.time(), dataset, node))
        return row[1] != state

    # -- manifest and holdings -------------------------------------------------------

    def record_blocks(self, node: str, reports: Iterable[tuple[str, int, str]]) -> list[tuple[str, int, str, str]]:
        """Record first-hashed block ids; returns the refused ones as (fo, idx, reported, recorded)."""
        refused = []
        reports = list(reports)
        if not reports:
            return refused
        now = time.time()
        conn = self.db.conn
        with transaction(conn):
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO manifest (fo, idx, block, node, reported) VALUES (?,?,?,?,?)",
                             [(fo, idx, block, node, now) for fo, idx, block in reports])
            if conn.total_changes - before < len(reports):
                # Some were recorded before: check those (rare once the server has seen them).
                for fo, idx, block in reports:
                    recorded = conn.execute("SELECT block FROM manifest WHERE fo=? AND idx=?", (fo, idx)).fetchone()[0]
                    if recorded != block:
                        refused.append((fo, idx, block, recorded))
        return refused

    def manifest(self, fos: Iterable[str]) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for fo in fos:
            rows = self.db.execute("SELECT idx, block FROM manifest WHERE fo=?", (fo,)).fetchall()
            if rows:
                out[fo] = {idx: block for idx, block in rows}
        return out

    def put_holdings(self, node: str, bitmaps: Mapping[str, bytes]) -> None:
        now = time.time()
        with transaction(self.db.conn):
            for snapshot, bitmap in bitmaps.items():
                self.db.execute("INSERT OR REPLACE INTO holdings (node, snapshot, bitmap, updated) VALUES (?,?,?,?)",
                                (node, snapshot, bitmap, now))

    def holdings(self, snapshot: str) -> dict[str, bytes]:
        return {n: b for n, b in self.db.execute("SELECT node, bitmap FROM holdings WHERE snapshot=?", (snapshot,))}
