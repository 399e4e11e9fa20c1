"""Guards against the browser on the lab PC: JSON-only bodies (415) and the Host check (421).

A web page a lab member opens can send requests to ``http://127.0.0.1:5000`` without a token.
Two ASGI middlewares, installed on every app by :func:`labd.server.create_app`, take away
what such a page could do. They run before routing, so the hand-parsed ``/call`` route is
covered like every other route.

:class:`JsonBodyGuard` (HTTP 415 ``UnsupportedMediaType``)
    A POST, PUT, PATCH or DELETE whose request has a body (``Content-Length`` above 0 or
    ``Transfer-Encoding``) or declares one (a ``Content-Type`` header) must say
    ``Content-Type: application/json``, optionally with ``; charset=utf-8``. Browsers send
    ``text/plain``, form and multipart bodies cross-site without asking first (no CORS
    preflight); an ``application/json`` body needs a preflight, which a server without CORS
    origins never grants. A bodiless POST (no ``Content-Type``, no body), such as
    ``POST /tasks/{id}/cancel``, stays allowed.

:class:`HostGuard` (HTTP 421 ``MisdirectedRequest``)
    DNS rebinding: a page from ``evil.example`` re-points that name at 127.0.0.1 and then
    reads the answers as same-origin. The page's requests still carry ``Host: evil.example``,
    so the server answers only Host names it serves (ports ignored, case-insensitive):

    * ``localhost``, ``127.0.0.1``, ``::1`` (``[::1]``);
    * the bind address (``ServerSettings.bind_host``, e.g. ``labd serve --host``);
    * the address the connection actually arrived at. A server bound to ``0.0.0.0`` or
      ``::`` thus answers clients that use this machine's IP addresses (a rebinding page
      always sends its own *name*, never an IP address, so this opens nothing);
    * the names in ``ServerSettings.allowed_hosts`` (``labd serve --allow-host NAME``, the
      config key ``allowed_hosts = [...]``, ``LabDaemonServer(allowed_hosts=[...])``). A
      server reached by a host name (``labpc.example.org``) must list it; ``"*"`` turns the
      check off (behind a reverse proxy that checks Host itself).

    A request without a ``Host`` header (HTTP/1.0 tools) is let through: browsers always
    send one, so it cannot come from a rebinding page.

:class:`CrossSiteGuard` (HTTP 403 ``CrossSiteRequest``)
    A bodiless POST (``POST /tasks/{id}/cancel``, ``.../disconnect``) passes the JSON rule, and
    a page can send one cross-site with ``fetch(url, {method: "POST", mode: "no-cors"})``.
    Browsers mark every such request with an ``Origin`` header (and ``Sec-Fetch-Site``), so
    a state-changing request that carries an ``Origin`` must come from this server's own
    origin (``scheme://Host``, the dashboard) or from one of ``ServerSettings.cors_origins``.
    Scripts, the CLI and ``labd.client`` send no ``Origin`` and are not affected.

Refusals are error records like every other error answer, counted in ``/metrics``; nothing
reaches a route, so nothing changes.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from labd.errors import ErrorRecord, InvalidArgumentError
from labd.server.errors import error_response

__all__ = [
    "ALWAYS_ALLOWED_HOSTS",
    "CrossSiteGuard",
    "GuardChain",
    "HostGuard",
    "JsonBodyGuard",
    "Refusal",
    "host_name",
    "is_wildcard_address",
    "json_media_type_problem",
    "normalize_allowed_hosts",
]

log = logging.getLogger("labd.server")

#: Host names every server answers (besides its bind address and allowed_hosts).
ALWAYS_ALLOWED_HOSTS: frozenset[str] = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON = "application/json"
_CHARSETS = frozenset({"utf-8", "utf8"})
_ALLOW_HOW = "start labd serve with --allow-host NAME or add it to allowed_hosts"


def host_name(value: str) -> str:
    """The host of a ``Host`` header or address, lower-case, without port, brackets, final dot.

    Example: ``host_name("[::1]:5000") == "::1"``, ``host_name("LabPC.:80") == "labpc"``.
    """
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # name:port or v4:port; more colons: a bare IPv6 address
        value = value.partition(":")[0]
    value = value.rstrip(".")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return value
    # "::ffff:10.0.0.5" (a dual-stack socket's view of an IPv4 client) is 10.0.0.5.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def is_wildcard_address(host: str) -> bool:
    """True for ``0.0.0.0``, ``::`` and the empty host: listening on every interface."""
    return host_name(host) in _WILDCARD_ADDRESSES or host.strip() in _WILDCARD_ADDRESSES


def normalize_allowed_hosts(names: Iterable[object]) -> tuple[str, ...]:
    """Check ``allowed_hosts`` entries and return them as :func:`host_name` gives them.

    Raises :class:`InvalidArgumentError` naming the first bad entry and what is valid.
    """
    if isinstance(names, str | bytes):
        raise InvalidArgumentError(
            f"allowed_hosts must be a list of host names such as ['labpc.example.org'], got the "
            f"single string {names!r}; wrap it in a list.")
    normalized = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(
                f"allowed_hosts: each entry must be a host name such as 'labpc.example.org' "
                f"(or '*' for any), got {name!r}.")
        if "/" in name or any(ch.isspace() for ch in name.strip()) or "@" in name:
            raise InvalidArgumentError(
                f"allowed_hosts: {name!r} is not a host name; give the name alone, without "
                "scheme, path or spaces, e.g. 'labpc.example.org' (a port is ignored).")
        normalized.append("*" if name.strip() == "*" else host_name(name))
    return tuple(dict.fromkeys(normalized))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


@dataclass(frozen=True)
class Refusal:
    """A guard's answer to a request it refuses: HTTP status, error type, message, context."""

    status: int
    kind: str
    message: str
    context: dict[str, object]


