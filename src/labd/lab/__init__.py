"""Several lab PCs, one lab: labd nodes joined through a Redis-protocol engine.

Without an engine labd is one process and nothing here is imported. With one, each
``labd serve --engine redis://... --node NAME`` is a :class:`LabNode`: it registers its
devices in the lab's directory, serves calls to them from other nodes, calls other nodes'
devices for its own callers, and takes claims in the engine with fencing tokens. See
docs/multi-host.md and docs/decisions/0014-lab-engine.md.

The core of this package imports nothing from ``redis``; :func:`connect_engine` imports the
Redis coordinator only for a ``redis://`` or ``rediss://`` URL (the extra ``labd[lab]``).

    from labd.lab import LabNode, connect_engine
    node = LabNode(daemon, connect_engine("redis://127.0.0.1:6379/0"), "pc-laser")
    node.start()
"""

from __future__ import annotations

import threading

from labd.lab.claims import EngineClaims, RemoteClaim
from labd.lab.coordinator import ClaimHolder, ClaimOutcome, ClaimSpec, Coordinator, StreamEntry
from labd.lab.errors import (
    ClaimLostError,
    DeviceIdConflictError,
    EngineUnavailableError,
    EngineUrlError,
    NodeNameConflictError,
    QueriesOnlyError,
)
from labd.lab.local import LocalCoordinator
from labd.lab.node import LabNode, RemoteDevice, RemoteRun
from labd.lab.settings import LabSettings, LabTimings, check_engine_url, lab_settings

__all__ = [
    "ClaimHolder",
    "ClaimLostError",
    "ClaimOutcome",
    "ClaimSpec",
    "Coordinator",
    "DeviceIdConflictError",
    "EngineClaims",
    "EngineUnavailableError",
    "EngineUrlError",
    "LabNode",
    "LabSettings",
    "LabTimings",
    "LocalCoordinator",
    "NodeNameConflictError",
    "QueriesOnlyError",
    "RemoteClaim",
    "RemoteDevice",
    "RemoteRun",
    "StreamEntry",
    "check_engine_url",
    "connect_engine",
    "lab_settings",
]

_MEMORY: dict[str, LocalCoordinator] = {}
_MEMORY_LOCK = threading.Lock()


def connect_engine(url: str) -> Coordinator:
    """The coordinator for an engine URL (checked with :func:`check_engine_url`).

    ``redis://`` / ``rediss://``: Redis 7 or Valkey (needs ``pip install 'labd[lab]'``);
    ``memory://NAME``: an in-process coordinator shared by every node of this process that
    names it. Connecting is lazy: an unreachable engine is reported by its first use.
    """
    check_engine_url(url)
    if url.startswith("memory://"):
        with _MEMORY_LOCK:
            return _MEMORY.setdefault(url, LocalCoordinator())
    try:
        from labd.lab.redis_engine import RedisCoordinator
    except ImportError as exc:
        raise EngineUrlError(
            f"a redis:// engine needs the redis client ({exc}); install it with "
            "pip install 'labd[lab]'") from None
    return RedisCoordinator(url)
