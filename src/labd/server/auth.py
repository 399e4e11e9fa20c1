"""Optional bearer tokens with roles: who may do what on a labd server.

A server made with ``tokens=`` answers a request (except the open paths below) only if it
carries ``Authorization: Bearer <token>``; GET requests may send ``?access_token=<token>``
instead, because a browser's EventSource cannot set headers. Each token speaks for a user with
a role, and each role includes the ones before it::

    viewer    every GET: devices, tasks, leases, runs, metrics, the SSE streams;
              POST /devices/{id}/call (the route itself lets viewers call queries only)
    operator  every other method: commands, connect/disconnect, tasks, own leases, stream stop
    admin     POST /devices (add devices), and breaking someone else's lease

Open paths (GET and HEAD, no token needed): ``/health`` for monitoring, which answers
anonymous callers with the status and counts only (a valid token gets the full body), and the
API description ``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect`` and ``/redoc``. The
description holds no secrets (it is the same for every labd of a version), and Swagger UI
fetches ``/openapi.json`` without a token, so ``/docs`` could not load otherwise; once loaded,
its "Authorize" button takes a token (the description declares the ``bearerAuth`` scheme).
A valid token sent to an open path is honoured (the route sees its user); an unknown one is
ignored there, never a 401, so a monitor never fails for a stale token.

:class:`BearerAuthMiddleware` is the one gate. Before routing it answers 401 ``Unauthorized``
(no token, or one it does not know) or 403 ``Forbidden`` (:func:`required_role` says the role
is too low); otherwise it passes the request on as the token's user: the client's own
``X-Labd-Owner`` header is replaced by the user name, so the core's ownership checks (lease
holder, task owner) see who really called and nobody can act as someone else. Only the lease
routes need more (who holds *this* lease); they ask :meth:`Token.require`.

The dashboard (``/ui/``) signs in at ``/ui/login`` and is then authenticated by an HttpOnly
session cookie instead (:mod:`labd.server.sessions`; such requests must carry ``X-Labd-UI``).
``/ui/login``, ``/ui/logout`` and ``/ui/static/...`` are open; a browser without a session
that asks for any other dashboard page is redirected (303) to ``/ui/login``.

Tokens are kept only as SHA-256 digests, compared with :func:`hmac.compare_digest`, and
removed from the request before it reaches a route; they never appear in answers, logs or reprs.
:func:`load_tokens` logs a warning when the file is open to group or others.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import shlex
import stat
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import Depends
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from labd.errors import InvalidArgumentError, LabDaemonException
from labd.server.errors import Forbidden, Unauthorized, describe_exception, error_response
from labd.server.sessions import (
    NEEDS_UI_HEADER,
    UI_HEADER,
    SessionTable,
    carries_ui_header,
    session_id_from,
    sign_in_redirect,
)

__all__ = [
    "PRINCIPAL_SCOPE_KEY",
    "ROLES",
    "BearerAuthMiddleware",
    "Caller",
    "Token",
    "TokenTable",
    "current_token",
    "load_tokens",
    "required_role",
    "tokens_file_exposure",
]

log = logging.getLogger("labd.server")

#: Roles from least to most allowed; each includes the ones before it.
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
#: Where the middleware leaves the caller's :class:`Token` in the ASGI scope.
PRINCIPAL_SCOPE_KEY = "labd.principal"
#: Fewer characters than this are guessable; ``secrets.token_urlsafe(32)`` gives 43.
MIN_TOKEN_CHARS = 8

# User names travel as the X-Labd-Owner header and appear in lease and run records.
_USER_PATTERN = re.compile(r"[A-Za-z0-9_.@+\-]{1,128}")
_USER_HELP = "1 to 128 letters, digits or the characters _ . @ + -"
# RFC 6750 b64token: what fits in "Authorization: Bearer <token>".
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# GET and HEAD only; see the module docstring for why these are open.
_OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
_QUERY_TOKEN = "access_token"
_LEASE_PATH = re.compile(r"/leases/[^/]+")
_CALL_PATH = re.compile(r"/devices/[^/]+/call")
_DROPPED_HEADERS = frozenset({b"authorization", b"x-labd-owner"})
# The dashboard's sign-in page, sign-out and its static files: any method listed, no token.
_OPEN_UI = frozenset({("GET", "/ui/login"), ("HEAD", "/ui/login"), ("POST", "/ui/login"),
                      ("POST", "/ui/logout")})
_UI_STATIC = "/ui/static/"


@dataclass(frozen=True)
class Token:
    """Who a bearer token speaks for: a user name and a role (``viewer``, ``operator``, ``admin``).

    The user is the principal of every request made with the token (lease holder, task owner).

    Example::

        LabDaemonServer(daemon, tokens={"s3cret-token": Token("alice", "operator")})
    """

    user: str
    role: str

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not _USER_PATTERN.fullmatch(self.user):
            raise InvalidArgumentError(f"A token's user must be {_USER_HELP}, got {self.user!r}.")
        if self.role not in ROLES:
            raise InvalidArgumentError(
                f"Token of user {self.user!r}: role {self.role!r} is not one of "
                f"{', '.join(ROLES)}.")

    def allows(self, role: str) -> bool:
        """True if this token's role is ``role`` or above."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def require(self, role: str, action: str) -> None:
        """Raise :class:`Forbidden` (403) unless this token's role is at least ``role``.

        ``action`` names what was refused, e.g. ``"POST /devices"``.
        """
        if self.allows(role):
            return
        error = Forbidden(
            f"{action} needs the {role!r} role; the token of user {self.user!r} has "
            f"{self.role!r}. Ask the lab's admin for a token with that role.")
        error.labd_context = {  # type: ignore[attr-defined]
            "required_role": role, "role": self.role, "user": self.user}
        raise error


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _check_secret(secret: object, where: str) -> str:
    # Never echo the secret: the message may end up in a terminal, a log or a bug report.
    if not isinstance(secret, str):
        raise InvalidArgumentError(f"{where}: a token must be a string, got {type(secret).__name__}.")
    if len(secret) < MIN_TOKEN_CHARS or not _TOKEN_PATTERN.fullmatch(secret):
        raise InvalidArgumentError(
            f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters of letters, digits "
            "and - . _ ~ + / (optionally ending in =); make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'.")
    return secret


