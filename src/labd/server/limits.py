"""Refuse request bodies larger than ``max_body_bytes`` (HTTP 413), declared or streamed.

A declared ``Content-Length`` over the limit is answered before the body is read. A body sent
without one (chunked) is counted as it arrives; the read that crosses the limit raises
:class:`PayloadTooLarge`, which the route turns into the 413 answer. Nothing is parsed, so
nothing changes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labd.server.errors import PayloadTooLarge, error_response, http_exception_record

__all__ = ["BodyLimitMiddleware"]


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed Content-Length itself
    return None


class BodyLimitMiddleware:
    """ASGI middleware enforcing ``max_body_bytes``; see the module docstring."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(self.max_body_bytes)
        record = http_exception_record(error, scope.get("method", ""), scope.get("path", ""))
        app = scope.get("app")
        context = getattr(getattr(app, "state", None), "labd", None)
        if context is not None:
            context.metrics.count_error(413, record.type)
        await error_response(413, record, headers={"Connection": "close"})(scope, receive, send)