async def _refuse(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    record = ErrorRecord(type=refusal.kind, message=refusal.message, origin="framework",
                         context=refusal.context)
    labd_context = getattr(getattr(scope.get("app"), "state", None), "labd", None)
    if labd_context is not None:
        labd_context.metrics.count_error(refusal.status, refusal.kind)
    await error_response(refusal.status, record)(scope, receive, send)


class _Guard:
    """An ASGI middleware that lets a request through unless :meth:`refusal` refuses it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def refusal(self, scope: Scope) -> Refusal | None:
        """Why this HTTP request is refused, or None to let it through."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await _refuse(scope, receive, send, refusal)


class GuardChain:
    """One ASGI middleware running several guards' checks in order, the first refusal wins.

    Why: every middleware layer costs every request a coroutine call; guards that sit next
    to each other in the stack (no CORS or tokens between them) run as one layer.
    ``guards`` are ``(guard class, keyword arguments)`` pairs, outermost first.
    """

    def __init__(
        self, app: ASGIApp, guards: Iterable[tuple[type[_Guard], dict[str, Any]]],
    ) -> None:
        self.app = app
        self.guards = tuple(cls(app, **kwargs) for cls, kwargs in guards)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for guard in self.guards:
                refusal = guard.refusal(scope)
                if refusal is not None:
                    await _refuse(scope, receive, send, refusal)
                    return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- 415
def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        try:
            return int(length) > 0
        except ValueError:
            return True  # the HTTP server refuses a malformed length itself
    return _header(scope, b"transfer-encoding") is not None


def json_media_type_problem(content_type: str | None) -> str | None:
    """Why ``content_type`` is not ``application/json[; charset=utf-8]``, or None if it is."""
    if content_type is None:
        return "no Content-Type"
    media_type, *params = (part.strip() for part in content_type.split(";"))
    if media_type.lower() != _JSON:
        return f"Content-Type {content_type.strip()!r}"
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() != "charset" or value.strip().strip('"').lower() not in _CHARSETS:
            return f"Content-Type {content_type.strip()!r} (parameter {param!r})"
    return None


class JsonBodyGuard(_Guard):
    """ASGI middleware: bodies of state-changing requests are JSON or refused with 415.

    See the module docstring.
    """

    def refusal(self, scope: Scope) -> Refusal | None:
        if scope["method"] not in _BODY_METHODS:
            return None
        content_type = _header(scope, b"content-type")
        if content_type is None and not _has_body(scope):
            return None
        problem = json_media_type_problem(content_type)
        if problem is None:
            return None
        method, path = scope["method"], scope["path"]
        log.info("labd server: refused %s %s with %s (415)", method, path, problem)
        return Refusal(
            415, "UnsupportedMediaType",
            f"{method} {path} sent a body with {problem}; this server accepts request bodies "
            "only as JSON: send 'Content-Type: application/json' (optionally with "
            "'; charset=utf-8'), or no body at all.",
            {"content_type": content_type, "accepted": [_JSON, f"{_JSON}; charset=utf-8"]},
        )


# ---------------------------------------------------------------------- 403 cross-site
class CrossSiteGuard(_Guard):
    """ASGI middleware: a state-changing request from a browser page of another origin gets 403.

    ``allowed_origins`` are the configured CORS origins. See the module docstring.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        super().__init__(app)
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    def allows(self, origin: str, scheme: str, host: str | None) -> bool:
        """True if a request from ``origin`` to ``scheme://host`` may change state."""
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins or "*" in self.allowed_origins:
            return True
        return host is not None and origin == f"{scheme}://{host.strip().lower()}"

    def refusal(self, scope: Scope) -> Refusal | None:
        if scope["method"] not in _BODY_METHODS:
            return None
        origin = _header(scope, b"origin")
        if origin is None or self.allows(origin, scope.get("scheme", "http"),
                                         _header(scope, b"host")):
            return None
        method, path = scope["method"], scope["path"]
        log.warning("labd server: refused %s %s from the page origin %r (403 cross-site)",
                    method, path, origin[:200])
        return Refusal(
            403, "CrossSiteRequest",
            f"{method} {path} came from a web page of another origin ({origin[:200]!r}); a page "
            "may only change this lab's state from the server's own origin. If that page is "
            "yours, start labd serve with its origin in cors_origins.",
            {"origin": origin[:200]},
        )


# ---------------------------------------------------------------------- 421
class HostGuard(_Guard):
    """ASGI middleware: answer only ``Host`` names this server serves, else 421.

    ``bind_host`` is the address the server listens on; ``allowed_hosts`` extra names (``*``:
    any). See the module docstring for the full rule.
    """

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        super().__init__(app)
        allowed = normalize_allowed_hosts(allowed_hosts)
        self.any_host = "*" in allowed
        self.allowed = frozenset({*ALWAYS_ALLOWED_HOSTS, *allowed, host_name(bind_host)})
        # Decisions by (Host header, local address): a server sees few distinct pairs, and
        # parsing addresses costs more than the rest of the check. Bounded, so a client
        # sending ever new Host values cannot grow it.
        self._decided: dict[tuple[str, str | None], bool] = {}

    def allows(self, host: str, local_address: str | None = None) -> bool:
        """True if a request with ``Host: host`` that arrived at ``local_address`` is served."""
        if self.any_host:
            return True
        key = (host, local_address)
        decided = self._decided.get(key)
        if decided is not None:
            return decided
        name = host_name(host)
        decided = name in self.allowed or (
            local_address is not None and name == host_name(local_address))
        if len(self._decided) >= 256:
            self._decided.clear()
        self._decided[key] = decided
        return decided

    def refusal(self, scope: Scope) -> Refusal | None:
        host = _header(scope, b"host")
        server = scope.get("server")
        if host is None or self.allows(host, str(server[0]) if server else None):
            return None
        name = host_name(host)[:255]
        log.warning("labd server: refused %s %s for Host %r (421; not an allowed host)",
                    scope["method"], scope["path"], host[:200])
        return Refusal(
            421, "MisdirectedRequest",
            f"This labd server does not serve the host {name!r} (the request's Host header); "
            "it answers localhost, 127.0.0.1, [::1], its own addresses and the names it was "
            f"told to allow. If {name!r} is a name of this machine, {_ALLOW_HOW}.",
            {"host": name},
        )
