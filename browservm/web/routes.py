"""The pages users open: the viewer (``/view/{session_id}?token=…``), the operator dashboard (``/``) and the
static files they load (``/static``, including the vendored noVNC under ``/static/vendor/novnc``).

Pages are plain HTML with ``$name`` placeholders (:class:`string.Template`), filled with escaped values:
no template engine, no build step.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from browservm.controller.auth import verify_viewer_token
from browservm.controller.errors import ApiError

WEB_DIR = Path(__file__).parent
STATIC_DIR = WEB_DIR / "static"
TEMPLATES_DIR = WEB_DIR / "templates"
NOVNC_DIR = STATIC_DIR / "vendor" / "novnc"

router = APIRouter(include_in_schema=False)


@cache
def _template(name: str) -> Template:
    return Template((TEMPLATES_DIR / name).read_text())


def _page(name: str, status: int = 200, headers: dict[str, str] | None = None, **values: str) -> HTMLResponse:
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    body = _template(name).substitute(static="/static", **escaped)
    return HTMLResponse(body, status, headers=headers)


def _security_headers(frame_ancestors: str) -> dict[str, str]:
    return {
        # The viewer needs its own scripts, fetch/WebSocket to this origin and blob/media for video.
        "Content-Security-Policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
            f"frame-ancestors {frame_ancestors}"
        ),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


@router.get("/view/{session_id}", response_class=HTMLResponse)
async def viewer_page(
    session_id: str,
    request: Request,
    token: Annotated[str, Query(description="the session's viewer token")] = "",
) -> HTMLResponse:
    """The viewer. A token in the link is checked before the page is served (a wrong one gets a refusal
    page and no script); without one, as after a reload, the page looks for the token it kept in the
    tab's sessionStorage and says so when there is none. The page itself holds no secret."""
    services = request.app.state.services
    headers = _security_headers(services.settings.viewer_frame_ancestors)
    if token:
        try:
            verify_viewer_token(services.secret, token, session_id)
        except ApiError as exc:
            return _page("refused.html", exc.status, headers, message=exc.message)
    return _page("viewer.html", headers=headers, session_id=session_id)


@router.get("/", response_class=HTMLResponse)
async def dashboard_page() -> HTMLResponse:
    headers = _security_headers("'none'")
    return _page("dashboard.html", headers=headers)


class PublicStaticFiles(StaticFiles):
    """Static files any origin may load: ``embed.js`` is a module script on the operator's own pages,
    and browsers fetch cross-origin module scripts in CORS mode."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response


def mount(app: FastAPI) -> None:
    """Add the pages and ``/static`` to the controller's app."""
    app.include_router(router)
    app.mount("/static", PublicStaticFiles(directory=STATIC_DIR), name="static")
