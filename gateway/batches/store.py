"""Files and batches on disk: SQLite for the rows, a directory for the files' bytes.

Everything the runner needs to resume after a restart of every process is
here: a batch's status and each of its requests, pending until its one result
is committed. A result is written by one ``UPDATE ... WHERE state = 'pending'``,
so a request's result is committed once, whatever runs it again.

WAL with ``synchronous=NORMAL``: a committed result survives a crash of any
process (not a power cut of the machine), at no fsync per request.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
from pathlib import Path
from typing import IO, Any, BinaryIO

import shortuuid

from gateway.batches.storage import ACTIVE, TIMESTAMPS, Request, not_found

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, output_file_id TEXT, error_file_id TEXT, errors TEXT,
    metadata TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER
);
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', result TEXT,
    PRIMARY KEY (batch_id, custom_id)
);
CREATE INDEX IF NOT EXISTS pending_requests ON requests (batch_id, state, line);
"""


class BatchStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._claim: IO[str] | None = None
        self.files_dir = data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(data_dir / "batches.sqlite3", isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()
        if self._claim is not None:
            self._claim.close()

    def claim(self) -> bool:
        """Whether this process runs the data directory's batches: one runner per directory
        (gateways sharing it serve its API; an flock, let go when the process ends)."""
        if self._claim is None:
            handle = (self.data_dir / "runner.lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._claim = handle
        return True

    def _seq(self, table: str) -> int:
        row = self.db.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()
        return int(row[0])

    # -- files ----------------------------------------------------------------

    def add_file(
        self, owner: str, filename: str, purpose: str, content: bytes, file_id: str | None = None
    ) -> sqlite3.Row:
        """A new file; with ``file_id``, written again whole if it exists (a batch's results)."""
        file_id = file_id or f"file-{shortuuid.uuid()}"
        path = self.files_dir / file_id
        path.write_bytes(content)  # before its row: a row always has its bytes
        self.db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
            (file_id, owner, filename, purpose, len(content), int(time.time()), self._seq("files")),
        )
        return self.file(owner, file_id)

    def file(self, owner: str, file_id: str) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
        if row is None:
            raise not_found("File", file_id)
        return row

    def files(self, owner: str, purpose: str, limit: int, after: str) -> tuple[list[sqlite3.Row], bool]:
        """Newest first, a page after the file ``after``."""
        query, args = "SELECT * FROM files WHERE owner = ?", [owner]
        if purpose:
            query, args = query + " AND purpose = ?", [*args, purpose]
        if after:
            query, args = query + " AND seq < ?", [*args, self.file(owner, after)["seq"]]
        rows = self.db.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
        return rows[:limit], len(rows) > limit

    def content(self, owner: str, file_id: str) -> bytes:
        self.file(owner, file_id)
        return (self.files_dir / file_id).read_bytes()

    def open_content(self, owner: str, file_id: str) -> BinaryIO:
        """The file to read in pieces (still readable if it is deleted meanwhile)."""
        self.file(owner, file_id)
        return (self.files_dir / file_id).open("rb")

    def delete_file(self, owner: str, file_id: str) -> None:
        self.file(owner, file_id)
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        (self.files_dir / file_id).unlink(missing_ok=True)

    # -- batches --------------------------------------------------------------

    def add_batch(
        self, owner: str, endpoint: str, input_file_id: str, window_seconds: int, metadata: dict[str, str]
    ) -> sqlite3.Row:
        batch_id = f"batch_{shortuuid.uuid()}"
        now = int(time.time())
        self.db.execute(
            "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, created_at,"
            " expires_at, metadata, seq) VALUES (?, ?, ?, ?, '24h', 'validating', ?, ?, ?, ?)",
            (
                batch_id,
                owner,
                endpoint,
                input_file_id,
                now,
                now + window_seconds,
                json.dumps(metadata),
                self._seq("batches"),
            ),
        )
        return self.batch(owner, batch_id)

    def batch(self, owner: str | None, batch_id: str) -> sqlite3.Row:
        """A batch of ``owner`` (None: whoever's, for the runner)."""
        row = self.db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            raise not_found("Batch", batch_id)
        return row

    def batches(self, owner: str, limit: int, after: str) -> tuple[list[sqlite3.Row], bool]:
        query, args = "SELECT * FROM batches WHERE owner = ?", [owner]
        if after:
            query, args = query + " AND seq < ?", [*args, self.batch(owner, after)["seq"]]
        rows = self.db.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
        return rows[:limit], len(rows) > limit

    def active(self) -> list[sqlite3.Row]:
        """Batches the runner has work on, oldest first."""
        marks = ", ".join("?" * len(ACTIVE))
        return self.db.execute(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE).fetchall()

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """A new status, with its timestamp (``<status>_at``) and other columns."""
        stamp = f"{status}_at"
        if stamp in TIMESTAMPS:
            fields[stamp] = int(time.time())
        columns = ", ".join(f"{name} = ?" for name in ["status", *fields])
        self.db.execute(f"UPDATE batches SET {columns} WHERE id = ?", [status, *fields.values(), batch_id])

    def start(self, batch_id: str, requests: list[tuple[int, str, str]]) -> None:
        """Validated: its requests (line, custom_id, body JSON), in one transaction with in_progress."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO requests (batch_id, line, custom_id, body) VALUES (?, ?, ?, ?)",
                [(batch_id, line, custom_id, body) for line, custom_id, body in requests],
            )
            self.db.execute(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ? WHERE id = ?",
                (int(time.time()), len(requests), batch_id),
            )

    def fail(self, batch_id: str, problems: list[dict[str, Any]]) -> None:
        self.set_status(batch_id, "failed", errors=json.dumps(problems))

    def pending(self, batch_id: str, limit: int, skip: set[str]) -> list[Request]:
        """Requests without a result, in file order, but those in ``skip`` (running now)."""
        rows = self.db.execute(
            "SELECT line, custom_id, body FROM requests WHERE batch_id = ? AND state = 'pending' ORDER BY line LIMIT ?",
            (batch_id, limit + len(skip)),
        ).fetchall()
        found = [Request(batch_id, r["line"], r["custom_id"], json.loads(r["body"])) for r in rows]
        return [r for r in found if r.custom_id not in skip][:limit]

    def commit(self, request: Request, ok: bool, result: str) -> bool:
        """Its one result (a JSON line): False when it already had one (nothing is written twice)."""
        cursor = self.db.execute(
            "UPDATE requests SET state = ?, result = ? WHERE batch_id = ? AND custom_id = ? AND state = 'pending'",
            ("completed" if ok else "failed", result, request.batch_id, request.custom_id),
        )
        return cursor.rowcount == 1

    def counts(self, batch_id: str) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT state, COUNT(*) FROM requests WHERE batch_id = ? GROUP BY state", (batch_id,)
        ).fetchall()
        found = {row[0]: row[1] for row in rows}
        return {
            "completed": found.get("completed", 0),
            "failed": found.get("failed", 0),
            "pending": found.get("pending", 0),
        }

    def results(self, batch_id: str, state: str) -> list[str]:
        """The committed result lines of one state, in input order."""
        rows = self.db.execute(
            "SELECT result FROM requests WHERE batch_id = ? AND state = ? ORDER BY line", (batch_id, state)
        ).fetchall()
        return [row[0] for row in rows]
