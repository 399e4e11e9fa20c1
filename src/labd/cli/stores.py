"""Where ``labd serve`` and ``labd demo`` keep run history, and opening it safely.

History goes to ``--db PATH`` (or ``$LABD_DB``), else :func:`labd.store.default_db_path`,
whose directory is created on first use. A path the user chose is taken as given: a
missing directory or a read-only location is one clear line and exit 2, never a new
directory somewhere unexpected. ``--no-db`` keeps history in memory.

One run store file belongs to one labd process at a time: opening a store marks every run it
left active as ``interrupted``, which would be wrong for runs another live process is still
running. So before opening, :func:`store_in_use` looks for a live labd process on this host
whose session in that file has not ended.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from labd.cli.errors import EXIT_USAGE, CliError

if TYPE_CHECKING:
    from labd.store import RunStore

__all__ = [
    "DbOption",
    "NoDbOption",
    "disk_bytes",
    "in_use_error",
    "open_run_store",
    "resolve_db",
    "store_in_use",
]

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        envvar="LABD_DB",
        help="Run history database (SQLite); default ~/.local/share/labd/labd.db (or "
        "$XDG_DATA_HOME/labd/labd.db).",
        show_default=False,
        dir_okay=False,
    ),
]
NoDbOption = Annotated[
    bool, typer.Option("--no-db", help="Keep run history in memory only (lost on exit).")
]


def resolve_db(db: Path | None) -> tuple[Path, bool]:
    """The store path and whether it is the default one (whose directory labd may create)."""
    from labd.store import default_db_path

    if db is not None:
        return db.expanduser(), False
    return default_db_path(), "LABD_DB" not in os.environ


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def store_in_use(path: Path) -> int | None:
    """The pid of another live labd process on this host that has ``path`` open, else None.

    Reads the store's ``sessions`` table read-only; a file that is not (yet) a run store, or
    cannot be read, counts as not in use (opening it then reports the real problem).
    """
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute("SELECT pid, host FROM sessions WHERE stopped_at IS NULL").fetchall()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    host = os.uname().nodename
    for pid, where in rows:
        if where == host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            return pid
    return None


def in_use_error(path: Path, pid: int, what: str) -> CliError:
    """The one-line error for a store another labd process has open."""
    return CliError(
        f"cannot {what}: run store {str(path)!r} is in use by labd process {pid} on this host; "
        "stop that process first, or use another file with --db (--no-db keeps history in memory)"
    )


def open_run_store(db: Path | None, max_bytes: int | None = None) -> RunStore:
    """Open the run store at ``db`` (None: the default path, directory created if missing).

    Raises :class:`CliError`: exit 2 for a bad path, exit 1 if another labd has it open.
    """
    from labd.store import RunStore, StoreError

    path, is_default = resolve_db(db)
    pid = store_in_use(path)
    if pid is not None:
        raise in_use_error(path, pid, "record run history")
    try:
        return RunStore(path, create_dirs=is_default, max_bytes=max_bytes)
    except StoreError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def disk_bytes(path: Path) -> int:
    """Bytes the store uses on disk: the database, its WAL and its side files."""
    total = 0
    for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if part.is_file():
            total += part.stat().st_size
    files = path.with_name(path.name + ".files")
    if files.is_dir():
        total += sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    return total