def _as_token(value: object, where: str) -> Token:
    if isinstance(value, Token):
        return value
    if isinstance(value, tuple | list) and len(value) == 2:
        return Token(*value)
    raise InvalidArgumentError(
        f"{where}: expected Token(user, role) or a (user, role) pair, got {type(value).__name__}.")


class TokenTable:
    """Token strings mapped to :class:`Token`, kept as digests; see the module docstring.

    ``LabDaemonServer(tokens=...)`` builds one from a mapping; :func:`load_tokens` from a file.

    Example::

        table = TokenTable({"s3cret-token": ("alice", "operator")})
        table.lookup("s3cret-token")   # Token(user='alice', role='operator')
    """

    def __init__(self, tokens: Mapping[str, Token | tuple[str, str]]) -> None:
        if not isinstance(tokens, Mapping):
            raise InvalidArgumentError(
                "tokens must map token strings to Token(user, role) or (user, role), got "
                f"{type(tokens).__name__}.")
        if not tokens:
            raise InvalidArgumentError(
                "tokens is empty, so no request could ever be allowed; pass None for no "
                "authentication, or at least one token.")
        entries = []
        for position, (secret, who) in enumerate(tokens.items(), start=1):
            where = f"token #{position}"
            entries.append((_digest(_check_secret(secret, where)), _as_token(who, where)))
        self._entries: tuple[tuple[bytes, Token], ...] = tuple(entries)

    @classmethod
    def coerce(cls, tokens: TokenTable | Mapping[str, Token | tuple[str, str]]) -> TokenTable:
        """``tokens`` itself if it is a table, else a new table built from the mapping."""
        return tokens if isinstance(tokens, TokenTable) else cls(tokens)

    def lookup(self, presented: str) -> Token | None:
        """The :class:`Token` for ``presented``, or None; the time taken does not depend on it."""
        digest = _digest(presented)
        found: Token | None = None
        for known, token in self._entries:
            # Compare against every entry, without stopping at a match.
            if hmac.compare_digest(digest, known) and found is None:
                found = token
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def role_counts(self) -> dict[str, int]:
        """How many tokens have each role, most powerful first (roles without tokens omitted)."""
        counts = Counter(token.role for _, token in self._entries)
        return {role: counts[role] for role in reversed(ROLES) if counts[role]}

    def describe(self) -> str:
        """``"3 tokens (roles: 1 admin, 2 operator)"``: for banners and reprs, never secrets."""
        roles = ", ".join(f"{count} {role}" for role, count in self.role_counts().items())
        noun = "token" if len(self) == 1 else "tokens"
        return f"{len(self)} {noun} (roles: {roles})"

    def __repr__(self) -> str:
        return f"<TokenTable {self.describe()}>"


