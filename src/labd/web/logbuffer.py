"""The server's recent log lines, kept in a bounded ring for the dashboard's server page.

:class:`LogRing` is a :class:`logging.Handler` attached to the ``labd`` and ``uvicorn``
loggers while a server app runs (``attach``/``detach`` from the app's lifespan). It keeps
the last :data:`CAPACITY` records as plain dicts; older ones are dropped, so a chatty logger
never grows the server's memory. It sees what those loggers emit at their configured levels
(warnings and above unless the application configured logging), and it never changes what
is printed: where no other handler would see a record, Python's last-resort handler still
prints it.

Example::

    ring = LogRing(); ring.attach()
    logging.getLogger("labd.server").warning("device laser1 is slow")
    ring.recent(1)[0]["message"]   # 'device laser1 is slow'
    ring.detach()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from labd.errors import iso_from_timestamp

__all__ = ["CAPACITY", "LOGGERS", "LogRing"]

#: Log records kept.
CAPACITY = 500
#: Loggers whose records the ring keeps.
LOGGERS = ("labd", "uvicorn")


class LogRing(logging.Handler):
    """A handler keeping the last ``capacity`` log records; see the module docstring."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(logging.DEBUG)
        self._records: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the caller's logging
            message = str(record.msg)
        self.note(record.levelname, record.name, message, record.created)
        self._keep_last_resort(record)

    def note(self, level: str, logger: str, message: str, created: float | None = None) -> None:
        """Keep one line (the server's own notes, such as its start, use this directly)."""
        entry = {"time": iso_from_timestamp(time.time() if created is None else created),
                 "level": level, "logger": logger, "message": message[:2000]}
        with self._ring_lock:
            self._records.append(entry)

    def _keep_last_resort(self, record: logging.LogRecord) -> None:
        """Print what Python would have printed without this handler.

        A logger chain without handlers sends warnings to ``logging.lastResort`` (stderr):
        that is how ``labd serve`` shows them. This handler counts as one, so it forwards
        them itself when it is the only handler in the chain.
        """
        last = logging.lastResort
        if last is None or record.levelno < last.level:
            return
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent
        last.handle(record)

    def recent(self, limit: int = 200) -> list[dict[str, Any]]:
        """The last ``limit`` records, oldest first."""
        with self._ring_lock:
            items = list(self._records)
        return items[-limit:] if limit > 0 else []

    def attach(self) -> None:
        """Start keeping the records of :data:`LOGGERS`."""
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        """Stop keeping records (idempotent)."""
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)
