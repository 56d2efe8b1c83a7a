"""The drift dashboard: three HTML pages over the JSON API, plus their static files.

The pages are one shell (``static/shell.html``) that names which view to run; the view
(plain ES modules under ``static/js/``) fetches ``/api/...``, draws its charts as SVG and
follows ``GET /api/events`` (server-sent events) so nothing needs a reload. All text coming
from devices is put in the page with ``textContent``, never parsed as HTML. No build step,
no CDN: everything the browser loads is served from ``fleet_server/static``.

    GET /                       fleet overview
    GET /devices/{device_id}    one device: hardware, telemetry, drift, deployment history
    GET /analyses/{analysis_id} one analysis: tolerances, calibration curves, QBC, what-if
    GET /static/{path}          the CSS and JS
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
VIEWS = ("overview", "device", "analysis")

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=len(VIEWS))
def page(view: str) -> str:
    """The shell HTML with ``data-view`` set to one of VIEWS. Raises ValueError for another view."""
    if view not in VIEWS:
        raise ValueError(f"unknown dashboard view {view!r}; use one of {VIEWS}")
    # view is one of our own constants, never request data, so plain substitution is safe
    return (STATIC / "shell.html").read_text(encoding="utf-8").replace("{{view}}", view)


def _html(view: str) -> HTMLResponse:
    return HTMLResponse(page(view), headers={"Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse)
def overview() -> HTMLResponse:
    """The fleet overview page."""
    return _html("overview")


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(device_id: str) -> HTMLResponse:
    """One device's page; the script reads the id from the URL (an unknown id shows the API's 404 message)."""
    return _html("device")


@router.get("/analyses/{analysis_id}", response_class=HTMLResponse)
def analysis_page(analysis_id: str) -> HTMLResponse:
    """One analysis's page (model, tolerances, curves, what-if)."""
    return _html("analysis")


class DashboardFiles(StaticFiles):
    """The framework's static files (path checks, ETags, ranges), told not to be kept unrevalidated.

    The pages and their scripts change together when the server is upgraded; "no-cache" makes a
    browser revalidate each file (a 304 when unchanged) instead of mixing old and new scripts.
    """

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def include(app: FastAPI) -> None:
    """Adds the dashboard's pages and its files under /static to ``app`` (a FastAPI app)."""
    app.include_router(router)
    app.mount("/static", DashboardFiles(directory=STATIC), name="static")