def load_tokens(
    path: str | Path, *, on_exposed: Callable[[str], object] | None = None,
) -> TokenTable:
    """Read a TOML tokens file: ``[tokens]`` with ``"<token>" = { user = "...", role = "..." }``.

    Raises :class:`InvalidArgumentError` naming the file and the entry (never the token). A
    file open to group or others (see :func:`tokens_file_exposure`) is loaded with a warning:
    logged, or given to ``on_exposed`` instead (``labd serve`` prints it).

    Example file::

        [tokens]
        "kq3...x9" = { user = "alice", role = "operator" }
        "Zt8...p2" = { user = "carol", role = "admin" }
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            exposure = tokens_file_exposure(file.fileno(), path)
            document = tomllib.load(file)
    except OSError as exc:
        raise InvalidArgumentError(f"tokens file {str(path)!r}: cannot read it ({exc.strerror}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"tokens file {str(path)!r} is not valid TOML: {exc}.") from None
    table = document.get("tokens")
    extra = sorted(set(document) - {"tokens"})
    if not isinstance(table, dict) or extra:
        raise InvalidArgumentError(
            f"tokens file {str(path)!r}: expected only a [tokens] table "
            f"(unexpected: {extra or 'no [tokens] table'}); each entry is "
            '"<token>" = { user = "alice", role = "operator" }.')
    tokens = {}
    for position, (secret, entry) in enumerate(table.items(), start=1):
        where = f"tokens file {str(path)!r}: token #{position}"
        tokens[secret] = _token_entry(entry, where)
    try:
        loaded = TokenTable(tokens)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"tokens file {str(path)!r}: {exc}") from None
    if exposure is not None:
        if on_exposed is None:
            log.warning("labd auth: %s", exposure)
        else:
            on_exposed(exposure)
    return loaded


def tokens_file_exposure(file: int | str | Path, path: str | Path | None = None) -> str | None:
    """Why the tokens file (a path or an open descriptor) is readable by others, or None.

    A file whose mode gives group or others any access is a warning (not an error: on a
    single-user PC it may be fine); on Windows mode bits say nothing, so this is None there.

    Example: ``tokens_file_exposure("tokens.toml")`` -> ``"tokens file 'tokens.toml' is
    open to group and others (mode 0644): ... chmod 600 tokens.toml"``.
    """
    if os.name == "nt":
        return None
    mode = os.fstat(file).st_mode if isinstance(file, int) else os.stat(file).st_mode
    if not mode & 0o077:
        return None
    who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)
    name = str(path if path is not None else file)
    return (f"tokens file {name!r} is open to {who} (mode {stat.S_IMODE(mode):04o}): "
            "anyone who can read it can use its tokens; make it private with "
            f"chmod 600 {shlex.quote(name)}")


def _token_entry(entry: object, where: str) -> Token:
    if not isinstance(entry, dict) or set(entry) != {"user", "role"}:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise InvalidArgumentError(
            f'{where}: expected {{ user = "...", role = "..." }} with exactly those two keys, '
            f"got {keys}.")
    try:
        return Token(entry["user"], entry["role"])
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from None


def required_role(method: str, path: str, query: bytes = b"") -> str | None:
    """The least role a request needs, from its method, path and query; None: open to anyone.

    Whether a lease is someone else's needs the lease itself: the lease routes check that.

    Example: ``required_role("POST", "/devices") == "admin"``. ``POST /devices/{id}/call``
    needs only ``viewer`` here: which method is called decides, so the route checks the rest.
    """
    if (method, path) in _OPEN_UI or (method in ("GET", "HEAD") and path.startswith(_UI_STATIC)):
        return None
    path = path.rstrip("/") or "/"
    if method in _READ_METHODS:
        return None if path in _OPEN_PATHS and method != "OPTIONS" else "viewer"
    if method == "POST" and path == "/devices":
        return "admin"
    if method == "POST" and _CALL_PATH.fullmatch(path):
        return "viewer"  # queries are a viewer's; the route refuses their commands (403)
    if method == "DELETE" and _LEASE_PATH.fullmatch(path) and _has_param(query, "reason"):
        return "admin"  # ending a lease with a reason breaks it
    return "operator"


def _has_param(query: bytes, name: str) -> bool:
    return any(unquote_plus(part.partition(b"=")[0].decode("latin-1")) == name
               for part in query.split(b"&"))


def current_token(request: Request) -> Token | None:
    """The :class:`Token` the request was let in with; None when the server has no tokens."""
    token = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return token if isinstance(token, Token) else None


#: Route parameter: the caller's :class:`Token`, or None when the server has no tokens.
Caller = Annotated[Token | None, Depends(current_token)]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _split_query(query: bytes) -> tuple[bytes, str | None]:
    """The query string without ``access_token``, and that token's value (if any)."""
    kept, found = [], None
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if unquote_plus(key.decode("latin-1")) == _QUERY_TOKEN:
            found = unquote_plus(value.decode("latin-1")) if found is None else found
        else:
            kept.append(part)
    return b"&".join(kept), found


