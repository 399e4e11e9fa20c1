"""The run store: a durable history of runs, device errors, leases and daemon sessions.

One SQLite file in WAL mode, written by one writer thread fed by a queue. Producers (task
and device threads) encode each value on their own thread when they record it, so a buffer
refilled after ``emit`` never changes what was recorded, and then only do a queue put. Each
batch of queued records is one transaction. On open, runs that a previous process left
``pending``/``running``/``paused`` become ``interrupted`` at the time of their last record.

Values are stored as JSON (``labd.io.dumps_json``: NumPy-aware, NaN-safe); a part that JSON
cannot hold is stored as its ``repr`` with a logged warning, never dropped. NumPy arrays
larger than ``array_threshold`` bytes are copied when recorded and written by the writer to
``.npy`` side files of their own in ``<db>.files/``, loaded back transparently.

Durability (ADR 0011): the writer commits with ``synchronous=FULL``, so a commit, and with it
a run acknowledged as finished, survives power loss, not only a crash. Side files and their
directories are fsynced before the row that references them commits, and deleted again
when that row does not commit. :meth:`RunStore.close` writes everything queued before it
and stops the writer before the database closes.

Failures: the writer never stops. A batch that fails is retried record by record (a
savepoint each), so one bad record, or a full disk, loses only what could not be written.
What failed is reported to whoever waits for it (``flush()`` returns False; a run's
``persisted`` future raises :class:`StoreWriteError`), counted (``dropped_records``), and
makes the store *degraded* (``degraded_reason``, ``/health``) until a write succeeds again.

One process writes a file at a time: an exclusive ``flock`` on ``<db>.lock``, which the OS
drops when the holder dies, so a restart right after ``kill -9`` takes the store over.
Reading a history needs no lock (:class:`labd.store_history.HistoryFile`). The writer
thread's side (encoding, batches, savepoints, side files, health) is :mod:`labd.store_writer`.

Errors::

    LabDaemonException
     +-- StoreError            the store cannot be opened (bad path, read-only, newer schema)
          +-- StoreInUseError  another live process writes this file (``.pid`` names it)
          +-- StoreWriteError  a record could not be written (disk full, I/O error, closed)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from labd.errors import LabDaemonException
from labd.io import dumps_json
from labd.store_history import StoreHistory
from labd.store_writer import Record, RecordEncoder, StoreWriter, as_text

__all__ = ["SCHEMA_VERSION", "RunStore", "StoreError", "StoreInUseError", "StoreWriteError",
           "default_db_path"]

log = logging.getLogger("labd.store")

SCHEMA_VERSION = 1
_ACTIVE = ("pending", "running", "paused")
# A lock whose holder is dead (or a zombie) is released by the kernel as the process exits;
# wait this long for that before calling the file busy.
_DEAD_HOLDER_WAIT_S = 5.0
_PF_EXITING = 0x4  # Linux task flag in /proc/<pid>/stat: the process is being torn down

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


class StoreInUseError(StoreError):
    """Another live process holds the run store's writer lock; ``pid`` names it if known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class StoreWriteError(StoreError):
    """A record could not be written (disk full, I/O error, store closed); the reason says which."""


