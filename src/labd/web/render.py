"""Render the dashboard's Jinja2 templates: who is signed in, the page, the security headers.

Every page gets ``user`` (name, role, and what the role allows), ``tokens`` (whether the
server has any: without them there is no sign-in and the browser user may do everything),
the labd version and the navigation. Answers carry a Content-Security-Policy that lets a
page load scripts, styles, images and connections from this server only: no page can pull an
asset from another host, even by mistake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

import labd
from labd.server.auth import current_token

if TYPE_CHECKING:
    from labd.server.context import ServerContext

__all__ = ["CSP", "TEMPLATES", "Viewer", "page", "viewer_of"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Only this server: scripts, styles, images (and data: images, which Swagger UI draws).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'; "
       "base-uri 'self'; form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
_ROLES = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class Viewer:
    """Who looks at the page: a token's user, or the local user of a server without tokens."""

    name: str | None
    role: str
    tokens: bool  # the server has tokens (so there is a sign-in, and roles matter)

    def allows(self, role: str) -> bool:
        """True if this user's role is ``role`` or above."""
        return _ROLES.index(self.role) >= _ROLES.index(role)

    @property
    def can_operate(self) -> bool:
        """May command devices and start or end runs."""
        return self.allows("operator")

    @property
    def is_admin(self) -> bool:
        """May break leases and end anyone's run."""
        return self.allows("admin")


def viewer_of(request: Request) -> Viewer:
    """The :class:`Viewer` of ``request``."""
    ctx: ServerContext = request.app.state.labd
    token = current_token(request)
    if token is not None:
        return Viewer(token.user, token.role, True)
    # Without tokens anyone who reaches the port may do everything (docs/security.md).
    return Viewer(None, "admin", ctx.settings.tokens is not None)


def _pretty(value: Any, limit: int = 4000) -> str:
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "\n… (truncated)"


def _short_time(iso: Any) -> str:
    if not isinstance(iso, str) or "T" not in iso:
        return "" if iso is None else str(iso)
    return iso.replace("T", " ").split(".")[0].removesuffix("Z").removesuffix("+00:00")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours or days)
    return " ".join([*parts, f"{minutes} min", f"{secs} s"])


def _percent(progress: Any) -> int | None:
    if not isinstance(progress, dict):
        return None
    done, total = progress.get("done"), progress.get("total")
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        return max(0, min(100, round(100 * done / total)))
    return None


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pretty=_pretty, short_time=_short_time, duration=_duration,
                       percent=_percent)
    env.globals["version"] = labd.__version__
    return env


_ENV = _environment()


def page(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """``template`` rendered with ``values``, the viewer and the navigation."""
    viewer = viewer_of(request)
    html = _ENV.get_template(template).render(
        request=request, viewer=viewer, path=request.url.path, **values)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
