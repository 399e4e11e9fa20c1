"""The transport-independent half of the client: build a request, read an answer.

:class:`ServerAPI` (httpx.Client) and :class:`AsyncServerAPI` (httpx.AsyncClient) both
describe each endpoint as a :class:`Call`, turn it into an ``httpx.Request`` with
:func:`build_request`, and turn the ``httpx.Response`` into a value or an exception with
:func:`read_answer`. Only the line that sends differs between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from labd.client.errors import (
    ServerConnectionError,
    ServerTimeoutError,
    error_from_answer,
)
from labd.errors import InvalidArgumentError

__all__ = [
    "OWNER_HEADER",
    "Call",
    "acting_owner",
    "build_request",
    "client_headers",
    "connection_error",
    "path",
    "read_answer",
]

OWNER_HEADER = "X-Labd-Owner"

# NumPy arrays and scalars in arguments are sent as lists and numbers, like the server does.
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

# Owner override for the current thread/task, set by a remote lease's `with` block so that
# commands inside it act as the lease holder (as a local Lease does with acting_as).
# Keyed by the client object, so a lease on one server does not change calls to another.
_ACTING_OWNER: ContextVar[tuple[object, str] | None] = ContextVar("labd_acting_owner", default=None)


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Call:
    """One endpoint call: method, path, JSON body, query, and how to read the answer.

    ``expect`` turns the decoded JSON into the value the API method returns (for example
    ``lambda answer: answer["result"]``); ``text=True`` reads the body as text instead.
    """

    method: str
    path: str
    body: Any = None
    params: Mapping[str, str] | None = None
    timeout: float | None = None
    expect: Callable[[Any], Any] = field(default=_identity)
    text: bool = False


def path(*parts: str) -> str:
    """``/devices/laser1/call`` from ``("devices", "laser1", "call")``, ids percent-quoted.

    Quoting keeps an odd id (``a/b``) one path segment, so the server rejects it by name
    instead of routing it elsewhere; ``.`` and ``..`` would be collapsed by URL
    normalisation, so they are refused here.
    """
    segments = []
    for part in parts:
        if not isinstance(part, str) or part in ("", ".", ".."):
            raise InvalidArgumentError(
                f"{part!r} is not a valid id: ids are non-empty strings of letters, digits "
                "and _ - . : (e.g. 'laser1')."
            )
        segments.append(quote(part, safe=""))
    return "/" + "/".join(segments)


def client_headers(owner: str | None, token: str | None) -> dict[str, str]:
    """Headers every request of a client carries: identity and bearer token."""
    headers = {"Accept": "application/json", "User-Agent": "labd-client"}
    if owner:
        headers[OWNER_HEADER] = owner
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@contextlib.contextmanager
def acting_owner(client: object, owner: str) -> Iterator[None]:
    """Within the block, requests of ``client`` from this thread/task carry ``owner``."""
    reset = _ACTING_OWNER.set((client, owner))
    try:
        yield
    finally:
        _ACTING_OWNER.reset(reset)


def _encode(call: Call) -> bytes | None:
    if call.body is None:
        return None
    try:
        return orjson.dumps(call.body, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise InvalidArgumentError(
            f"Cannot send {call.method} {call.path}: the arguments are not JSON-serialisable "
            f"({exc}). Send numbers, strings, booleans, None, lists, dicts or NumPy arrays."
        ) from exc


def build_request(
    client: httpx.Client | httpx.AsyncClient, owner_key: object, call: Call
) -> httpx.Request:
    """The ``httpx.Request`` for ``call`` on ``client`` (which holds base URL and headers)."""
    headers: dict[str, str] = {}
    content = _encode(call)
    if content is not None:
        headers["Content-Type"] = "application/json"
    acting = _ACTING_OWNER.get()
    if acting is not None and acting[0] is owner_key:
        headers[OWNER_HEADER] = acting[1]
    timeout: Any = httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout
    return client.build_request(
        call.method,
        call.path,
        content=content,
        params=call.params,
        headers=headers,
        timeout=timeout,
    )


def read_answer(call: Call, response: httpx.Response) -> Any:
    """The value of a successful answer, or the mirrored exception of an error answer."""
    if response.status_code >= 400:
        raise error_from_answer(
            response.status_code, response.content, call.method, str(response.request.url)
        )
    if call.text:
        return call.expect(response.text)
    if response.status_code == 204 or not response.content:
        return call.expect(None)
    try:
        decoded = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ServerConnectionError(
            f"{call.method} {response.request.url} answered HTTP {response.status_code} with a "
            f"body that is not JSON ({exc}); is this URL a labd server?",
            status_code=response.status_code,
        ) from exc
    return call.expect(decoded)


def connection_error(exc: httpx.TransportError, call: Call, base_url: str) -> ServerConnectionError:
    """The client error for a request that got no answer (refused, reset, timed out)."""
    where = f"{call.method} {base_url}{call.path}"
    if isinstance(exc, httpx.TimeoutException):
        return ServerTimeoutError(
            f"No answer to {where} in time ({type(exc).__name__}: {exc or 'timed out'}). "
            "The server or the device may be busy; pass a larger timeout= to the client."
        )
    return ServerConnectionError(
        f"Cannot reach the labd server for {where} ({type(exc).__name__}: {exc}). "
        "Is it running? Start one with `labd serve` (or `labd demo`)."
    )
