"""``/ui/login`` and ``/ui/logout``: a bearer token becomes the dashboard's session cookie.

The sign-in page posts ``{"token": ...}`` as JSON (the server's guards take only JSON
bodies); a token the server knows gets a new session (:mod:`labd.server.sessions`) in an
HttpOnly, SameSite=Strict cookie, and the answer names the user and role. Signing out ends
the session and clears the cookie. On a server without tokens there is nothing to sign in to:
the page says so and the POST is 404.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Body, Query
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from labd.server.context import ServerContext
from labd.server.routing import json_response
from labd.server.sessions import SessionTable, session_cookie, session_id_from
from labd.web.render import SECURITY_HEADERS, page

__all__ = ["login", "login_page", "logout", "safe_next"]

log = logging.getLogger("labd.server")


def safe_next(target: str | None) -> str:
    """``target`` if it is a dashboard path on this server, else ``/ui/`` (no open redirect)."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target
    return "/ui/"


def _sessions(request: Request) -> SessionTable | None:
    sessions = getattr(request.app.state, "labd_sessions", None)
    return sessions if isinstance(sessions, SessionTable) else None


async def login_page(
    request: Request, next_: Annotated[str | None, Query(alias="next", max_length=2048)] = None,
) -> Response:
    """The sign-in form (a token input and a ``Sign in`` button)."""
    ctx: ServerContext = request.app.state.labd
    if ctx.settings.tokens is None:
        return RedirectResponse(safe_next(next_), status_code=303)
    return page(request, "login.html", title="Sign in", next=safe_next(next_))


def _error(status: int, kind: str, message: str) -> Response:
    body: dict[str, Any] = {"error": {"type": kind, "message": message, "origin": "framework",
                      "timestamp": None, "traceback": None, "context": {}}}
    return json_response(body, status_code=status)


async def login(request: Request, token: Annotated[str, Body(embed=True, max_length=4096)],
                ) -> Response:
    """Trade a bearer token for a session cookie: 200 ``{"user", "role"}``, else 401."""
    ctx: ServerContext = request.app.state.labd
    sessions = _sessions(request)
    if ctx.settings.tokens is None or sessions is None:
        return _error(404, "NotFound", "This server has no tokens: there is nothing to sign in "
                      "to, every page is open.")
    found = ctx.settings.tokens.lookup(token.strip())
    if found is None:
        log.info("labd auth: dashboard sign-in refused (unknown token)")
        return _error(401, "Unauthorized", "The token is not one this server accepts "
                      "(mistyped, or removed from the server's tokens file).")
    session_id = sessions.create(found)
    log.info("labd auth: user %r (%s) signed in to the dashboard", found.user, found.role)
    answer: dict[str, Any] = {"user": found.user, "role": found.role}
    response = json_response(answer)
    response.headers["Set-Cookie"] = session_cookie(session_id,
                                                    secure=request.url.scheme == "https")
    response.headers.update(SECURITY_HEADERS)
    return response


async def logout(request: Request) -> Response:
    """End the session of the request's cookie and clear the cookie."""
    sessions = _sessions(request)
    session_id = session_id_from(request.headers.get("cookie"))
    ended = sessions is not None and session_id is not None and sessions.end(session_id)
    response = json_response({"status": "signed_out" if ended else "no_session"})
    response.headers["Set-Cookie"] = session_cookie(None, secure=request.url.scheme == "https")
    return response
