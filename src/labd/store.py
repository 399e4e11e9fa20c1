"""The run store: a durable history of runs, device errors, leases and daemon sessions.

One SQLite file in WAL mode, written by one writer thread fed by a queue, so task and
device threads only ever do a queue put. Each batch of queued records is one transaction.
On open, runs that a previous process left ``pending``/``running``/``paused`` become
``interrupted`` at the time of their last record. Results and emitted data are stored as
JSON (``labd.io.dumps_json``: NumPy-aware, NaN-safe); NumPy arrays larger than
``array_threshold`` bytes go to ``.npy`` side files in ``<db>.files/`` and are loaded back
transparently. When the disk fails (full, read-only) the store turns *degraded*: it logs
once, counts what it could not write, and the daemon keeps working.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from labd.errors import LabDaemonException
from labd.io import dumps_json
from labd.store_history import FILE_KEY, StoreHistory

__all__ = ["SCHEMA_VERSION", "RunStore", "StoreError", "default_db_path"]

log = logging.getLogger("labd.store")

SCHEMA_VERSION = 1
_ACTIVE = ("pending", "running", "paused")

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE runs (
        uid INTEGER PRIMARY KEY, task_id TEXT NOT NULL, task_type TEXT NOT NULL,
        status TEXT NOT NULL, params TEXT, device_ids TEXT, owner TEXT, parent_id TEXT,
        progress TEXT, result TEXT, error TEXT, created_at REAL NOT NULL, started_at REAL,
        finished_at REAL, updated_at REAL NOT NULL, session INTEGER
    );
    CREATE INDEX runs_task_id ON runs(task_id, uid);
    CREATE INDEX runs_created ON runs(created_at);
    CREATE INDEX runs_status ON runs(status, created_at);
    CREATE INDEX runs_type ON runs(task_type, created_at);
    CREATE TABLE run_events (
        id INTEGER PRIMARY KEY, run_uid INTEGER NOT NULL, ts REAL NOT NULL,
        kind TEXT NOT NULL, body TEXT
    );
    CREATE INDEX run_events_run ON run_events(run_uid, id);
    CREATE TABLE device_errors (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, device_id TEXT, type TEXT, message TEXT,
        origin TEXT, record TEXT
    );
    CREATE INDEX device_errors_device ON device_errors(device_id, id);
    CREATE TABLE lease_events (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, lease_id TEXT, owner TEXT, event TEXT, body TEXT
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY, started_at REAL NOT NULL, stopped_at REAL, pid INTEGER, host TEXT
    );
    """,
}


class StoreError(LabDaemonException):
    """The run store cannot be opened (bad path, read-only file, newer schema)."""


