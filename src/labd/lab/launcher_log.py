"""A node's log file written by ``labd lab up``, and what the node knows of its launcher.

``labd lab up`` keeps one file per node, ``<log dir>/<node>.log``, across restarts: every
line the node printed (stdout and stderr), timestamped, and the launcher's own notes about
it (started with pid N, exited with CODE and restarting in N s, stopped), marked
``[labd lab up]``. :class:`NodeLog` writes it; it never raises, so a full disk costs log
lines, never the launcher's relaying (the first failure is reported once, through the
``on_problem`` callback). The file stays near ``max_bytes``: when it is full it becomes
``<node>.log.1`` (one older file is kept) and a new file starts.

The launcher tells each node about itself through environment variables
(:meth:`LaunchInfo.environ`, read back once by ``labd serve`` with
:meth:`LaunchInfo.from_environ`); the node's dashboard server page then shows those facts
and :func:`read_tail` of the file, earlier runs of the node included.

Example::

    log = NodeLog(Path("labd-logs/laser.log"), on_problem=print)
    log.note("started (pid 1234)")
    log.line("labd serving at http://127.0.0.1:5001")
    read_tail(log.path).lines[-1]    # '2025-01-02 12:03:07.123  labd serving at ...'
    log.close()
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "ENV_LOG",
    "LaunchInfo",
    "LogTail",
    "NodeLog",
    "describe_exit",
    "read_tail",
    "rotated_path",
]

#: The environment variables ``labd lab up`` gives each node (``ENV_LOG`` marks a launched one).
ENV_LOG = "LABD_LAUNCHER_LOG"
ENV_PID = "LABD_LAUNCHER_PID"
ENV_SERVERS = "LABD_LAUNCHER_SERVERS"
ENV_RESTARTS = "LABD_LAUNCHER_RESTARTS"
ENV_LAST_EXIT = "LABD_LAUNCHER_LAST_EXIT"

#: Where the launcher's notes are marked in a node's log file.
NOTE_MARK = "[labd lab up]"
#: A log file this large becomes ``<file>.1`` and a new one starts.
MAX_BYTES = 1024 * 1024
#: What the dashboard shows of a log file: at most this many of the last lines and bytes.
TAIL_LINES = 200
TAIL_BYTES = 64 * 1024

# Colour and cursor sequences a child may print; the file is for reading, not a terminal.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def describe_exit(code: int) -> str:
    """``code`` of a finished child in words: ``"-9 (SIGKILL)"``, ``"1"``."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"{code} (signal {-code})"
    return str(code)


def rotated_path(path: Path) -> Path:
    """The one older file kept of ``path``: ``laser.log`` -> ``laser.log.1``."""
    return path.with_name(path.name + ".1")


