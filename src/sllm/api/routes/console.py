"""The console's shell: `/` answers its page and `/console/...` its scripts and styles.

They hold no data, so the edge lets them through without an API key (`edge.OPEN_PREFIXES`); every
call the page then makes goes to the `/v1` routes with the key.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from sllm.console import STATIC_DIR

router = APIRouter(include_in_schema=False)
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so an upgraded server's console shows


@router.get("/")
def console_page() -> FileResponse:
    """The console (a single page; the `#/...` fragment picks the view)."""
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=STATIC_DIR), name="console")
