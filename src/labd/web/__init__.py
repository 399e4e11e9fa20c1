"""The web dashboard: server-rendered pages under ``/ui/``, live from the SSE streams.

Every labd server mounts it (:func:`labd.web.routes.install`): ``/ui/`` (overview),
``/ui/devices/{id}``, ``/ui/tasks``, ``/ui/tasks/new/{type}``, ``/ui/runs``,
``/ui/runs/{id}``, ``/ui/server``, ``/ui/login``, and ``/docs`` (Swagger UI) from local
files. Pages are Jinja2 templates rendered from the daemon; the browser then talks to the
same JSON API as every other client (htmx and ``fetch`` with JSON bodies and the
``X-Labd-UI`` header) and follows ``/stream/...`` for live parts. Every asset is served by
the server itself (``/ui/static/``), built from pinned npm packages (tools/build_assets.py).
"""

from __future__ import annotations

__all__: list[str] = []
