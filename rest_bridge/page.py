"""The chat page at ``/``: static HTML, CSS and JS from ``rest_bridge/static``.

No build step and nothing from a CDN: the page talks to the bridge's own
public API (``/v1/models``, ``/v1/chat/completions`` streamed, ``/v1/embeddings``,
``/v1/status``) with the user's key, kept in the browser's localStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# Only our own files run: model text that slips into the DOM as markup
# still cannot execute (the page renders it as text in the first place).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=STATIC), name="static")


@router.get("/")
async def index() -> Response:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)
