"""Where ``labd serve`` and ``labd demo`` keep run history, and opening it safely.

History goes to ``--db PATH`` (or ``$LABD_DB``), else :func:`labd.store.default_db_path`,
whose directory is created on first use. A path the user chose is taken as given: a
missing directory or a read-only location is one clear line and exit 2, never a new
directory somewhere unexpected. ``--no-db`` keeps history in memory.

One run store file belongs to one labd process at a time: opening a store marks every run it
left active as ``interrupted``, which would be wrong for runs another live process is still
running. The store's own lock (``<db>.lock``, an flock the OS drops when its holder dies) is
the one check; :func:`open_run_store` turns its refusal into a one-line error, and a restart
right after a crash or ``kill -9`` takes the file over. Reading a history needs no lock.
"""

from __future__ import annotations

import os
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


def in_use_error(path: Path, pid: int | None, what: str) -> CliError:
    """The one-line error for a store another live labd process has open."""
    who = f"labd process {pid}" if pid is not None else "another labd process"
    return CliError(
        f"cannot {what}: run store {str(path)!r} is in use by {who} on this host; stop that "
        "process first, or use another file with --db (--no-db keeps history in memory)"
    )


def open_run_store(db: Path | None, max_bytes: int | None = None) -> RunStore:
    """Open the run store at ``db`` (None: the default path, directory created if missing).

    Raises :class:`CliError`: exit 2 for a bad path, exit 1 if another labd has it open.
    """
    from labd.store import RunStore, StoreError, StoreInUseError

    path, is_default = resolve_db(db)
    try:
        return RunStore(path, create_dirs=is_default, max_bytes=max_bytes)
    except StoreInUseError as exc:
        raise in_use_error(path, exc.pid, "record run history") from None
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
