"""The one place where service errors and request-parsing errors become HTTP responses.

Bodies follow OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from sllm.errors import OverloadedError, SllmError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's `{"error": {...}}`."""

    error: ErrorDetail


_MEANING = {
    400: "Invalid request: the message names the field and how to fix it.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "Unknown job, model, deployment or adapter.",
    409: "The request clashes with the object's current state.",
    413: "The request body is larger than the server's limit.",
    429: "Too many requests already wait for this deployment; retry after `Retry-After`.",
    503: "No capacity right now (retry after `Retry-After`), or the model's instance could not "
    "start.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the error codes it really answers, with the error model.
    Every route may answer 401 (when the server has API keys) and 400 (a malformed request)."""
    wanted = sorted({400, 401, *codes})
    return {c: {"model": ErrorResponse, "description": _MEANING[c]} for c in wanted}


def drop_validation_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 for every route with parameters; sllm answers 400 instead."""
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """Answer from a pure ASGI middleware (before any route): a complete JSON response."""
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def error_body(message: str, type_: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0] if exc.errors() else {}
    if err.get("type") == "json_invalid":
        return f"Malformed JSON body: {err.get('ctx', {}).get('error', 'cannot parse')}.", None
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "missing" and not loc:
        return "A JSON object body is required.", None
    return (f"`{param}`: {msg}." if param else f"{msg}."), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SllmError)
    async def _sllm_error(_: Request, exc: SllmError) -> JSONResponse:
        headers = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param, exc.status_code),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, exc.status_code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(
            error_body(f"Internal server error: {type(exc).__name__}", "internal_error", None, 500),
            status_code=500,
        )
