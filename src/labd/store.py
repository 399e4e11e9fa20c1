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
Reading a history needs no lock (:class:`labd.store_history.HistoryFile`).

Errors::

    LabDaemonException
     +-- StoreError            the store cannot be opened (bad path, read-only, newer schema)
          +-- StoreInUseError  another live process writes this file (``.pid`` names it)
          +-- StoreWriteError  a record could not be written (disk full, I/O error, closed)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from labd.errors import LabDaemonException
from labd.io import dumps_json
from labd.store_history import FILE_KEY, StoreHistory

__all__ = [
    "SCHEMA_VERSION",
    "RunStore",
    "StoreError",
    "StoreInUseError",
    "StoreWriteError",
    "default_db_path",
]

log = logging.getLogger("labd.store")

SCHEMA_VERSION = 1
_ACTIVE = ("pending", "running", "paused")
_BATCH = 5000  # records per transaction at most
_MAX_REPR = 64 * 1024  # a repr stored in place of an unencodable value is cut to this
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


#: An array to write beside the database: (path relative to ``<db>.files``, a private copy).
_SideFile = tuple[str, np.ndarray[Any, Any]]


@dataclass(slots=True, eq=False)
class _Record:
    """One queued write, already encoded; ``op`` names the ``_apply_*`` method, or "flush"."""

    op: str
    ts: float
    uid: int | None  # the run it belongs to, None for device errors, leases, sessions
    args: tuple[Any, ...] = ()
    files: Sequence[_SideFile] = ()
    done: Any = None  # a Future (or anything with .set()) told when this is written
    seq: int = 0  # queue order, assigned under the put lock
    since: int = 0  # flush only: failures from this seq on are reported to it


