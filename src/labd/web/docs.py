"""``/docs`` (and ``/redoc``): Swagger UI from the local swagger-ui-dist, never a CDN.

FastAPI's own pages load Swagger UI and ReDoc from jsDelivr, which a lab network often
cannot reach. These serve the copy built from npm under ``/ui/static/vendor/``, started by a
local script (the page has no inline script, so the Content-Security-Policy can forbid them).
ReDoc is not bundled: ``/redoc`` serves the same Swagger UI, so old links keep working.
"""

from __future__ import annotations

from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from labd.web.render import SECURITY_HEADERS, page

__all__ = ["oauth2_redirect", "swagger_ui"]


async def swagger_ui(request: Request) -> Response:
    """Swagger UI for this server's ``/openapi.json``, from local files."""
    return page(request, "docs.html", title="API docs")


async def oauth2_redirect(request: Request) -> Response:
    """Swagger UI's OAuth2 redirect helper (FastAPI's page: one inline script, no assets)."""
    html: HTMLResponse = get_swagger_ui_oauth2_redirect_html()
    headers = {k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"}
    return HTMLResponse(html.body, headers=headers)
