"""The one place where service errors and request-parsing errors become HTTP responses.

Bodies follow OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. What `code`
holds depends on the surface the request came in on (`error_code` decides it, nowhere else):

- `/v1/...` (the seed's surface), the console, `/metrics`, instances: the HTTP status number, as
  the seed always answered. The one exception is the API-key check's `invalid_api_key`, which the
  edge answers on every path alike (it runs before any route).
- `/openai/v1/...`: OpenAI's string code (the openai SDK's `exc.code`), or null where OpenAI
  sends none:

  | status | code                                                                              |
  |--------|-----------------------------------------------------------------------------------|
  | 400    | from a request that fails the wire models: `unknown_parameter`,                   |
  |        | `missing_required_parameter`, `invalid_type` or `invalid_value`; otherwise null   |
  | 401    | `invalid_api_key`                                                                 |
  | 404    | `fine_tune_not_found` (`/fine_tuning/...`), `file_not_found` (`/files/...`),      |
  |        | `model_not_found` (`/models/...`, `/chat/completions`, `/completions`); else null  |
  | 409    | `conflict` (e.g. pausing a cancelled job, deleting a file a job uses)             |
  | 413    | `file_too_large` (`/files` uploads), else `request_too_large`                     |
  | 429    | `rate_limit_exceeded`                                                             |
  | 503    | `server_overloaded`                                                               |
  | 500    | null (OpenAI's `server_error` type says it all)                                   |

  The `type` of a 404 there is `invalid_request_error`, as OpenAI sends it (`/v1` keeps
  `not_found_error`).
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


OPENAI_PREFIX = "/openai/"
EVERY_SURFACE_CODES = frozenset({"invalid_api_key"})  # strings the seed's surface answers too
_OPENAI_BY_STATUS: dict[int, str] = {
    401: "invalid_api_key",
    409: "conflict",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "server_overloaded",
}
_NOT_FOUND_BY_PATH = (  # first match wins: `/openai/v1/<resource>...`
    ("/openai/v1/fine_tuning/", "fine_tune_not_found"),
    ("/openai/v1/files", "file_not_found"),
    ("/openai/v1/models", "model_not_found"),
    ("/openai/v1/chat/completions", "model_not_found"),
    ("/openai/v1/completions", "model_not_found"),
)
_VALIDATION_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
}


def error_code(status: int, path: str | None, hint: str | None = None) -> int | str | None:
    """The `code` of an error body (see the table in the module docstring). `path` is the
    request's path (None where there is none, e.g. an instance's own 401); `hint` a more
    specific OpenAI code the caller knows (a validation error's kind)."""
    if hint in EVERY_SURFACE_CODES:
        return hint
    if path is None or not path.startswith(OPENAI_PREFIX):
        return status
    if hint is not None:
        return hint
    if status == 404:
        return next((code for prefix, code in _NOT_FOUND_BY_PATH if path.startswith(prefix)), None)
    if status == 413 and path.startswith("/openai/v1/files"):
        return "file_too_large"
    return _OPENAI_BY_STATUS.get(status)


def error_body(
    message: str,
    type_: str,
    param: str | None,
    status: int,
    path: str | None = None,
    hint: str | None = None,
) -> dict:
    """The one builder of error bodies; `code` comes from `error_code(status, path, hint)`."""
    code = error_code(status, path, hint)
    if type_ == "not_found_error" and path is not None and path.startswith(OPENAI_PREFIX):
        type_ = "invalid_request_error"  # OpenAI's type for a missing job, file or model
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_hint(exc: RequestValidationError) -> str | None:
    """OpenAI's code for the first problem pydantic found (None for malformed JSON)."""
    err = exc.errors()[0] if exc.errors() else {}
    kind = str(err.get("type", ""))
    if kind == "json_invalid":
        return None
    if kind in _VALIDATION_CODES:
        return _VALIDATION_CODES[kind]
    return "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"


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
    async def _sllm_error(request: Request, exc: SllmError) -> JSONResponse:
        headers = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param, exc.status_code, request.url.path),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        body = error_body(
            message, "invalid_request_error", param, 400, request.url.path, _validation_hint(exc)
        )
        return JSONResponse(body, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, exc.status_code, request.url.path),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        message = f"Internal server error: {type(exc).__name__}"
        return JSONResponse(
            error_body(message, "internal_error", None, 500, request.url.path),
            status_code=500,
        )