def default_db_path() -> Path:
    """``$LABD_DB``, else ``$XDG_DATA_HOME/labd/labd.db`` (``~/.local/share/labd/labd.db``)."""
    env = os.environ.get("LABD_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "labd" / "labd.db"


class RunStore(StoreHistory):
    """Durable run history on SQLite; every write is an encode and a non-blocking queue put.

    Example::

        store = RunStore("runs.db")
        daemon = labd.LabDaemon(store=store)   # or LabDaemon(store="runs.db")
        ...
        store.runs(status="completed", limit=10)
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_emit_bytes: int = 64 * 1024,
        array_threshold: int = 256 * 1024, create_dirs: bool = False, max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.files_dir = self.path.with_name(self.path.name + ".files")
        self.max_emit_bytes = max_emit_bytes
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 64 * 1024):
            raise StoreError(f"max_bytes must be an integer of at least 65536 (64 KiB), got {max_bytes!r}")
        #: Size cap: the writer deletes the oldest finished runs when the database grows past it.
        self.max_bytes = max_bytes
        self._last_cap_check = 0.0
        self._encoder = RecordEncoder(array_threshold)  # used on the producers' threads
        self._queue: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        # Held only around a queue put: orders seq numbers and makes close() a clean cut.
        self._put_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._read_lock = threading.Lock()
        self._closed = False
        self._check_path(create_dirs)
        self._lock_fd = self._lock_file()
        try:
            self._writer_conn = self._connect()
            self._migrate(self._writer_conn)
            self._reader = self._connect()
            self.interrupted = self._mark_interrupted()
            self._next_uid = self._max_uid() + 1
            self.session = self._start_session()
        except BaseException:
            self._release_lock()
            raise
        self._uid_lock = threading.Lock()
        # From here on the writer owns the connection, and releases the lock file when done.
        self._writer = StoreWriter(
            self._writer_conn, self._queue, path=self.path, files_dir=self.files_dir,
            session=self.session, write_error=StoreWriteError, after_batch=self._enforce_cap,
            on_exit=self._release_lock,
        )
        # Each batch goes through self._write_batch, looked up anew each time (see there).
        self._thread = threading.Thread(
            target=self._writer.run, args=(lambda batch: self._write_batch(batch),),
            name="labd-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ health (the writer's)
    @property
    def degraded_reason(self) -> str | None:
        """Why the last write failed, while the store cannot write (None: healthy)."""
        return self._writer.degraded_reason

    @property
    def last_write_error(self) -> str | None:
        """The most recent write failure, kept after the store recovered."""
        return self._writer.last_write_error

    @property
    def dropped_records(self) -> int:
        """Records that could not be written (failed, or recorded after ``close()``)."""
        return self._writer.dropped_records

    @property
    def written_records(self) -> int:
        """Records written since the store opened."""
        return self._writer.written_records

    @property
    def repr_values(self) -> int:
        """Values stored as their repr because JSON cannot hold them."""
        return self._encoder.repr_values

    @property
    def array_threshold(self) -> int:
        """Arrays larger than this many bytes are stored in ``.npy`` side files of their own."""
        return self._encoder.array_threshold

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
        same file would rewrite the first one's history. This flock is the only "in use"
        check: the OS drops it when its holder exits, however it died.
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
        deadline = time.monotonic() + _DEAD_HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = _lock_holder(fd)
                # A holder that is dead or a zombie lets go as the kernel tears it down.
                if holder is not None and not _process_alive(holder) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                os.close(fd)
                raise StoreInUseError(
                    f"Run store {str(self.path)!r} is in use by labd process "
                    f"{holder if holder is not None else '(unknown pid)'}; only one process may "
                    "write a run store. Stop it, or use another --db path (`labd runs --db` "
                    "reads a history while it is in use).", holder,
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is on the disk before it is acknowledged (ADR 0011).
            conn.execute("PRAGMA synchronous=FULL")
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

    def _put(self, record: Record) -> bool:
        with self._put_lock:
            if not self._closed:
                record.seq = next(self._seq)
                self._queue.put(record)
                return True
        if record.op == "flush":
            return False
        # After close() nothing more can land; say so rather than lose it silently.
        self._writer.refuse(record)
        return False

    def run_created(self, uid: int, info: dict[str, Any]) -> None:
        """Record a new run (``info``: task_id, task_type, status, params, device_ids, owner, parent_id)."""
        params, files = self._encoder.encode(info.get("params"), uid, "params")
        row = (str(info["task_id"]), str(info["task_type"]), str(info["status"]), params,
               self._encoder.encode_plain(list(info.get("device_ids", [])), uid, "device_ids"),
               info.get("owner"), info.get("parent_id"), info.get("created_at"))
        self._put(Record("created", time.time(), uid, row, files))

    def run_state(self, uid: int, status: str, started_at: float | None) -> None:
        """Record a state change."""
        self._put(Record("state", time.time(), uid, (status, started_at)))

    def run_progress(self, uid: int, progress: dict[str, Any]) -> None:
        """Record a progress report (every one is kept)."""
        body = self._encoder.encode_plain(progress, uid, "progress")
        self._put(Record("progress", time.time(), uid, (body,)))

    def run_data(self, uid: int, data: Any) -> None:
        """Record emitted data, encoded now (truncated to ``max_emit_bytes`` when encoded).

        Arrays are copied here, so the caller may refill its buffer as soon as this returns.
        """
        body, files = self._encoder.encode(data, uid, "data")
        if body is not None and len(body) > self.max_emit_bytes:
            body, files = dumps_json({"truncated": True, "bytes": len(body)}), []
        self._put(Record("data", time.time(), uid, (body,), files))

    def run_finished(
        self, uid: int, status: str, result: Any, error: dict[str, Any] | None,
        finished_at: float, done: Any = None,
    ) -> None:
        """Record the end of a run, encoded now.

        ``done`` is told once the run's records are on the disk: a ``Future`` gets ``True``,
        or :class:`StoreWriteError` if any of the run's records could not be written; any
        other object with ``set()`` is set either way.
        """
        body, files = self._encoder.encode(result, uid, "result")
        err = self._encoder.encode_plain(error, uid, "error") if error else None
        self._put(Record("finished", time.time(), uid, (status, body, err, finished_at), files, done))

    def device_error(self, record: dict[str, Any]) -> None:
        """Record a device (or callback) error record."""
        context = record.get("context")
        device_id = context.get("device_id") if isinstance(context, dict) else None
        row = (as_text(device_id), as_text(record.get("type")), as_text(record.get("message")),
               as_text(record.get("origin")), self._encoder.encode_plain(record, None, "device error"))
        self._put(Record("device_error", time.time(), None, row))

    def lease_event(self, event: str, lease: dict[str, Any]) -> None:
        """Record a lease being granted, renewed, released, expired or broken."""
        row = (as_text(lease.get("lease_id")), as_text(lease.get("owner")), event,
               self._encoder.encode_plain(lease, None, "lease"))
        self._put(Record("lease", time.time(), None, row))

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued so far is written.

        False on timeout, or if a record queued before this call and not yet reported to an
        earlier ``flush()`` could not be written (``degraded_reason`` says why).
        """
        if self._closed:  # close() writes what was queued; wait for the writer to finish
            self._thread.join(timeout)
            return not self._thread.is_alive()
        marker: Future[bool] = Future()
        flush = Record("flush", time.time(), None, done=marker, since=self._writer.flushed_seq)
        if not self._put(flush):
            return False
        try:
            return marker.result(timeout)
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ on the writer thread
    def _write_batch(self, batch: list[Record]) -> None:
        """The writer thread writes each batch through here (wrap it to stall it: a hung disk)."""
        self._writer.write_batch(batch)

    def _enforce_cap(self) -> None:
        """After each batch, at most every 5 s: keep the file under ``max_bytes``."""
        if self.max_bytes is None or time.monotonic() - self._last_cap_check < 5.0:
            return
        self._last_cap_check = time.monotonic()
        try:
            if self._file_bytes() > self.max_bytes:
                deleted = self._shrink_to(self.max_bytes, None)
                log.info("labd run store %s: deleted %d oldest runs to stay under %d bytes",
                         self.path, deleted, self.max_bytes)
        except Exception as exc:
            log.warning("labd run store %s: size cap not applied: %s", self.path, exc)

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
            "last_write_error": self.last_write_error, "repr_values": self.repr_values,
            "queued": self._queue.qsize(), "schema_version": SCHEMA_VERSION,
        }

    # ------------------------------------------------------------------ closing
    def close(self, timeout: float | None = 30.0) -> None:
        """Write everything queued before this call, end the session, stop the writer, close.

        Idempotent. If the disk has not taken the queued records within ``timeout`` seconds,
        this returns (logging why) and the writer closes the database when it is done; the
        file stays locked until then.
        """
        with self._put_lock:
            if self._closed:
                return
            self._queue.put(Record("session_end", time.time(), None, seq=next(self._seq)))
            self._queue.put(None)  # the writer stops after the records before it
            self._closed = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("labd run store %s: %d record(s) still being written after %s s; the "
                      "writer closes the database when it is done", self.path,
                      self._queue.qsize(), timeout)
        with self._read_lock, contextlib.suppress(sqlite3.Error):
            self._reader.close()


def _lock_holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or an exiting process does not: it lets go of its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[-1].split()
        state, flags = fields[0], int(fields[6])
    except (OSError, IndexError, ValueError):
        return True  # no /proc (macOS): trust kill(0)
    return state not in (b"Z", b"X") and not flags & _PF_EXITING
