"""labd over HTTP: :class:`LabDaemonServer` serves a daemon with FastAPI, uvicorn and SSE.

The wire contract is docs/http-api.md. The client half (``ServerAPI``, ``SSEClient``,
``ServerAPIError``, ``ServerConnectionError``) lives in :mod:`labd.client`; it is re-exported
here because LabDaemon 1.0 code imports it from ``labdaemon.server``. The re-export is lazy,
so the server works without loading the client.

Example::

    import labd as ld
    from labd.server import LabDaemonServer

    daemon = ld.LabDaemon()
    with LabDaemonServer(daemon, port=5000) as server:
        input(f"Serving on {server.url}; press Enter to stop")
"""

from __future__ import annotations

from typing import Any

from labd.server.app import create_app
from labd.server.auth import Token, TokenTable, load_tokens
from labd.server.lifecycle import LabDaemonServer, ServerState

__all__ = [
    "LabDaemonServer",
    "SSEClient",
    "ServerAPI",
    "ServerAPIError",
    "ServerConnectionError",
    "ServerState",
    "Token",
    "TokenTable",
    "create_app",
    "load_tokens",
]

_FROM_CLIENT = frozenset({"SSEClient", "ServerAPI", "ServerAPIError", "ServerConnectionError"})


def __getattr__(name: str) -> Any:
    if name in _FROM_CLIENT:
        from labd import client  # lazy: only code that asks for the client loads it

        return getattr(client, name)
    raise AttributeError(f"module 'labd.server' has no attribute {name!r}")
