"""The durable queue and transfer state: one sqlite database in WAL mode.

`synchronous=FULL` makes every commit fsync the WAL, so whatever this module
has returned from is on disk: the queue survives kill -9, and a chunk is
listed as held only after its bytes were fsync'd (the caller's ordering).
"""

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    peer TEXT NOT NULL,
    peer_node_key TEXT NOT NULL,
    state TEXT NOT NULL,
    manifest BLOB NOT NULL,
    manifest_hash BLOB NOT NULL,
    bytes_total INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    receipt BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    notify_peer INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    transfer_id TEXT NOT NULL REFERENCES transfers(id),
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    source BLOB,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 BLOB,
    PRIMARY KEY (transfer_id, idx)
);
CREATE TABLE IF NOT EXISTS held_chunks (
    transfer_id TEXT NOT NULL,
    slot INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    PRIMARY KEY (transfer_id, slot)
) WITHOUT ROWID;
"""

ACTIVE_STATES = ("queued", "active", "waiting")
FINAL_STATES = ("done", "failed", "cancelled")


class FileRow(NamedTuple):
    # A tuple, not a frozen dataclass: reading back 100,000 rows took 0.46 s
    # that way, most of it in the dataclass's __init__.
    idx: int
    path: str
    source: bytes | None
    size: int
    mtime_ns: int
    sha256: bytes | None


class Store:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        self._forget_crc_chunks()
        # Rows of a transfer whose adding a crash interrupted (Node.add_file_rows).
        self._db.execute("DELETE FROM files WHERE transfer_id NOT IN (SELECT id FROM transfers)")
        # Called with a transfer's id after each update of its row: how the
        # daemon wakes those waiting on a transfer (Node.next_update).
        self.on_update: Callable[[str], None] = lambda transfer_id: None

    def close(self) -> None:
        self._db.close()

    def _forget_crc_chunks(self) -> None:
        """Earlier builds kept a CRC-32 per held chunk, in a table `chunks`.
        Those chunks are forgotten, so they are fetched again, and the
        progress of unfinished incoming transfers restarts from zero to say
        so; nothing finished depends on them."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunks'").fetchone():
            with self._tx():
                self._db.execute(
                    "UPDATE transfers SET bytes_done = 0 WHERE direction = 'in'"
                    f" AND state NOT IN ({', '.join('?' * len(FINAL_STATES))})",
                    FINAL_STATES,
                )
                self._db.execute("DROP TABLE chunks")

    def _tx(self):
        return _Transaction(self._db)

    def add_files(self, transfer_id: str, first: int, files: list) -> None:
        """File rows `first`... of a transfer not yet added: `files` are
        (path, source or None, size, mtime_ns) in manifest order. The
        transfer row comes last (add_transfer_row), so a crash between steps
        leaves no transfer, only rows that the next start deletes."""
        with self._tx():
            if first == 0:
                if self.get(transfer_id) is not None:
                    raise sqlite3.IntegrityError(f"transfer {transfer_id} already exists")
                self._db.execute("DELETE FROM files WHERE transfer_id = ?", (transfer_id,))
            self._db.executemany(
                "INSERT INTO files (transfer_id, idx, path, source, size, mtime_ns) VALUES (?,?,?,?,?,?)",
                [(transfer_id, first + i, *f) for i, f in enumerate(files)],
            )

    def add_transfer_row(self, *, id, direction, peer, peer_node_key, state, manifest, manifest_hash, bytes_total, now):
        self._db.execute(
            "INSERT INTO transfers (id, direction, peer, peer_node_key, state, manifest, manifest_hash,"
            " bytes_total, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (id, direction, peer, peer_node_key, state, manifest, manifest_hash, bytes_total, now, now),
        )

    def get(self, transfer_id: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM transfers WHERE id = ?", (transfer_id,)).fetchone()

    def all_transfers(self) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM transfers ORDER BY created, id").fetchall()

    def files(self, transfer_id: str, first: int = 0, limit: int = -1) -> list[FileRow]:
        """File rows in manifest order, from index `first`, at most `limit` of them (-1: all)."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute(
            "SELECT idx, path, source, size, mtime_ns, sha256 FROM files WHERE transfer_id = ? AND idx >= ?"
            " ORDER BY idx LIMIT ?",
            (transfer_id, first, limit),
        )
        return list(map(FileRow._make, cursor))

    def file_count(self, transfer_id: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM files WHERE transfer_id = ?", (transfer_id,)).fetchone()[0]

    def update(self, transfer_id: str, now: str, **fields) -> None:
        columns = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(
            f"UPDATE transfers SET {columns}, updated = ? WHERE id = ?", (*fields.values(), now, transfer_id)
        )
        self.on_update(transfer_id)

    def set_file_sha256(self, transfer_id: str, digests: dict[int, bytes]) -> None:
        """Record file hashes, in one transaction (one fsync, however many files)."""
        with self._tx():
            self._set_sha256(transfer_id, digests)

    def save_sent(self, transfer_id: str, digests: dict[int, bytes], bytes_done: int, now: str) -> None:
        """A sender's progress: file hashes and bytes sent, in one transaction."""
        with self._tx():
            self._set_sha256(transfer_id, digests)
            self.update(transfer_id, now, bytes_done=bytes_done)

    def _set_sha256(self, transfer_id: str, digests: dict[int, bytes]) -> None:
        for first, run in _runs(digests):
            joined, width = _joined(run)
            self._db.execute(
                "UPDATE files SET sha256 = substr(?1, (idx - ?2) * ?5 + 1, ?5)"
                " WHERE transfer_id = ?3 AND idx >= ?2 AND idx < ?4",
                (joined, first, transfer_id, first + len(run), width),
            )

    def pending_outgoing(self) -> list[sqlite3.Row]:
        """Outgoing work: transfers to deliver, and cancellations the peer
        has not heard of yet."""
        return self._db.execute(
            "SELECT * FROM transfers WHERE direction = 'out'"
            " AND (state IN ('queued', 'active', 'waiting') OR notify_peer = 1)"
            " ORDER BY created, id"
        ).fetchall()

    def mark_interrupted(self, now: str) -> None:
        """At start: nothing is connected yet, so no transfer is active."""
        self._db.execute("UPDATE transfers SET state = 'waiting', updated = ? WHERE state = 'active'", (now,))

    def chunks(self, transfer_id: str, after: int = -1, limit: int = -1) -> dict[int, bytes]:
        """Held chunks, slot -> check (storage.chunk_check), in slot order: those past slot `after`,
        at most `limit` of them (-1: all)."""
        rows = self._db.execute(
            "SELECT slot, checksum FROM held_chunks WHERE transfer_id = ? AND slot > ? ORDER BY slot LIMIT ?",
            (transfer_id, after, limit),
        )
        return dict(rows.fetchall())

    def add_chunks(self, transfer_id: str, chunks: list[tuple[int, bytes]], bytes_done: int, now: str) -> None:
        """Record chunks as verified and durable. Call only after their bytes
        were fsync'd."""
        with self._tx():
            for first, run in _runs(dict(chunks)):
                joined, width = _joined(run)
                self._db.execute(
                    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?4)"
                    " INSERT OR REPLACE INTO held_chunks (transfer_id, slot, checksum)"
                    " SELECT ?1, ?2 + i, substr(?3, i * ?5 + 1, ?5) FROM n",
                    (transfer_id, first, joined, len(run), width),
                )
            self.update(transfer_id, now, bytes_done=bytes_done)

    def drop_chunks(self, transfer_id: str, slots: list[int] | None = None) -> None:
        if slots is None:
            self._db.execute("DELETE FROM held_chunks WHERE transfer_id = ?", (transfer_id,))
        else:
            with self._tx():
                self._db.executemany(
                    "DELETE FROM held_chunks WHERE transfer_id = ? AND slot = ?", [(transfer_id, s) for s in slots]
                )


# Rows keyed by consecutive numbers (a folder's files, the chunks of a
# flush) are written one statement per run, each row taking its value out of
# the run's values joined: SQLite loops instead of Python. For 10,000 files,
# file hashes took 16-25 ms against 55-82 row by row (executemany), and
# held chunks 25-50 ms against 55-80 in flushes of 500.
def _runs(values: dict[int, bytes]) -> list[tuple[int, list[bytes]]]:
    """(first key, values) for each run of consecutive keys."""
    runs: list[tuple[int, list[bytes]]] = []
    for key in sorted(values):
        if runs and runs[-1][0] + len(runs[-1][1]) == key:
            runs[-1][1].append(values[key])
        else:
            runs.append((key, [values[key]]))
    return runs


def _joined(run: list[bytes]) -> tuple[bytes, int]:
    """The values joined, and the length of each."""
    width = len(run[0])
    if width == 0 or any(len(value) != width for value in run):
        raise ValueError("values of a run must all have the same, non-zero length")
    return b"".join(run), width


class _Transaction:
    def __init__(self, db):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, tb):
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
