"""Reading and pruning the run store: queries, records with side files, retention.

:class:`StoreHistory` is the read side of :class:`labd.store.RunStore`; it uses the store's
reader connection (guarded by a lock) and never the writer thread's. :class:`HistoryFile`
is the same read side on a file opened read-only, with no writer and no lock, so a history
can be read while another process writes it, or after that process died.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from labd.errors import LabDaemonException, iso_from_timestamp
from labd.io import loads_json

__all__ = ["FILE_KEY", "HistoryFile", "HistoryFileError", "StoreHistory", "iso"]

#: Marks a NumPy array stored in a side file: ``{FILE_KEY: "run-3/result-0.npy", ...}``.
FILE_KEY = "__labd_npy__"


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC for a stored epoch time, None for none."""
    return iso_from_timestamp(ts) if ts else None


class StoreHistory:
    """Queries and retention on top of the store's reader connection."""

    files_dir: Path
    _reader: sqlite3.Connection
    _read_lock: threading.Lock

    def flush(self, timeout: float | None = 5.0) -> bool:  # provided by RunStore
        raise NotImplementedError

    def _internalize(self, value: Any) -> Any:
        if isinstance(value, dict):
            if FILE_KEY in value and isinstance(value[FILE_KEY], str):
                path = (self.files_dir / value[FILE_KEY]).resolve()
                if self.files_dir.resolve() in path.parents and path.exists():
                    return np.load(path, allow_pickle=False)
                return {**value, "missing": True}
            return {k: self._internalize(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._internalize(v) for v in value]
        return value

    def _decode(self, raw: bytes | str | None) -> Any:
        return None if raw is None else self._internalize(loads_json(raw))

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            yield self._reader

    def runs(
        self, *, status: str | None = None, task_type: str | None = None, since: float | None = None,
        limit: int = 50, offset: int = 0, before_uid: int | None = None,
    ) -> list[dict[str, Any]]:
        """Summaries (no result, no events), newest first, filtered and paginated."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if task_type is not None:
            where.append("task_type = ?")
            args.append(task_type)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if before_uid is not None:
            where.append("uid < ?")
            args.append(before_uid)
        sql = ("SELECT uid, task_id, task_type, status, params, device_ids, owner, parent_id, progress,"
               " error, created_at, started_at, finished_at FROM runs"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY uid DESC LIMIT ? OFFSET ?")
        with self._read() as conn:
            rows = conn.execute(sql, (*args, int(limit), int(offset))).fetchall()
        return [self._summary(row) for row in rows]

    def _summary(self, row: tuple[Any, ...]) -> dict[str, Any]:
        uid, task_id, task_type, status, params, device_ids, owner, parent_id, progress, error, c, s, f = row
        return {
            "uid": uid, "task_id": task_id, "task_type": task_type, "status": status,
            "params": self._decode(params), "device_ids": self._decode(device_ids), "owner": owner,
            "parent_id": parent_id, "progress": self._decode(progress), "error": self._decode(error),
            "created_at": iso(c), "started_at": iso(s), "finished_at": iso(f),
        }

    def get_run(self, task_id: str, *, events_limit: int = 1000) -> dict[str, Any] | None:
        """The newest run with ``task_id``: summary, result, error and its last events."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT uid, task_id, task_type, status, params, device_ids, owner, parent_id, progress,"
                " error, created_at, started_at, finished_at, result FROM runs WHERE task_id=?"
                " ORDER BY uid DESC LIMIT 1", (task_id,),
            ).fetchone()
            if row is None:
                return None
            events = conn.execute(
                "SELECT ts, kind, body FROM (SELECT id, ts, kind, body FROM run_events WHERE run_uid=?"
                " ORDER BY id DESC LIMIT ?) ORDER BY id", (row[0], int(events_limit)),
            ).fetchall()
        record = self._summary(row[:13])
        record["result"] = self._decode(row[13])
        record["events"] = [{"timestamp": iso(ts), "kind": kind, "body": self._decode(body)}
                            for ts, kind, body in events]
        return record

    def device_errors(self, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recorded device errors, newest first."""
        sql = "SELECT record FROM device_errors"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id=?"
            args = (device_id,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [loads_json(r[0]) for r in rows]

    def lease_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recorded lease events, newest first."""
        with self._read() as conn:
            rows = conn.execute("SELECT ts, event, body FROM lease_events ORDER BY id DESC LIMIT ?",
                                (int(limit),)).fetchall()
        return [{"timestamp": iso(ts), "event": ev, "lease": loads_json(body)} for ts, ev, body in rows]

    def prune(
        self, *, older_than: float | None = None, max_bytes: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished runs older than ``older_than`` seconds and, while the file is above
        ``max_bytes``, the oldest finished runs; then VACUUM. Returns the number deleted."""
        self.flush()
        deleted = 0
        if older_than is not None:
            cutoff = time.time() - older_than
            deleted += self._delete_where("finished_at IS NOT NULL AND finished_at < ?", (cutoff,), progress)
        if max_bytes is not None:
            deleted += self._shrink_to(max_bytes, progress)
        self._vacuum()
        return deleted

    def _shrink_to(self, max_bytes: int, progress: Callable[[int], None] | None) -> int:
        # Live bytes exclude free pages, so we can measure after each small delete and VACUUM
        # (which rewrites the whole file) only once at the end.
        deleted = 0
        with self._read() as conn:
            total = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        step = max(1, min(500, total // 20))  # 5 % of the runs at a time: never far past the cap
        while self._file_bytes() > max_bytes:
            n = self._delete_where(
                "uid IN (SELECT uid FROM runs WHERE status NOT IN ('pending','running','paused')"
                f" ORDER BY uid LIMIT {step})", (), progress)
            if n == 0:
                break
            deleted += n
        if deleted:
            self._vacuum()
        return deleted

    def _delete_where(self, where: str, args: tuple[Any, ...], progress: Callable[[int], None] | None) -> int:
        with self._read() as conn:
            uids = [r[0] for r in conn.execute(f"SELECT uid FROM runs WHERE {where}", args).fetchall()]
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"DELETE FROM run_events WHERE run_uid IN ({marks})", chunk)
                conn.execute(f"DELETE FROM runs WHERE uid IN ({marks})", chunk)
                conn.execute("COMMIT")
                for uid in chunk:
                    shutil.rmtree(self.files_dir / f"run-{uid}", ignore_errors=True)
                if progress is not None:
                    progress(len(chunk))
        return len(uids)

    def _vacuum(self) -> None:
        with self._read() as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")

    def _file_bytes(self) -> int:
        with self._read() as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)



class HistoryFileError(LabDaemonException):
    """A file cannot be read as a run store history (missing, not a run store, unreadable)."""


class HistoryFile(StoreHistory):
    """A run store file opened read-only: list, show and export runs without a server.

    Takes no lock and writes nothing, so it works while a labd process writes the file.
    Runs that a dead process left active still read as active until a store opens the file
    for writing (which marks them ``interrupted``).

    Example::

        with HistoryFile("runs.db") as history:
            history.runs(status="failed")
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.files_dir = self.path.with_name(self.path.name + ".files")
        self._read_lock = threading.Lock()
        if not self.path.is_file():
            raise HistoryFileError(f"No run store at {str(self.path)!r}; pass the database file "
                                   "with --db PATH (or set LABD_DB).")
        try:
            self._reader = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           timeout=10.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise HistoryFileError(f"Cannot read run store {str(self.path)!r}: {exc}.") from exc
        try:
            self._reader.execute("SELECT uid FROM runs LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            self._reader.close()
            raise HistoryFileError(
                f"Cannot read {str(self.path)!r} as a labd run store: {exc}.") from exc

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Nothing to flush: this reader never writes."""
        return True

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._read_lock:
            self._reader.close()

    def __enter__(self) -> HistoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
