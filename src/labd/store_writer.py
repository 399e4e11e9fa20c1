"""The run store's writer side: records, their encoding, and the thread that writes them.

:class:`labd.store.RunStore` encodes each call into a :class:`Record` on its caller's thread
(:class:`RecordEncoder`) and queues it; one :class:`StoreWriter` drains the queue on the writer
thread, one transaction per batch, a savepoint per record after a failed batch, side files
fsynced before their rows commit. It keeps the store's health (written and dropped records,
``degraded_reason``). Why it works this way (ADR 0011): the :mod:`labd.store` docstring.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import os
import queue
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from labd.io import dumps_json
from labd.store_history import FILE_KEY

__all__ = ["Record", "RecordEncoder", "SideFile", "StoreWriter", "as_text"]

log = logging.getLogger("labd.store")  # one logger for the whole store, as before the split

_BATCH = 5000  # records per transaction at most
_MAX_REPR = 64 * 1024  # a repr stored in place of an unencodable value is cut to this

#: An array to write beside the database: (path relative to ``<db>.files``, a private copy).
SideFile = tuple[str, np.ndarray[Any, Any]]


@dataclass(slots=True, eq=False)
class Record:
    """One queued write, already encoded; ``op`` names the ``_apply_*`` method, or "flush"."""

    op: str
    ts: float
    uid: int | None  # the run it belongs to, None for device errors, leases, sessions
    args: tuple[Any, ...] = ()
    files: Sequence[SideFile] = ()
    done: Any = None  # a Future (or anything with .set()) told when this is written
    seq: int = 0  # queue order, assigned under the put lock
    since: int = 0  # flush only: failures from this seq on are reported to it


class RecordEncoder:
    """Values to JSON bytes on the producer's thread, large arrays copied for side files.

    What JSON cannot hold becomes its ``repr`` (counted, warned once per run and field).
    """

    def __init__(self, array_threshold: int) -> None:
        #: Arrays larger than this many bytes go to ``.npy`` side files of their own.
        self.array_threshold = array_threshold
        #: Values stored as their repr because JSON cannot hold them.
        self.repr_values = 0
        self._warned_repr: set[tuple[int | None, str]] = set()
        self._file_seq = itertools.count()  # side file names: one per array, never reused

    def encode(self, value: Any, uid: int | None, name: str) -> tuple[bytes | None, list[SideFile]]:
        """JSON now, and large arrays copied for side files of their own."""
        if value is None:
            return None, []
        files: list[SideFile] = []
        body, whole_repr = self._dumps(self._externalize(value, uid, name, files), uid, name)
        return body, [] if whole_repr else files

    def encode_plain(self, value: Any, uid: int | None, name: str) -> bytes:
        """JSON now, arrays inline (progress reports, errors, leases)."""
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

    def _externalize(self, value: Any, uid: int | None, name: str, files: list[SideFile]) -> Any:
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


class StoreWriter:
    """Drains a run store's queue into SQLite on the writer thread, one batch a transaction.

    Owns ``conn`` and closes it when :meth:`run` ends, then calls ``on_exit`` (the store's
    lock file). ``after_batch`` runs after each batch (the size cap); ``write_error`` builds
    what a waiter gets for a lost write. Only the writer thread writes the health attributes.
    """

    def __init__(
        self, conn: sqlite3.Connection, records: queue.SimpleQueue[Record | None], *,
        path: Path, files_dir: Path, session: int, write_error: Callable[[str], BaseException],
        after_batch: Callable[[], None], on_exit: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._queue = records
        self._path = path
        self._files_dir = files_dir
        self._session = session
        self._write_error = write_error
        self._after_batch = after_batch
        self._on_exit = on_exit
        #: Why the last write failed, while the store cannot write (None: healthy).
        self.degraded_reason: str | None = None
        #: The most recent write failure, kept after the store recovered.
        self.last_write_error: str | None = None
        self.dropped_records = 0
        self.written_records = 0
        #: The ``seq`` of the last flush marker answered: a new flush reports failures after it.
        self.flushed_seq = 0
        self._failed_seqs: list[int] = []
        self._failed_runs: dict[int, str] = {}
        self._task_ids: dict[int, str] = {}  # active runs, for messages

    def run(self, write_batch: Callable[[list[Record]], None] | None = None) -> None:
        """The writer thread: write batches until the stop sentinel (``None``) from ``close()``.

        Each batch goes through ``write_batch`` (default :meth:`write_batch`). The writer never
        stops on a failed batch: its records are failed and the next batch is taken.
        """
        write = write_batch or self.write_batch
        stopped = False
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
                    write(records)
                except Exception as exc:  # a bug, not the disk: log it, fail the batch, go on
                    log.exception("labd run store %s: the writer failed on a batch", self._path)
                    self._fail_all(records, _reason(exc))
                if len(records) < len(batch):  # the stop sentinel from close()
                    stopped = True
                    return
                self._after_batch()
        finally:
            if not stopped:
                self.degraded_reason = "the run store's writer thread stopped"
            # The writer owns its connection and the lock: both end only after its last write.
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._on_exit()

    def refuse(self, record: Record) -> None:
        """A record that came after ``close()``: counted as dropped and its waiter told."""
        self.dropped_records += 1
        log.warning("labd run store %s is closed; a %r record of run %s was not written",
                    self._path, record.op, record.uid)
        _resolve(record.done, self._write_error(
            f"Run {record.uid} was not saved: the run store {str(self._path)!r} was closed first."))

    def write_batch(self, batch: list[Record]) -> None:
        """Commit the batch's records, then tell each waiter whether what it waits for landed."""
        indexed = [(i, entry) for i, entry in enumerate(batch) if entry.op != "flush"]
        failed: dict[int, str] = {}
        if indexed:
            try:
                self._transaction([entry for _, entry in indexed])
            except Exception as exc:
                # One record (or the disk) failed: keep every record that can still be written.
                log.warning("labd run store %s: a batch of %d records failed (%s); retrying "
                            "record by record", self._path, len(indexed), _reason(exc))
                by_position = self._one_by_one([entry for _, entry in indexed])
                failed = {indexed[k][0]: reason for k, reason in by_position.items()}
        self._settle(batch, failed)

    def _transaction(self, records: list[Record]) -> None:
        conn = self._conn
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

    def _one_by_one(self, records: list[Record]) -> dict[int, str]:
        """Savepoint per record; returns {position: reason} of the records that failed."""
        failed: dict[int, str] = {}
        start = 0
        while start < len(records):
            start = self._savepoint_pass(records, failed, start)
        return failed

    def _savepoint_pass(self, records: list[Record], failed: dict[int, str], start: int) -> int:
        """Write ``records[start:]`` in one transaction, each record in a savepoint.

        A record that fails is rolled back alone. But on some errors (a full disk among
        them) SQLite drops the whole transaction: then the records before the culprit are
        written again in a transaction of their own, and the next pass starts after it, so
        each record is tried at most twice. Returns where the next pass starts.
        """
        conn = self._conn
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

    def _rewrite(self, records: list[Record], failed: dict[int, str], positions: range) -> None:
        """Write again, in one transaction, records that fitted before SQLite dropped them."""
        todo = [i for i in positions if i not in failed]
        if todo:
            try:
                self._transaction([records[i] for i in todo])
            except Exception as exc:
                failed.update((i, _reason(exc)) for i in todo)

    def _fail_all(self, batch: list[Record], reason: str) -> None:
        try:
            self._settle(batch, {i: reason for i, entry in enumerate(batch) if entry.op != "flush"})
        except Exception:  # last resort: no waiter may hang because bookkeeping failed
            log.exception("labd run store %s: could not account for a failed batch", self._path)
            self.degraded_reason = reason
            for entry in batch:
                _resolve(entry.done, self._write_error(
                    f"Not saved in {str(self._path)!r}: {reason}."), False)

    def _settle(self, batch: list[Record], failed: dict[int, str]) -> None:
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
                log.error("labd run store %s degraded: %s; %d record(s) not saved", self._path,
                          reason, len(failed))
            self.degraded_reason = self.last_write_error = reason
        elif records and self.degraded_reason is not None:
            log.warning("labd run store %s is writable again", self._path)
            self.degraded_reason = None
        for i, entry in enumerate(batch):
            if entry.op == "flush":
                lost = bisect.bisect_left(self._failed_seqs, entry.since) < bisect.bisect_left(
                    self._failed_seqs, entry.seq)
                self.flushed_seq = max(self.flushed_seq, entry.seq)
                _resolve(entry.done, None, not lost)
            elif entry.op == "created":
                self._task_ids[entry.uid or 0] = entry.args[0]
            elif entry.op == "finished":
                uid = entry.uid or 0
                earlier, task_id = self._failed_runs.pop(uid, None), self._task_ids.pop(uid, "?")
                why = failed.get(i) or earlier
                _resolve(entry.done, None if why is None else self._write_error(
                    f"Run {task_id!r} (uid {uid}) was not completely saved in "
                    f"{str(self._path)!r}: {why}."))

    # ------------------------------------------------------------------ applying records
    def _apply(self, conn: sqlite3.Connection, entry: Record, written: list[Path], dirs: set[Path]) -> None:
        for rel, array in entry.files:
            self._write_side_file(rel, array, written, dirs)
        getattr(self, f"_apply_{entry.op}")(conn, entry.ts, entry.uid, *entry.args)

    def _write_side_file(self, rel: str, array: np.ndarray[Any, Any], written: list[Path], dirs: set[Path]) -> None:
        """Write and fsync one array; note the directories whose entries must be fsynced too."""
        target = self._files_dir / rel
        for directory in (self._files_dir, target.parent):
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
            (uid, task_id, task_type, status, params, device_ids, as_text(owner), as_text(parent_id),
             created_at if created_at is not None else ts, ts, self._session),
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
        conn.execute("UPDATE sessions SET stopped_at=? WHERE id=?", (ts, self._session))

    @staticmethod
    def _event(conn: sqlite3.Connection, uid: int, ts: float, kind: str, body: bytes | None) -> None:
        conn.execute("INSERT INTO run_events(run_uid, ts, kind, body) VALUES (?,?,?,?)",
                     (uid, ts, kind, body))


def as_text(value: Any) -> str | None:
    """``str(value)``, None for None: a column that holds text."""
    return None if value is None else str(value)


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
    with contextlib.suppress(sqlite3.Error):
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