# ---------------------------------------------------------------------- the launcher's facts
@dataclass(frozen=True)
class LaunchInfo:
    """How ``labd lab up`` started this node: its pid, servers file, log file and restarts.

    One per run of the node: a restarted node is a new process with new facts (``restarts``
    one more, ``last_exit`` the code its previous run ended with).
    """

    log_file: Path
    launcher_pid: int | None = None
    servers_file: str | None = None
    restarts: int = 0  # runs of this node that ended before this one (since `labd lab up` began)
    last_exit: int | None = None  # the exit code of the run before this one; None: first run

    @property
    def last_exit_text(self) -> str | None:
        """The previous run's exit code in words, or None for a first run."""
        return None if self.last_exit is None else describe_exit(self.last_exit)

    def environ(self) -> dict[str, str]:
        """The environment variables that carry these facts to the node."""
        env = {ENV_LOG: str(self.log_file), ENV_RESTARTS: str(self.restarts)}
        if self.launcher_pid is not None:
            env[ENV_PID] = str(self.launcher_pid)
        if self.servers_file is not None:
            env[ENV_SERVERS] = self.servers_file
        if self.last_exit is not None:
            env[ENV_LAST_EXIT] = str(self.last_exit)
        return env

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> LaunchInfo | None:
        """The facts in ``env`` (``os.environ``), or None for a node no launcher started.

        Only :data:`ENV_LOG` is required; a missing or malformed number is left out rather
        than stopping the server (these variables describe it, they configure nothing).
        """
        log_file = env.get(ENV_LOG)
        if not log_file:
            return None
        return cls(log_file=Path(log_file), launcher_pid=_int(env.get(ENV_PID)),
                   servers_file=env.get(ENV_SERVERS) or None,
                   restarts=_int(env.get(ENV_RESTARTS)) or 0,
                   last_exit=_int(env.get(ENV_LAST_EXIT)))


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------- writing
class NodeLog:
    """Appends one node's output lines and the launcher's notes to its log file.

    Thread-safe; :meth:`line` and :meth:`note` never raise and never wait for anything but
    the write itself. A failed write (disk full, directory removed) drops that line, calls
    ``on_problem`` once with what happened, and is retried with the next line; when writing
    works again ``on_problem`` hears how many lines were lost. :meth:`open` is the one call
    that raises, so a launcher can refuse a log directory it cannot write before it starts
    anything.
    """

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES,
                 on_problem: Callable[[str], None] = lambda message: None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lost = 0  # lines not written since the last failure began
        self._on_problem = on_problem
        self._file: BinaryIO | None = None
        self._size = 0
        self._rotate_failed = False
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open (create) the file for appending; raises :class:`OSError` if that fails."""
        with self._lock:
            if self._file is None:
                self._open()

    def line(self, text: str) -> None:
        """Append one line the node printed (colour sequences removed)."""
        self._write(_ANSI.sub("", text))

    def note(self, text: str) -> None:
        """Append one of the launcher's notes about the node, marked :data:`NOTE_MARK`."""
        self._write(f"{NOTE_MARK} {text}")

    def close(self) -> None:
        """Close the file (idempotent); a later write opens it again."""
        with self._lock:
            self._close()

    def _open(self) -> None:
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open; closed in close())
        self._size = self._file.tell()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _write(self, text: str) -> None:
        data = f"{_timestamp()}  {text}\n".encode("utf-8", "replace")
        problem = None
        with self._lock:
            try:
                if self._file is None:
                    self._open()
                if self._size > 0 and self._size + len(data) > self.max_bytes:
                    problem = self._rotate()
                assert self._file is not None
                self._file.write(data)
                self._size += len(data)
            except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
                self._close()
                self.lost += 1
                if self.lost == 1:
                    problem = (f"cannot write {self.path}: {_reason(exc)}; the lines are still "
                               "printed here, and writing is retried with each line")
            else:
                if self.lost:
                    problem = f"writing {self.path} again ({self.lost} line(s) were lost)"
                    self.lost = 0
        if problem is not None:  # outside the lock: the reporter may take its time
            try:
                self._on_problem(problem)
            except Exception:  # a broken reporter must not stop the writing either
                pass

    def _rotate(self) -> str | None:
        """Make the full file ``<file>.1`` and start a new one (called with the lock held).

        If the rename fails (on Windows a reader may hold the file open for a moment) the
        file keeps growing and the rename is tried again with the next line; at twice its
        size the file is started over, so it stays bounded whatever happens. Returns what
        to report, if anything.
        """
        self._close()
        try:
            os.replace(self.path, rotated_path(self.path))
        except OSError as exc:
            if self._size < 2 * self.max_bytes:
                self._open()
                if self._rotate_failed:
                    return None
                self._rotate_failed = True
                return (f"cannot rename {self.path} to {rotated_path(self.path).name} "
                        f"({_reason(exc)}); retrying with the next line")
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
            size, self._size = self._size, 0
            return (f"{self.path} reached {size} bytes and could not be renamed "
                    f"({_reason(exc)}); it was started over")
        self._rotate_failed = False
        self._open()
        return None


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# ---------------------------------------------------------------------- reading
@dataclass
class LogTail:
    """The last lines of a node's log file (and of its ``.1`` when the file is short)."""

    path: Path
    lines: list[str] = field(default_factory=list)
    error: str | None = None  # why nothing could be read, in words; None if it was read


def read_tail(path: Path, *, max_lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> LogTail:
    """The last ``max_lines`` lines of ``path``, reading at most ``max_bytes`` from its end.

    When ``path`` holds fewer lines, the rest come from the end of ``<path>.1`` (the file
    before the last rotation). Never raises for a missing or unreadable file: the answer's
    ``error`` says what is wrong. Blocking file I/O: call it off the event loop.
    """
    tail = LogTail(path)
    try:
        chunk, whole = _end_of(path, max_bytes)
    except OSError as exc:
        tail.error = (f"cannot read the log file {path}: {_reason(exc)} (`labd lab up` writes "
                      "it; was it moved or deleted?)")
        return tail
    tail.lines = chunk.decode("utf-8", "replace").splitlines()
    budget = max_bytes - len(chunk)
    if whole and budget > 0 and len(tail.lines) < max_lines:
        try:
            older, _ = _end_of(rotated_path(path), budget)
        except OSError:  # usually: no rotation yet
            older = b""
        tail.lines[:0] = older.decode("utf-8", "replace").splitlines()
    tail.lines = tail.lines[-max_lines:]
    return tail


def _end_of(path: Path, budget: int) -> tuple[bytes, bool]:
    """At most ``budget`` bytes from the end of ``path``, starting at a whole line.

    Returns the bytes and whether they are the whole file.
    """
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        start = max(size - budget, 0)
        file.seek(start)
        data = file.read(size - start)
    if start == 0:
        return data, True
    newline = data.find(b"\n")
    return (data[newline + 1:] if newline >= 0 else b""), False