def default_db_path() -> Path:
    """``$LABD_DB``, else ``$XDG_DATA_HOME/labd/labd.db`` (``~/.local/share/labd/labd.db``)."""
    env = os.environ.get("LABD_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "labd" / "labd.db"


class RunStore(StoreHistory):
    """Durable run history on SQLite; every write is a non-blocking queue put.

    Example::

        store = RunStore("runs.db")
        daemon = labd.LabDaemon(store=store)   # or LabDaemon(store="runs.db")
        ...
        store.runs(status="completed", limit=10)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_emit_bytes: int = 64 * 1024,
        array_threshold: int = 256 * 1024,
        create_dirs: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.files_dir = self.path.with_name(self.path.name + ".files")
        self.max_emit_bytes = max_emit_bytes
        self.array_threshold = array_threshold
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 64 * 1024):
            raise StoreError(f"max_bytes must be an integer of at least 65536 (64 KiB), got {max_bytes!r}")
        #: Size cap: the writer deletes the oldest finished runs when the database grows past it.
        self.max_bytes = max_bytes
        self._last_cap_check = 0.0
        self.degraded_reason: str | None = None
        self.dropped_records = 0
        self.written_records = 0
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._read_lock = threading.Lock()
        self._closed = False
        self._check_path(create_dirs)
        self._lock_fd = self._lock_file()
        self._writer_conn = self._connect()
        self._migrate(self._writer_conn)
        self._reader = self._connect()
        self.interrupted = self._mark_interrupted()
        self._next_uid = self._max_uid() + 1
        self._uid_lock = threading.Lock()
        self.session = self._start_session()
        self._thread = threading.Thread(target=self._write_loop, name="labd-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    def _check_path(self, create_dirs: bool) -> None:
        parent = self.path.parent
        if not parent.exists():
            if not create_dirs:
                raise StoreError(
                    f"Cannot open run store {str(self.path)!r}: directory {str(parent)!r} does not "
                    "exist. Create it, or choose another path (--db / LABD_DB)."
                )
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"Cannot create directory {str(parent)!r} for the run store: {exc.strerror}.") from exc
        if self.path.is_dir():
            raise StoreError(f"Run store path {str(self.path)!r} is a directory; give a file path such as {str(self.path / 'labd.db')!r}.")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(
                f"Run store {str(self.path)!r} is read-only; labd needs to write its history. "
                "Fix the file's permissions or choose another path (--db / LABD_DB)."
            )
        if not os.access(parent, os.W_OK):
            raise StoreError(
                f"Cannot write in directory {str(parent)!r} for the run store {str(self.path)!r}; "
                "choose a writable path (--db / LABD_DB)."
            )

    def _lock_file(self) -> int | None:
        """Hold ``<db>.lock`` for as long as the store is open: one writing process per file.

        Opening a store marks every active run interrupted, so a second live process on the
        same file would rewrite the first one's history. The OS drops the lock if we crash.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no cross-process guard
            return None
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"Cannot open run store {str(self.path)!r}: {exc.strerror}. The file or its "
                "directory is not writable (read-only filesystem or permissions); choose another "
                "path (--db / LABD_DB)."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreError(
                f"Run store {str(self.path)!r} is in use by labd process {holder}; only one "
                "process may write a run store. Stop it, or use another --db path."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(
                f"Cannot open run store {str(self.path)!r}: {exc}. The file or its directory is not "
                "writable (read-only filesystem or permissions); choose another path (--db / LABD_DB)."
            ) from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"Run store {str(self.path)!r} has schema version {version}, newer than this "
                    f"labd understands ({SCHEMA_VERSION}); upgrade labd or use another file."
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _MIGRATIONS[target].split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"Cannot use {str(self.path)!r} as a run store: {exc}.") from exc

    def _mark_interrupted(self) -> int:
        conn = self._writer_conn
        rows = conn.execute(
            f"SELECT uid, updated_at, status FROM runs WHERE status IN ({','.join('?' * len(_ACTIVE))})",
            _ACTIVE,
        ).fetchall()
        if rows:
            conn.execute("BEGIN")
            for uid, updated_at, status in rows:
                conn.execute(
                    "UPDATE runs SET status='interrupted', finished_at=?, updated_at=? WHERE uid=?",
                    (updated_at, updated_at, uid),
                )
                body = dumps_json({"status": "interrupted", "was": status,
                                   "reason": "the labd process stopped while this run was active"})
                conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                             (uid, updated_at, "state", body))
            conn.execute("COMMIT")
        return len(rows)

    def _max_uid(self) -> int:
        row = self._writer_conn.execute("SELECT COALESCE(MAX(uid), 0) FROM runs").fetchone()
        return int(row[0])

    def _start_session(self) -> int:
        cur = self._writer_conn.execute(
            "INSERT INTO sessions(started_at, pid, host) VALUES (?,?,?)",
            (time.time(), os.getpid(), os.uname().nodename),
        )
        return int(cur.lastrowid or 0)

    # ------------------------------------------------------------------ producers
    def new_uid(self) -> int:
        """A fresh run uid (assigned without touching the disk)."""
        with self._uid_lock:
            uid = self._next_uid
            self._next_uid += 1
            return uid

    def _put(self, op: str, *args: Any) -> None:
        if not self._closed:
            self._queue.put((op, time.time(), *args))

    def run_created(self, uid: int, info: dict[str, Any]) -> None:
        """Record a new run (``info``: task_id, task_type, status, params, device_ids, owner, parent_id)."""
        self._put("created", uid, info)

    def run_state(self, uid: int, status: str, started_at: float | None) -> None:
        """Record a state change."""
        self._put("state", uid, status, started_at)

    def run_progress(self, uid: int, progress: dict[str, Any]) -> None:
        """Record a progress report (every one is kept)."""
        self._put("progress", uid, progress)

    def run_data(self, uid: int, data: Any) -> None:
        """Record emitted data (truncated to ``max_emit_bytes`` when encoded)."""
        self._put("data", uid, data)

    def run_finished(
        self, uid: int, status: str, result: Any, error: dict[str, Any] | None,
        finished_at: float, done: Any = None,
    ) -> None:
        """Record the end of a run; ``done`` is set once it is committed."""
        self._put("finished", uid, status, result, error, finished_at, done)

    def device_error(self, record: dict[str, Any]) -> None:
        """Record a device (or callback) error record."""
        self._put("device_error", record)

    def lease_event(self, event: str, lease: dict[str, Any]) -> None:
        """Record a lease being granted, renewed, released, expired or broken."""
        self._put("lease", event, lease)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(("flush", time.time(), done))
        return done.wait(timeout)

    # ------------------------------------------------------------------ writer
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < 5000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is None for entry in batch)
            self._write_batch([entry for entry in batch if entry is not None])
            if stop:
                return
            self._enforce_cap()

    def _enforce_cap(self) -> None:
        """On the writer thread, at most every 5 s: keep the file under ``max_bytes``."""
        if self.max_bytes is None or time.monotonic() - self._last_cap_check < 5.0:
            return
        self._last_cap_check = time.monotonic()
        try:
            if self._file_bytes() > self.max_bytes:
                deleted = self._shrink_to(self.max_bytes, None)
                log.info("labd run store %s: deleted %d oldest runs to stay under %d bytes",
                         self.path, deleted, self.max_bytes)
        except (sqlite3.Error, OSError) as exc:
            log.warning("labd run store %s: size cap not applied: %s", self.path, exc)

    def _write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        waiters = [entry[2] for entry in batch if entry[0] == "flush"]
        waiters += [entry[-1] for entry in batch if entry[0] == "finished" and entry[-1] is not None]
        records = [entry for entry in batch if entry[0] != "flush"]
        if records:
            conn = self._writer_conn
            try:
                conn.execute("BEGIN")
                for entry in records:
                    self._apply(conn, entry)
                conn.execute("COMMIT")
                self.written_records += len(records)
                if self.degraded_reason is not None:
                    log.warning("labd run store %s is writable again", self.path)
                    self.degraded_reason = None
            except (sqlite3.Error, OSError) as exc:
                with _suppress_sqlite():
                    conn.execute("ROLLBACK")
                self.dropped_records += len(records)
                if self.degraded_reason is None:
                    log.error("labd run store %s degraded: %s; history is not being saved", self.path, exc)
                self.degraded_reason = f"{type(exc).__name__}: {exc}"
        for event in waiters:
            event.set()

    def _apply(self, conn: sqlite3.Connection, entry: tuple[Any, ...]) -> None:
        getattr(self, f"_apply_{entry[0]}")(conn, entry[1], *entry[2:])

    def _apply_created(self, conn: sqlite3.Connection, ts: float, uid: int, info: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO runs(uid, task_id, task_type, status, params, device_ids, owner, parent_id,"
            " created_at, updated_at, session) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (uid, info["task_id"], info["task_type"], info["status"],
             self._encode(info.get("params"), uid, "params"), dumps_json(info.get("device_ids", [])),
             info.get("owner"), info.get("parent_id"), info.get("created_at", ts), ts, self.session),
        )
        self._event(conn, uid, ts, "state", {"status": info["status"]})

    def _apply_state(
        self, conn: sqlite3.Connection, ts: float, uid: int, status: str, started_at: float | None
    ) -> None:
        conn.execute(
            "UPDATE runs SET status=?, started_at=COALESCE(started_at, ?), updated_at=? WHERE uid=?",
            (status, started_at, ts, uid),
        )
        self._event(conn, uid, ts, "state", {"status": status})

    def _apply_progress(self, conn: sqlite3.Connection, ts: float, uid: int, progress: Any) -> None:
        body = dumps_json(progress)
        conn.execute("UPDATE runs SET progress=?, updated_at=? WHERE uid=?", (body, ts, uid))
        conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                     (uid, ts, "progress", body))

    def _apply_data(self, conn: sqlite3.Connection, ts: float, uid: int, data: Any) -> None:
        body = self._encode(data, uid, "data")
        if body is not None and len(body) > self.max_emit_bytes:
            body = dumps_json({"truncated": True, "bytes": len(body)})
        conn.execute("UPDATE runs SET updated_at=? WHERE uid=?", (ts, uid))
        conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                     (uid, ts, "data", body))

    def _apply_finished(
        self, conn: sqlite3.Connection, ts: float, uid: int, status: str, result: Any,
        error: dict[str, Any] | None, finished_at: float, done: Any,
    ) -> None:
        conn.execute(
            "UPDATE runs SET status=?, result=?, error=?, finished_at=?, updated_at=? WHERE uid=?",
            (status, self._encode(result, uid, "result"), dumps_json(error) if error else None,
             finished_at, ts, uid),
        )
        self._event(conn, uid, ts, "state", {"status": status})

    def _apply_device_error(self, conn: sqlite3.Connection, ts: float, record: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO device_errors(ts, device_id, type, message, origin, record) VALUES (?,?,?,?,?,?)",
            (ts, record.get("context", {}).get("device_id"), record.get("type"), record.get("message"),
             record.get("origin"), dumps_json(record)),
        )

    def _apply_lease(self, conn: sqlite3.Connection, ts: float, event: str, lease: dict[str, Any]) -> None:
        conn.execute("INSERT INTO lease_events(ts, lease_id, owner, event, body) VALUES (?,?,?,?,?)",
                     (ts, lease.get("lease_id"), lease.get("owner"), event, dumps_json(lease)))

    def _apply_session_end(self, conn: sqlite3.Connection, ts: float) -> None:
        conn.execute("UPDATE sessions SET stopped_at=? WHERE id=?", (ts, self.session))

    @staticmethod
    def _event(conn: sqlite3.Connection, uid: int, ts: float, kind: str, body: Any) -> None:
        conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                     (uid, ts, kind, dumps_json(body)))

    def _encode(self, value: Any, uid: int, name: str) -> bytes | None:
        if value is None:
            return None
        counter = iter(range(1_000_000))
        return dumps_json(self._externalize(value, uid, name, counter))

    def _externalize(self, value: Any, uid: int, name: str, counter: Iterator[int]) -> Any:
        if isinstance(value, np.ndarray) and value.nbytes > self.array_threshold:
            self.files_dir.mkdir(exist_ok=True)
            rel = f"run-{uid}/{name}-{next(counter)}.npy"
            target = self.files_dir / rel
            target.parent.mkdir(exist_ok=True)
            np.save(target, value, allow_pickle=False)
            return {FILE_KEY: rel, "shape": list(value.shape), "dtype": str(value.dtype)}
        if isinstance(value, dict):
            return {k: self._externalize(v, uid, name, counter) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._externalize(v, uid, name, counter) for v in value]
        return value



    # ------------------------------------------------------------------ reads






    def stats(self) -> dict[str, Any]:
        """Path, size on disk, row counts and health."""
        with self._read() as conn:
            runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "path": str(self.path), "size_bytes": size, "runs": runs,
            "degraded": self.degraded_reason is not None, "degraded_reason": self.degraded_reason,
            "dropped_records": self.dropped_records, "written_records": self.written_records,
            "queued": self._queue.qsize(), "schema_version": SCHEMA_VERSION,
        }

    # ------------------------------------------------------------------ retention





    # ------------------------------------------------------------------ closing
    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, end the session and close. Idempotent."""
        if self._closed:
            return
        self._queue.put(("session_end", time.time()))
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        for conn in (self._writer_conn, self._reader):
            with _suppress_sqlite():
                conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


@contextmanager
def _suppress_sqlite() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error:
        pass