_NEEDS_TOKEN = (
    "This labd server needs a bearer token: send 'Authorization: Bearer <token>' "
    "(Python: labd.connect(url, token=...); CLI: --token or $LABD_TOKEN; a browser's "
    "EventSource: ?access_token=<token>).")
_UNKNOWN_TOKEN = (
    "The bearer token is not one this server accepts (mistyped, or removed from the server's "
    "tokens); ask the lab's admin for a valid one.")


def _presented_token(scope: Scope, query_token: str | None) -> tuple[str | None, str]:
    """The token the request carries, or None and why it carries none usable."""
    authorization = _header(scope, b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            # The header's content is not echoed: without a scheme it is the secret itself.
            return None, "The Authorization header is not 'Bearer <token>'. " + _NEEDS_TOKEN
        return value, _UNKNOWN_TOKEN
    if query_token is not None:
        if scope["method"] not in ("GET", "HEAD"):
            return None, ("?access_token= is accepted on GET requests only (for EventSource); "
                          "send the token in an 'Authorization: Bearer <token>' header.")
        return query_token, _UNKNOWN_TOKEN
    return None, _NEEDS_TOKEN


class BearerAuthMiddleware:
    """ASGI middleware: the one place that lets requests in by bearer token and role.

    See the module docstring. Installed by :func:`labd.server.create_app` only when the
    server has tokens, so a server without them behaves exactly as before.
    """

    def __init__(self, app: ASGIApp, tokens: TokenTable,
                 sessions: SessionTable | None = None) -> None:
        self.app = app
        self.tokens = tokens
        self.sessions = sessions

    def _from_cookie(self, scope: Scope) -> Token | None:
        """The token of the request's dashboard session cookie, or None."""
        if self.sessions is None:
            return None
        session_id = session_id_from(_header(scope, b"cookie"))
        return self.sessions.lookup(session_id) if session_id is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        query, query_token = _split_query(scope.get("query_string", b""))
        needed = required_role(method, path, query)
        presented, problem = _presented_token(scope, query_token)
        token = self.tokens.lookup(presented) if presented is not None else None
        if token is None and presented is None and problem == _NEEDS_TOKEN:
            token = self._from_cookie(scope)
            if token is not None and needed is not None and not carries_ui_header(scope):
                log.info("labd auth: refused %s %s by session cookie without %s",
                         method, path, UI_HEADER)
                await _refuse(scope, receive, send, Forbidden(NEEDS_UI_HEADER), None)
                return
        if needed is None:
            # Open to anyone; a valid token still says who calls (the full /health body).
            await self.app(scope if token is None else _as_user(scope, token, query),
                           receive, send)
            return
        redirect = sign_in_redirect(scope) if token is None else None
        if redirect is not None:  # a browser without a session: the sign-in page first
            await redirect(scope, receive, send)
            return
        if token is None:
            challenge = 'Bearer realm="labd"' + (', error="invalid_token"' if presented else "")
            log.info("labd auth: refused %s %s (%s)", method, path,
                     "unknown token" if presented else "no token")
            await _refuse(scope, receive, send, Unauthorized(problem), challenge)
            return
        try:
            token.require(needed, f"{method} {path}")
        except Forbidden as exc:
            log.info("labd auth: refused %s %s to user %r (%s; needs %s)",
                     method, path, token.user, token.role, needed)
            await _refuse(scope, receive, send, exc, None)
            return
        await self.app(_as_user(scope, token, query), receive, send)


def _as_user(scope: Scope, token: Token, query: bytes) -> Scope:
    """The request as the token's user: no credentials left, X-Labd-Owner set to the user."""
    headers = [(key, value) for key, value in scope.get("headers", ())
               if key not in _DROPPED_HEADERS]
    # The routes take the principal from X-Labd-Owner; a client's own value never gets through.
    headers.append((b"x-labd-owner", token.user.encode("ascii")))
    inner: dict[str, Any] = dict(scope)
    inner.update(headers=headers, query_string=query)
    inner[PRINCIPAL_SCOPE_KEY] = token
    return inner


async def _refuse(
    scope: Scope, receive: Receive, send: Send, error: LabDaemonException, challenge: str | None,
) -> None:
    # A 403 carries no challenge: the lease routes raise theirs as plain errors, and all
    # 403 answers look alike.
    status, record = describe_exception(error)
    context = getattr(getattr(scope.get("app"), "state", None), "labd", None)
    if context is not None:
        context.metrics.count_error(status, record.type)
    headers = {"WWW-Authenticate": challenge} if challenge else None
    response = error_response(status, record, headers=headers)
    await response(scope, receive, send)
