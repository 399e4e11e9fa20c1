"""Dashboard sign-in: a bearer token exchanged for an HttpOnly, SameSite=Strict session cookie.

A browser cannot attach ``Authorization`` to a page navigation or an ``EventSource``, so on a
server with tokens the dashboard (``/ui/login``) trades the token for a random session id kept
in the cookie :data:`COOKIE` (``HttpOnly``: page scripts cannot read it; ``SameSite=Strict``:
the browser never sends it with a request another site starts). The server keeps only the
SHA-256 digest of each session id, mapped to the :class:`~labd.server.auth.Token` it speaks
for, for at most :data:`SESSION_TTL_S` (sliding: each use extends it) and at most
:data:`MAX_SESSIONS` sessions (the oldest go first).

A request authenticated by the cookie must also carry :data:`UI_HEADER` (``X-Labd-UI: 1``),
which the dashboard's scripts add to every request: a cross-site form or ``fetch`` cannot add
a custom header without a CORS preflight, which the server never grants. The only requests
exempt are the ones a browser makes without scripts: GET/HEAD of dashboard pages
(``/ui/...``) and of the SSE streams (``/stream/...``, an ``EventSource``). Scripts, the CLI
and ``labd.client`` keep using bearer tokens; the cookie is never required.

Example::

    sessions = SessionTable()
    session_id = sessions.create(Token("alice", "operator"))
    sessions.lookup(session_id)   # Token(user='alice', role='operator')
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.responses import RedirectResponse
from starlette.types import Scope

if TYPE_CHECKING:
    from labd.server.auth import Token

__all__ = [
    "COOKIE",
    "MAX_SESSIONS",
    "NEEDS_UI_HEADER",
    "SESSION_TTL_S",
    "UI_HEADER",
    "SessionTable",
    "carries_ui_header",
    "cookie_exempt",
    "session_cookie",
    "session_id_from",
    "sign_in_redirect",
]

#: The session cookie's name.
COOKIE = "labd_session"
#: The header (value ``1``) the dashboard adds to every request it authenticates by cookie.
UI_HEADER = "X-Labd-UI"
#: A session unused this long ends (each use extends it).
SESSION_TTL_S = 12 * 3600.0
#: At most this many live sessions; signing in beyond it ends the least recently used.
MAX_SESSIONS = 1000
_EXEMPT_PREFIXES = ("/ui/", "/stream/")
#: The 403 message for a cookie request without :data:`UI_HEADER`.
NEEDS_UI_HEADER = (
    f"A request signed in by the dashboard's session cookie must carry the header "
    f"'{UI_HEADER}: 1' (the dashboard adds it; a form on another site cannot). Scripts "
    "send 'Authorization: Bearer <token>' instead.")


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8")).digest()


class SessionTable:
    """Live dashboard sessions, by digest of their id; thread-safe. See the module docstring."""

    def __init__(self, ttl: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        # digest -> (token, expires at, monotonic); least recently used first
        self._sessions: OrderedDict[bytes, tuple[Token, float]] = OrderedDict()

    def create(self, token: Token) -> str:
        """A new session id speaking for ``token`` (the value of the cookie)."""
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[_digest(session_id)] = (token, time.monotonic() + self.ttl)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session_id

    def lookup(self, session_id: str) -> Token | None:
        """The session's :class:`Token`, or None (unknown or expired); extends a live one."""
        key = _digest(session_id)
        now = time.monotonic()
        with self._lock:
            entry = self._sessions.get(key)
            if entry is None:
                return None
            token, expires = entry
            if expires <= now:
                del self._sessions[key]
                return None
            self._sessions[key] = (token, now + self.ttl)
            self._sessions.move_to_end(key)
            return token

    def end(self, session_id: str) -> bool:
        """End the session (sign out); False if there was none."""
        with self._lock:
            return self._sessions.pop(_digest(session_id), None) is not None

    def __len__(self) -> int:
        return len(self._sessions)

    def __repr__(self) -> str:
        return f"<SessionTable {len(self)} session(s)>"


def session_id_from(cookie_header: str | None) -> str | None:
    """The session id in a ``Cookie`` header, or None."""
    if not cookie_header or COOKIE not in cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def session_cookie(session_id: str | None, *, secure: bool) -> str:
    """The ``Set-Cookie`` value that sets (or, for None, clears) the session cookie."""
    value, age = (session_id, int(SESSION_TTL_S)) if session_id else ("", 0)
    attributes = [f"{COOKIE}={value}", "Path=/", f"Max-Age={age}", "HttpOnly",
                  "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def cookie_exempt(method: str, path: str) -> bool:
    """True for requests a browser makes without scripts (page loads, EventSource)."""
    return method in ("GET", "HEAD") and path.startswith(_EXEMPT_PREFIXES)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def carries_ui_header(scope: Scope) -> bool:
    """True if a cookie request may go on: it carries ``X-Labd-UI: 1``, or needs no scripts."""
    return (cookie_exempt(scope["method"], scope["path"])
            or _header(scope, UI_HEADER.lower().encode("ascii")) == "1")


def sign_in_redirect(scope: Scope) -> RedirectResponse | None:
    """For a browser's GET of a dashboard page (or of ``/`` as HTML) without a session: a 303
    to ``/ui/login?next=<where it was going>``; None for every other request."""
    path = scope["path"]
    html_root = path in ("/", "/ui") and "text/html" in _header(scope, b"accept")
    if scope["method"] != "GET" or not (path.startswith("/ui/") or html_root):
        return None
    target = "/ui/" if html_root else path
    query = scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    return RedirectResponse("/ui/login?" + urlencode({"next": target}), status_code=303)
