"""`create_app` builds the FastAPI app around a `Services` object; nothing happens at import."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from sllm import __version__
from sllm.api.edge import OPEN_PATHS, EdgeMiddleware
from sllm.api.errors import drop_validation_422, error_responses, install_error_handlers
from sllm.api.routes import console, files, fine_tuning, openai_ft, resources, serving
from sllm.config import Settings
from sllm.metrics.collector import build_registry
from sllm.metrics.requests import MetricsMiddleware
from sllm.services import Services

WARM_UP_DEADLINE_S = 60.0
log = logging.getLogger(__name__)


def _prewarm() -> None:
    """Import transformers/peft (~3-5 s) and warm the backends before the server accepts
    requests, so that the first submission validates in milliseconds like every later one
    instead of waiting for them (3.1 s on the 2-core machine before this ran at startup).

    Then the garbage collector is told to leave everything alive so far alone (`gc.freeze`):
    those imports are about 370,000 long-lived objects, and a full collection walking them paused
    the whole server for 200-300 ms (measured on the 2-core machine), the worst latency any status
    poll saw.
    """
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from sllm.finetune.base import available_backends, get_backend

        for name in available_backends():
            warm_up = getattr(get_backend(name), "warm_up", None)
            if warm_up is not None:
                warm_up()
    except Exception:  # noqa: BLE001 - validation will report the real problem
        pass
    gc.freeze()


def _warm_up_in_background() -> asyncio.Future:
    """Run `_prewarm` in a daemon thread (a stuck one must not hold up the server's exit, as an
    executor thread would); the future completes when it is done."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def work() -> None:
        try:
            _prewarm()
        finally:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop closed meanwhile
                pass

    threading.Thread(target=work, name="sllm-warm-up", daemon=True).start()
    return done


def _document_errors(app: FastAPI) -> None:
    """The schema shows the errors the routes answer (see `error_responses`), not FastAPI's 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = drop_validation_422(build())
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or (services.settings if services else Settings())
    owned = services is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services or Services.build(settings)
        app.state.services = svc
        if owned:
            svc.start()
        # uvicorn listens once startup is done; a warm-up that hangs (a stuck driver query, a
        # slow network filesystem) delays listening by at most WARM_UP_DEADLINE_S.
        try:
            await asyncio.wait_for(_warm_up_in_background(), timeout=WARM_UP_DEADLINE_S)
        except asyncio.TimeoutError:
            log.warning(
                "warm-up still running after %.0f s; listening anyway (the first submission "
                "waits for it)",
                WARM_UP_DEADLINE_S,
            )
        try:
            yield
        finally:
            if owned:
                svc.stop()

    app = FastAPI(title="sllm", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_unauthenticated else set())
    app.add_middleware(
        EdgeMiddleware,
        api_keys=settings.api_keys,
        max_body_bytes=settings.max_body_bytes,
        streamed_paths=files.UPLOAD_PATHS,
        max_upload_bytes=settings.max_upload_bytes,
        open_paths=open_paths,
    )
    registry, request_metrics = build_registry(lambda: getattr(app.state, "services", None))
    app.state.metrics_registry = registry
    app.add_middleware(MetricsMiddleware, metrics=request_metrics)  # outermost: sees 401/413 too
    app.include_router(fine_tuning.router)
    app.include_router(serving.router)
    app.include_router(files.router)
    app.include_router(openai_ft.router)
    app.include_router(openai_ft.serving_mirror(serving.router))
    _document_errors(app)

    @app.get("/health", tags=["server"])
    def health() -> dict:
        """Liveness probe."""
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["server"], response_class=Response, responses=error_responses())
    def metrics(request: Request) -> Response:
        """Prometheus metrics (text exposition format): jobs, resources, requests, instances.
        Needs the API key like every route unless the server runs with
        `--metrics-unauthenticated`."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(request.app.state.metrics_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(resources.router)
    console.mount(app)  # `/` and /console/...: the web console
    return app
