"""The cache index: ``CACHE_DIR/index.sqlite`` in WAL mode, through sqlite-utils.

Holds blocks (size, at-rest checksum, access statistics), the known block ids
of each file object (known even after the block is evicted, so a refetch is
verified), snapshots, datasets and their pins. Used from the trio thread only:
statements are small and WAL with ``synchronous=NORMAL`` commits without an
fsync; the cache's group commit makes block files durable before the rows
that name them, and a lost row is recovered by ``reconcile`` from the block
files at the next start.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import sqlite_utils

from ..model import Snapshot
from ..sqlite_tx import transaction
from .eviction import BlockStat

SCHEMA_VERSION = 3

_MIGRATIONS = {
    1: [
        """CREATE TABLE blocks (id TEXT PRIMARY KEY, size INTEGER NOT NULL, checksum TEXT NOT NULL,
               created REAL NOT NULL, last_access REAL NOT NULL, hits REAL NOT NULL DEFAULT 0)""",
        """CREATE TABLE fo_blocks (fo TEXT NOT NULL, idx INTEGER NOT NULL, block TEXT NOT NULL,
               PRIMARY KEY (fo, idx)) WITHOUT ROWID""",
        "CREATE INDEX fo_blocks_block ON fo_blocks (block)",
        """CREATE TABLE snapshots (id TEXT PRIMARY KEY, uri TEXT NOT NULL, revision TEXT NOT NULL,
               json TEXT NOT NULL, created REAL NOT NULL)""",
        """CREATE TABLE snapshot_fos (snapshot TEXT NOT NULL, fo TEXT NOT NULL, PRIMARY KEY (snapshot, fo))
               WITHOUT ROWID""",
        """CREATE TABLE datasets (name TEXT PRIMARY KEY, uri TEXT NOT NULL, snapshot TEXT,
               pinned INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, error TEXT, created REAL NOT NULL)""",
    ],
    2: [
        # Per-dataset source options (an S3 endpoint_url, a region), JSON.
        "ALTER TABLE datasets ADD COLUMN options TEXT NOT NULL DEFAULT '{}'",
        # File objects whose whole-file digest from the source was checked.
        """CREATE TABLE fo_verified (fo TEXT PRIMARY KEY, digest TEXT NOT NULL, verified REAL NOT NULL)
               WITHOUT ROWID""",
    ],
    3: [
        # Datasets the control plane assigned (vs pulled by hand), and the
        # snapshot being prefetched before it becomes current.
        "ALTER TABLE datasets ADD COLUMN managed INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE datasets ADD COLUMN staged TEXT",
        "ALTER TABLE datasets ADD COLUMN switch TEXT NOT NULL DEFAULT 'complete'",
    ],
}


class Index:
    def __init__(self, path: Path) -> None:
        # Opened here, reconciled once in a worker thread at start, then used
        # only from the trio thread: never from two threads at once.
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        # One process uses the index (the cache directory is locked to one
        # agent), so WAL needs no shared-memory -shm file: without it an
        # agent whose cache filesystem is full still starts ("disk I/O error"
        # creating the -shm file, before), and can then evict.
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self._migrate()

    def close(self) -> None:
        self.db.conn.close()

    def _migrate(self) -> None:
        meta = self.db["meta"]
        if not meta.exists():
            meta.create({"key": str, "value": str}, pk="key")
        row = next(iter(self.db.query("SELECT value FROM meta WHERE key='schema'")), None)
        version = int(row["value"]) if row else 0
        if version > SCHEMA_VERSION:
            from ..errors import ConfigError

            raise ConfigError(f"cache index schema {version} is newer than this syncbit ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with transaction(self.db.conn):
                for stmt in _MIGRATIONS[v]:
                    self.db.execute(stmt)
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(v),))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- blocks ------------------------------------------------------------

    def block_sizes(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT id, size FROM blocks").fetchall()}

    def add_block(self, block_id: str, size: int, checksum: str, now: float) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO blocks (id, size, checksum, created, last_access, hits) VALUES (?,?,?,?,?,0)",
            (block_id, size, checksum, now, now),
        )

    def remove_blocks(self, ids: Iterable[str]) -> None:
        with transaction(self.db.conn):
            self.db.conn.executemany("DELETE FROM blocks WHERE id=?", [(i,) for i in ids])

    def checksums_since(self, since: float) -> list[tuple[str, str]]:
        return self.db.execute("SELECT id, checksum FROM blocks WHERE created >= ?", (since,)).fetchall()

    def record_access(self, updates: dict[str, tuple[float, int]]) -> None:
        with transaction(self.db.conn):
            self.db.conn.executemany(
                "UPDATE blocks SET last_access=max(last_access, ?), hits=hits+? WHERE id=?",
                [(t, n, i) for i, (t, n) in updates.items()],
            )

    def eviction_candidates(self) -> list[BlockStat]:
        rows = self.db.execute(
            """SELECT id, size, last_access, hits FROM blocks WHERE id NOT IN (
                   SELECT fb.block FROM fo_blocks fb
                   JOIN snapshot_fos sf ON sf.fo = fb.fo
                   JOIN datasets d ON sf.snapshot IN (d.snapshot, d.staged)
                   WHERE d.pinned = 1)"""
        ).fetchall()
        return [BlockStat(*r) for r in rows]

    # -- file objects --------------------------------------------------------

    def fo_blocks(self, fo: str) -> dict[int, str]:
        return dict(self.db.execute("SELECT idx, block FROM fo_blocks WHERE fo=?", (fo,)).fetchall())

    def set_fo_block(self, fo: str, idx: int, block_id: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO fo_blocks (fo, idx, block) VALUES (?,?,?)", (fo, idx, block_id))

    # -- snapshots and datasets -------------------------------------------------

    def forget_fo(self, fo: str) -> None:
        with transaction(self.db.conn):
            self.db.execute("DELETE FROM fo_blocks WHERE fo=?", (fo,))
            self.db.execute("DELETE FROM fo_verified WHERE fo=?", (fo,))

    def verified_digest(self, fo: str) -> str | None:
        row = self.db.execute("SELECT digest FROM fo_verified WHERE fo=?", (fo,)).fetchone()
        return row[0] if row else None

    def set_verified(self, fo: str, digest: str, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO fo_verified (fo, digest, verified) VALUES (?,?,?)", (fo, digest, now))

    def add_snapshot(self, snap: Snapshot) -> None:
        with transaction(self.db.conn):
            self.db.execute(
                "INSERT OR IGNORE INTO snapshots (id, uri, revision, json, created) VALUES (?,?,?,?,?)",
                (snap.id, snap.uri, snap.revision, snap.to_json(), snap.created),
            )
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO snapshot_fos (snapshot, fo) VALUES (?,?)",
                [(snap.id, f.file_object) for f in snap.files],
            )

    def snapshot(self, snapshot_id: str) -> Snapshot:
        row = self.db.execute("SELECT json FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return Snapshot.from_json(row[0])

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM snapshots WHERE id=?", (snapshot_id,)).fetchone() is not None

    def datasets(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM datasets ORDER BY name"))

    def put_dataset(self, name: str, uri: str, snapshot: str | None, pinned: bool, state: str,
                    error: str | None, now: float, options: Mapping[str, str] | None = None,
                    managed: bool = False, staged: str | None = None, switch: str = "complete") -> None:
        self.db.execute(
            """INSERT INTO datasets (name, uri, snapshot, pinned, state, error, created, options, managed, staged,
                                     switch)
               VALUES (?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(name) DO UPDATE SET uri=excluded.uri, snapshot=excluded.snapshot,
               pinned=excluded.pinned, state=excluded.state, error=excluded.error, options=excluded.options,
               managed=excluded.managed, staged=excluded.staged, switch=excluded.switch""",
            (name, uri, snapshot, int(pinned), state, error, now, json.dumps(dict(options or {}), sort_keys=True),
             int(managed), staged, switch),
        )

    def delete_dataset(self, name: str) -> None:
        self.db.execute("DELETE FROM datasets WHERE name=?", (name,))

    def gc_snapshots(self) -> None:
        """Forget snapshots no dataset points at (their block ids stay known per file object)."""
        with transaction(self.db.conn):
            live = """SELECT snapshot FROM datasets WHERE snapshot IS NOT NULL
                      UNION SELECT staged FROM datasets WHERE staged IS NOT NULL"""
            self.db.execute(f"DELETE FROM snapshot_fos WHERE snapshot NOT IN ({live})")
            self.db.execute(f"DELETE FROM snapshots WHERE id NOT IN ({live})")

    def blocks_of_snapshot(self, snapshot_id: str) -> set[str]:
        rows = self.db.execute(
            "SELECT fb.block FROM fo_blocks fb JOIN snapshot_fos sf ON sf.fo = fb.fo WHERE sf.snapshot=?",
            (snapshot_id,),
        ).fetchall()
        return {r[0] for r in rows}

    def pinned_blocks(self, but: str) -> set[str]:
        """Blocks of the current and staged snapshots of every pinned dataset other than ``but``.

        By dataset, not by snapshot: two pinned datasets may show the same
        snapshot (one URI pulled under two names). ``but`` is left out by
        name, so that evicting it works even when its unpinned row could not
        be saved (a full cache disk, which evicting is meant to relieve).
        """
        rows = self.db.execute(
            """SELECT fb.block FROM fo_blocks fb JOIN snapshot_fos sf ON sf.fo = fb.fo
               JOIN datasets d ON sf.snapshot IN (d.snapshot, d.staged) WHERE d.pinned = 1 AND d.name != ?""",
            (but,),
        ).fetchall()
        return {r[0] for r in rows}
