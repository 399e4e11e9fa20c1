"""``AsyncServerAPI``: the same endpoints as :class:`ServerAPI`, awaited.

Every method of :class:`~labd.client.api.Endpoints` is available and returns a coroutine;
request building and answer reading are the sync client's (``labd.client._http``).

Example::

    async with AsyncServerAPI("http://127.0.0.1:5000") as api:
        devices = (await api.list_devices())["devices"]
        power = await api.call("pm1", "get_power")
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import httpx

from labd.client._http import Call, build_request, client_headers, connection_error, read_answer
from labd.client.api import DEFAULT_URL, Endpoints, http_timeout
from labd.client.errors import ClientClosedError

__all__ = ["AsyncServerAPI"]


class AsyncServerAPI(Endpoints[Coroutine[Any, Any, Any]]):
    """Asyncio client for a labd server over one pooled ``httpx.AsyncClient``.

    Same constructor, methods and exceptions as :class:`ServerAPI`; ``await`` each call and
    ``await api.aclose()`` (or ``async with``) at the end.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        owner: str | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.owner = owner
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=http_timeout(timeout),
            headers=client_headers(owner, token),
        )

    def __repr__(self) -> str:
        state = "closed" if self._client.is_closed else "open"
        return f"<AsyncServerAPI {self.base_url} owner={self.owner!r} {state}>"

    async def _send(self, call: Call) -> Any:
        if self._client.is_closed:
            raise ClientClosedError(
                f"This AsyncServerAPI for {self.base_url} was closed; create a new one."
            )
        request = build_request(self._client, self, call)
        try:
            response = await self._client.send(request)
        except httpx.TransportError as exc:
            raise connection_error(exc, call, self.base_url) from exc
        return read_answer(call, response)

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._client.is_closed

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._client.aclose()

    async def close(self) -> None:
        """Alias of :meth:`aclose`, for symmetry with :class:`ServerAPI`."""
        await self.aclose()

    async def __aenter__(self) -> AsyncServerAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
