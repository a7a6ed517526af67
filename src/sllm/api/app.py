"""`create_app` builds the FastAPI app around a `Services` object; nothing happens at import."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sllm import __version__
from sllm.api.errors import install_error_handlers
from sllm.api.routes import fine_tuning, serving
from sllm.config import Settings
from sllm.services import Services


def _prewarm() -> None:
    """Import transformers/peft in the background so the first submit validates fast."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # validation will report the real problem
        pass


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or (services.settings if services else Settings())
    owned = services is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services or Services.build(settings)
        app.state.services = svc
        if owned:
            svc.start()
        threading.Thread(target=_prewarm, daemon=True).start()
        try:
            yield
        finally:
            if owned:
                svc.stop()

    app = FastAPI(title="sllm", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(fine_tuning.router)
    app.include_router(serving.router)

    @app.get("/health", tags=["server"])
    def health() -> dict:
        """Liveness probe."""
        return {"status": "ok", "version": __version__}

    return app