class RunStore(StoreHistory):
    """Durable run history on SQLite; every write is an encode and a non-blocking queue put.

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
        #: Why the last write failed, while the store cannot write (None: healthy).
        self.degraded_reason: str | None = None
        #: The most recent write failure, kept after the store recovered.
        self.last_write_error: str | None = None
        self.dropped_records = 0
        self.written_records = 0
        #: Values stored as their repr because JSON cannot hold them.
        self.repr_values = 0
        self._warned_repr: set[tuple[int | None, str]] = set()
        self._queue: queue.SimpleQueue[_Record | None] = queue.SimpleQueue()
        # Held only around a queue put: orders seq numbers and makes close() a clean cut.
        self._put_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._file_seq = itertools.count()  # side file names: one per array, never reused
        self._failed_seqs: list[int] = []  # writer thread only
        self._failed_runs: dict[int, str] = {}  # writer thread only
        self._task_ids: dict[int, str] = {}  # writer thread only: active runs, for messages
        self._flushed_seq = 0  # the last flush the writer answered
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

    def _put(self, record: _Record) -> bool:
        with self._put_lock:
            if not self._closed:
                record.seq = next(self._seq)
                self._queue.put(record)
                return True
        if record.op == "flush":
            return False
        # After close() nothing more can land; say so rather than lose it silently.
        self.dropped_records += 1
        log.warning("labd run store %s is closed; a %r record of run %s was not written",
                    self.path, record.op, record.uid)
        _resolve(record.done, StoreWriteError(
            f"Run {record.uid} was not saved: the run store {str(self.path)!r} was closed first."))
        return False

    def run_created(self, uid: int, info: dict[str, Any]) -> None:
        """Record a new run (``info``: task_id, task_type, status, params, device_ids, owner, parent_id)."""
        params, files = self._encode(info.get("params"), uid, "params")
        row = (str(info["task_id"]), str(info["task_type"]), str(info["status"]), params,
               self._encode_plain(list(info.get("device_ids", [])), uid, "device_ids"),
               info.get("owner"), info.get("parent_id"), info.get("created_at"))
        self._put(_Record("created", time.time(), uid, row, files))

    def run_state(self, uid: int, status: str, started_at: float | None) -> None:
        """Record a state change."""
        self._put(_Record("state", time.time(), uid, (status, started_at)))

    def run_progress(self, uid: int, progress: dict[str, Any]) -> None:
        """Record a progress report (every one is kept)."""
        self._put(_Record("progress", time.time(), uid, (self._encode_plain(progress, uid, "progress"),)))

    def run_data(self, uid: int, data: Any) -> None:
        """Record emitted data, encoded now (truncated to ``max_emit_bytes`` when encoded).

        Arrays are copied here, so the caller may refill its buffer as soon as this returns.
        """
        body, files = self._encode(data, uid, "data")
        if body is not None and len(body) > self.max_emit_bytes:
            body, files = dumps_json({"truncated": True, "bytes": len(body)}), []
        self._put(_Record("data", time.time(), uid, (body,), files))

    def run_finished(
        self, uid: int, status: str, result: Any, error: dict[str, Any] | None,
        finished_at: float, done: Any = None,
    ) -> None:
        """Record the end of a run, encoded now.

        ``done`` is told once the run's records are on the disk: a ``Future`` gets ``True``,
        or :class:`StoreWriteError` if any of the run's records could not be written; any
        other object with ``set()`` is set either way.
        """
        body, files = self._encode(result, uid, "result")
        err = self._encode_plain(error, uid, "error") if error else None
        self._put(_Record("finished", time.time(), uid, (status, body, err, finished_at), files, done))

    def device_error(self, record: dict[str, Any]) -> None:
        """Record a device (or callback) error record."""
        context = record.get("context")
        device_id = context.get("device_id") if isinstance(context, dict) else None
        row = (_text(device_id), _text(record.get("type")), _text(record.get("message")),
               _text(record.get("origin")), self._encode_plain(record, None, "device error"))
        self._put(_Record("device_error", time.time(), None, row))

    def lease_event(self, event: str, lease: dict[str, Any]) -> None:
        """Record a lease being granted, renewed, released, expired or broken."""
        row = (_text(lease.get("lease_id")), _text(lease.get("owner")), event,
               self._encode_plain(lease, None, "lease"))
        self._put(_Record("lease", time.time(), None, row))

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued so far is written.

        False on timeout, or if a record queued before this call and not yet reported to an
        earlier ``flush()`` could not be written (``degraded_reason`` says why).
        """
        if self._closed:  # close() writes what was queued; wait for the writer to finish
            self._thread.join(timeout)
            return not self._thread.is_alive()
        marker: Future[bool] = Future()
        if not self._put(_Record("flush", time.time(), None, done=marker, since=self._flushed_seq)):
            return False
        try:
            return marker.result(timeout)
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ encoding (producer's thread)
    def _encode(self, value: Any, uid: int | None, name: str) -> tuple[bytes | None, list[_SideFile]]:
        """JSON now, and large arrays copied for side files of their own."""
        if value is None:
            return None, []
        files: list[_SideFile] = []
        body, whole_repr = self._dumps(self._externalize(value, uid, name, files), uid, name)
        return body, [] if whole_repr else files

    def _encode_plain(self, value: Any, uid: int | None, name: str) -> bytes:
        return self._dumps(value, uid, name)[0]

    def _dumps(self, tree: Any, uid: int | None, name: str) -> tuple[bytes, bool]:
        """JSON bytes; what JSON cannot hold becomes its repr (True: the whole value did)."""
        if _flat_plain(tree):  # a progress report, a small dict: orjson alone writes the same
            try:
                return orjson.dumps(tree), False
            except orjson.JSONEncodeError:
                pass
        try:
            return dumps_json(tree), False
        except Exception:
            pass
        replaced: list[str] = []

        def as_repr(obj: Any) -> str:
            replaced.append(type(obj).__qualname__)
            return _safe_repr(obj)

        try:
            body, whole = dumps_json(tree, default=as_repr), False
        except Exception as exc:  # e.g. an int beyond 64 bits: keep the whole value as text
            replaced.append(f"{type(tree).__qualname__} ({exc})")
            body, whole = dumps_json(_safe_repr(tree)), True
        self._note_repr(uid, name, replaced)
        return body, whole

    def _note_repr(self, uid: int | None, name: str, kinds: list[str]) -> None:
        self.repr_values += 1
        key = (uid, name)
        if key not in self._warned_repr:  # once per run and field: a loop must not flood the log
            self._warned_repr.add(key)
            log.warning("labd run store: %s of run %s holds %s that JSON cannot hold; stored "
                        "as repr() instead", name, uid, ", ".join(sorted(set(kinds))))

    def _externalize(self, value: Any, uid: int | None, name: str, files: list[_SideFile]) -> Any:
        if (isinstance(value, np.ndarray) and value.nbytes > self.array_threshold
                and not value.dtype.hasobject):
            rel = f"run-{uid}/{name}-{next(self._file_seq)}.npy"
            files.append((rel, np.array(value, copy=True)))  # the caller may reuse its buffer
            return {FILE_KEY: rel, "shape": list(value.shape), "dtype": str(value.dtype)}
        if isinstance(value, dict):
            return {k: self._externalize(v, uid, name, files) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._externalize(v, uid, name, files) for v in value]
        return value

    # ------------------------------------------------------------------ writer
    def _write_loop(self) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                records = [entry for entry in batch if entry is not None]
                try:
                    self._write_batch(records)
                except Exception as exc:  # a bug, not the disk: log it, fail the batch, go on
                    log.exception("labd run store %s: the writer failed on a batch", self.path)
                    self._fail_all(records, _reason(exc))
                if len(records) < len(batch):  # the stop sentinel from close()
                    return
                self._enforce_cap()
        finally:
            if not self._closed:
                self.degraded_reason = "the run store's writer thread stopped"
            # The writer owns its connection and the lock: both end only after its last write.
            with _suppress_sqlite():
                self._writer_conn.close()
            self._release_lock()

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
        except Exception as exc:
            log.warning("labd run store %s: size cap not applied: %s", self.path, exc)

    def _write_batch(self, batch: list[_Record]) -> None:
        """Commit the batch's records, then tell each waiter whether what it waits for landed."""
        indexed = [(i, entry) for i, entry in enumerate(batch) if entry.op != "flush"]
        failed: dict[int, str] = {}
        if indexed:
            try:
                self._transaction([entry for _, entry in indexed])
            except Exception as exc:
                # One record (or the disk) failed: keep every record that can still be written.
                log.warning("labd run store %s: a batch of %d records failed (%s); retrying "
                            "record by record", self.path, len(indexed), _reason(exc))
                by_position = self._one_by_one([entry for _, entry in indexed])
                failed = {indexed[k][0]: reason for k, reason in by_position.items()}
        self._settle(batch, failed)

    def _transaction(self, records: list[_Record]) -> None:
        conn = self._writer_conn
        written: list[Path] = []
        dirs: set[Path] = set()
        try:
            conn.execute("BEGIN")
            for entry in records:
                self._apply(conn, entry, written, dirs)
            _fsync_dirs(dirs)  # a row must never name a file that a power cut could lose
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            _unlink(written)
            raise

    def _one_by_one(self, records: list[_Record]) -> dict[int, str]:
        """Savepoint per record; returns {position: reason} of the records that failed."""
        failed: dict[int, str] = {}
        start = 0
        while start < len(records):
            start = self._savepoint_pass(records, failed, start)
        return failed

    def _savepoint_pass(self, records: list[_Record], failed: dict[int, str], start: int) -> int:
        """Write ``records[start:]`` in one transaction, each record in a savepoint.

        A record that fails is rolled back alone. But on some errors (a full disk among
        them) SQLite drops the whole transaction: then the records before the culprit are
        written again in a transaction of their own, and the next pass starts after it, so
        each record is tried at most twice. Returns where the next pass starts.
        """
        conn = self._writer_conn
        kept: list[Path] = []
        dirs: set[Path] = set()
        try:
            conn.execute("BEGIN")
        except Exception as exc:
            failed.update((i, _reason(exc)) for i in range(start, len(records)) if i not in failed)
            return len(records)
        for i in range(start, len(records)):
            mine: list[Path] = []
            try:
                conn.execute("SAVEPOINT record")
                self._apply(conn, records[i], mine, dirs)
                conn.execute("RELEASE record")
            except Exception as exc:
                failed[i] = _reason(exc)
                _unlink(mine)
                if conn.in_transaction and _undo_savepoint(conn):
                    continue
                _rollback(conn)
                _unlink(kept)
                self._rewrite(records, failed, range(start, i))
                return i + 1
            kept += mine
        try:
            _fsync_dirs(dirs)
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            _unlink(kept)
            failed.update((i, _reason(exc)) for i in range(start, len(records)) if i not in failed)
        return len(records)

    def _rewrite(self, records: list[_Record], failed: dict[int, str], positions: range) -> None:
        """Write again, in one transaction, records that fitted before SQLite dropped them."""
        todo = [i for i in positions if i not in failed]
        if todo:
            try:
                self._transaction([records[i] for i in todo])
            except Exception as exc:
                failed.update((i, _reason(exc)) for i in todo)

    def _fail_all(self, batch: list[_Record], reason: str) -> None:
        try:
            self._settle(batch, {i: reason for i, entry in enumerate(batch) if entry.op != "flush"})
        except Exception:  # last resort: no waiter may hang because bookkeeping failed
            log.exception("labd run store %s: could not account for a failed batch", self.path)
            self.degraded_reason = reason
            for entry in batch:
                _resolve(entry.done, StoreWriteError(f"Not saved in {str(self.path)!r}: {reason}."),
                         False)

    def _settle(self, batch: list[_Record], failed: dict[int, str]) -> None:
        """Count, mark degraded or healthy, and answer flush markers and runs' ``done``."""
        records = sum(1 for entry in batch if entry.op != "flush")
        self.written_records += records - len(failed)
        self.dropped_records += len(failed)
        for i, reason in sorted(failed.items()):
            entry = batch[i]
            self._failed_seqs.append(entry.seq)
            if entry.uid is not None:
                self._failed_runs.setdefault(entry.uid, reason)
        if len(self._failed_seqs) > 100_000:  # bound memory on a disk that stays full
            del self._failed_seqs[:50_000]
        if failed:
            reason = next(iter(failed.values()))
            if self.degraded_reason is None:
                log.error("labd run store %s degraded: %s; %d record(s) not saved", self.path,
                          reason, len(failed))
            self.degraded_reason = self.last_write_error = reason
        elif records and self.degraded_reason is not None:
            log.warning("labd run store %s is writable again", self.path)
            self.degraded_reason = None
        for i, entry in enumerate(batch):
            if entry.op == "flush":
                lost = bisect.bisect_left(self._failed_seqs, entry.since) < bisect.bisect_left(
                    self._failed_seqs, entry.seq)
                self._flushed_seq = max(self._flushed_seq, entry.seq)
                _resolve(entry.done, None, not lost)
            elif entry.op == "created":
                self._task_ids[entry.uid or 0] = entry.args[0]
            elif entry.op == "finished":
                uid = entry.uid or 0
                earlier, task_id = self._failed_runs.pop(uid, None), self._task_ids.pop(uid, "?")
                why = failed.get(i) or earlier
                _resolve(entry.done, None if why is None else StoreWriteError(
                    f"Run {task_id!r} (uid {uid}) was not completely saved in "
                    f"{str(self.path)!r}: {why}."))

    def _apply(self, conn: sqlite3.Connection, entry: _Record, written: list[Path], dirs: set[Path]) -> None:
        for rel, array in entry.files:
            self._write_side_file(rel, array, written, dirs)
        getattr(self, f"_apply_{entry.op}")(conn, entry.ts, entry.uid, *entry.args)

    def _write_side_file(self, rel: str, array: np.ndarray[Any, Any], written: list[Path], dirs: set[Path]) -> None:
        """Write and fsync one array; note the directories whose entries must be fsynced too."""
        target = self.files_dir / rel
        for directory in (self.files_dir, target.parent):
            if not directory.is_dir():
                directory.mkdir()
                dirs.add(directory.parent)  # the new directory's own entry
        with open(target, "wb") as fh:
            written.append(target)
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        dirs.add(target.parent)

    def _apply_created(
        self, conn: sqlite3.Connection, ts: float, uid: int, task_id: str, task_type: str,
        status: str, params: bytes | None, device_ids: bytes, owner: Any, parent_id: Any,
        created_at: float | None,
    ) -> None:
        conn.execute(
            "INSERT INTO runs(uid, task_id, task_type, status, params, device_ids, owner, parent_id,"
            " created_at, updated_at, session) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (uid, task_id, task_type, status, params, device_ids, _text(owner), _text(parent_id),
             created_at if created_at is not None else ts, ts, self.session),
        )
        self._event(conn, uid, ts, "state", dumps_json({"status": status}))

    def _apply_state(
        self, conn: sqlite3.Connection, ts: float, uid: int, status: str, started_at: float | None
    ) -> None:
        conn.execute(
            "UPDATE runs SET status=?, started_at=COALESCE(started_at, ?), updated_at=? WHERE uid=?",
            (status, started_at, ts, uid),
        )
        self._event(conn, uid, ts, "state", dumps_json({"status": status}))

    def _apply_progress(self, conn: sqlite3.Connection, ts: float, uid: int, body: bytes) -> None:
        conn.execute("UPDATE runs SET progress=?, updated_at=? WHERE uid=?", (body, ts, uid))
        self._event(conn, uid, ts, "progress", body)

    def _apply_data(self, conn: sqlite3.Connection, ts: float, uid: int, body: bytes | None) -> None:
        conn.execute("UPDATE runs SET updated_at=? WHERE uid=?", (ts, uid))
        self._event(conn, uid, ts, "data", body)

    def _apply_finished(
        self, conn: sqlite3.Connection, ts: float, uid: int, status: str, result: bytes | None,
        error: bytes | None, finished_at: float,
    ) -> None:
        conn.execute(
            "UPDATE runs SET status=?, result=?, error=?, finished_at=?, updated_at=? WHERE uid=?",
            (status, result, error, finished_at, ts, uid),
        )
        self._event(conn, uid, ts, "state", dumps_json({"status": status}))

    def _apply_device_error(
        self, conn: sqlite3.Connection, ts: float, _uid: None, device_id: str | None,
        type_: str | None, message: str | None, origin: str | None, record: bytes,
    ) -> None:
        conn.execute(
            "INSERT INTO device_errors(ts, device_id, type, message, origin, record) VALUES (?,?,?,?,?,?)",
            (ts, device_id, type_, message, origin, record),
        )

    def _apply_lease(
        self, conn: sqlite3.Connection, ts: float, _uid: None, lease_id: str | None,
        owner: str | None, event: str, body: bytes,
    ) -> None:
        conn.execute("INSERT INTO lease_events(ts, lease_id, owner, event, body) VALUES (?,?,?,?,?)",
                     (ts, lease_id, owner, event, body))

    def _apply_session_end(self, conn: sqlite3.Connection, ts: float, _uid: None) -> None:
        conn.execute("UPDATE sessions SET stopped_at=? WHERE id=?", (ts, self.session))

    @staticmethod
    def _event(conn: sqlite3.Connection, uid: int, ts: float, kind: str, body: bytes | None) -> None:
        conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                     (uid, ts, kind, body))

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
            self._queue.put(_Record("session_end", time.time(), None, seq=next(self._seq)))
            self._queue.put(None)  # the writer stops after the records before it
            self._closed = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("labd run store %s: %d record(s) still being written after %s s; the "
                      "writer closes the database when it is done", self.path,
                      self._queue.qsize(), timeout)
        with self._read_lock, _suppress_sqlite():
            self._reader.close()


_SCALARS = frozenset({str, int, bool, type(None)})


def _flat_plain(value: Any) -> bool:
    """A dict of str keys to str/int/bool/None/finite floats: what dumps_json passes through."""
    if type(value) is not dict:
        return False
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is float:
            if not math.isfinite(item):
                return False
        elif kind not in _SCALARS:
            return False
    return True


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _safe_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not lose the record
        text = f"<{type(obj).__qualname__} object; repr() failed: {type(exc).__name__}>"
    if len(text) > _MAX_REPR:
        text = text[:_MAX_REPR] + f"... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve(done: Any, error: BaseException | None, value: bool = True) -> None:
    """Tell a waiter how its write went: a Future gets the value or the error; others are set."""
    if done is None:
        return
    if isinstance(done, Future):
        try:
            if error is None:
                done.set_result(value)
            else:
                done.set_exception(error)
        except InvalidStateError:  # the waiter cancelled it
            pass
    else:
        done.set()


def _rollback(conn: sqlite3.Connection) -> None:
    with _suppress_sqlite():
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _undo_savepoint(conn: sqlite3.Connection) -> bool:
    """Roll back to the record's savepoint; False if that is not possible any more."""
    try:
        conn.execute("ROLLBACK TO record")
        conn.execute("RELEASE record")
    except sqlite3.Error:
        return False
    return True


def _unlink(paths: list[Path]) -> None:
    """Delete side files whose rows did not commit: no orphans on the disk."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("labd run store: cannot delete side file %s of a failed write: %s", path, exc)


def _fsync_dirs(dirs: set[Path]) -> None:
    for directory in sorted(dirs):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


@contextmanager
def _suppress_sqlite() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error:
        pass
