"""The server's edge: API keys, the body size limit and JSON hygiene, checked once for every route.

A pure ASGI middleware, so nothing a client sends reaches a route (or the job store) before it has
passed these checks:

- API keys: with keys configured, every route but `/health` and the console's static files
  (`sllm.console.STATIC_PATHS`: the page and its scripts, no data) needs
  `Authorization: Bearer KEY` (compared in constant time); a missing or wrong key is OpenAI's
  401 `invalid_api_key`, so the OpenAI SDK's `api_key` just works.
- Body size: a body over `max_body_bytes` is a 413 before it is read further (by its
  `Content-Length`, or as it streams in); nothing is stored.
- Uploads: a `multipart/form-data` POST to one of `streamed_paths` (the Files API) is passed on
  unread, for the route to stream to disk; its limit is `max_upload_bytes` (checked here against
  `Content-Length`, and by the file store as the bytes arrive), not `max_body_bytes`.
- JSON hygiene: the body must parse as strict JSON (`sllm.strictjson`, which the file store
  applies to every uploaded line too: no `NaN`/`Infinity`, no overflowing number, bounded
  nesting, no NUL or unpaired surrogate). Such a value could not be stored, serialised back or
  used: it is a 400 naming where it was found, instead of a job whose every later read answers
  500.

The routes then parse the same bytes again with pydantic; the extra parse of a body of a few KiB
costs microseconds.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sllm import console
from sllm.api.errors import error_body, send_json
from sllm.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from sllm.strictjson import BadJSON, parse_json

UPLOAD_FRAMING_BYTES = 64 * 1024  # multipart boundaries, part headers and the small fields
log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health", *console.STATIC_PATHS})  # liveness probes, the console shell

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def key_matches(given: bytes, keys: Iterable[bytes]) -> bool:
    """Constant-time compare against every key (no early exit that times which one matched)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


class EdgeMiddleware:
    """See the module docstring. `api_keys` empty: no authentication (loopback default)."""

    def __init__(
        self,
        app: Callable,
        *,
        api_keys: Iterable[str] = (),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        streamed_paths: Iterable[str] = (),
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        open_paths: Iterable[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.max_body_bytes = max_body_bytes
        self.streamed_paths = frozenset(streamed_paths)
        self.max_upload_bytes = max_upload_bytes
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.keys and scope["path"] not in self.open_paths and not self._authorised(scope):
            await send_json(
                send, 401, self._unauthorised_body(scope), {"WWW-Authenticate": "Bearer"}
            )
            return
        if (
            scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")
            and not _header(scope, b"content-length")
            and not _header(scope, b"transfer-encoding")
        ):
            await self._guarded(scope, receive, send)
            return
        if self._is_upload(scope):
            await self._upload(scope, receive, send)
            return
        body, problem = await self._read_body(scope, receive)
        if problem is not None:
            status, message, param = problem
            type_ = "request_too_large" if status == 413 else "invalid_request_error"
            body = error_body(message, type_, param, status, scope["path"])
            await send_json(send, status, body)
            return
        await self._guarded(scope, _replay(body, receive), send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An unexpected error (there should be none) still gets a complete 500 answer, and the
        keep-alive connection stays usable; one that strikes mid-stream closes it instead, the
        only clean way left to end a half-sent answer."""
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            message = f"Internal server error ({type(exc).__name__}); the server log has details."
            body = error_body(message, "internal_error", None, 500, scope["path"])
            await send_json(send, 500, body)

    def _is_upload(self, scope: Scope) -> bool:
        ctype = (_header(scope, b"content-type") or b"").lower()
        return (
            scope["method"] == "POST"
            and scope["path"] in self.streamed_paths
            and ctype.startswith(b"multipart/form-data")
        )

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Streamed to the route unread; only a declared length over the limit stops it here
        (the multipart framing gets `UPLOAD_FRAMING_BYTES` on top of the file's own limit)."""
        declared = _header(scope, b"content-length")
        try:
            too_big = declared is not None and int(declared) > (
                self.max_upload_bytes + UPLOAD_FRAMING_BYTES
            )
        except ValueError:
            message = "The Content-Length header is not a number."
            body = error_body(message, "invalid_request_error", None, 400, scope["path"])
            await send_json(send, 400, body)
            return
        if too_big:
            message = (
                f"The upload is larger than the server's limit of {self.max_upload_bytes} bytes "
                "(`sllm start --max-upload-bytes`)."
            )
            body = error_body(message, "request_too_large", "file", 413, scope["path"])
            await send_json(send, 413, body)
            return
        await self._guarded(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and key_matches(token.strip(), self.keys)

    @staticmethod
    def _unauthorised_body(scope: Scope) -> dict:
        given = _header(scope, b"authorization")
        message = (
            "Incorrect API key provided. Send `Authorization: Bearer <key>` with a key the "
            "server was started with."
            if given
            else "You didn't provide an API key. Send `Authorization: Bearer <key>` (the OpenAI "
            "SDK's `api_key`; `SLLM_API_KEY` for the sllm CLI)."
        )
        # OpenAI's code for both cases, on every path (see `sllm.api.errors.error_code`)
        path = scope["path"]
        return error_body(message, "invalid_request_error", None, 401, path, "invalid_api_key")

    async def _read_body(
        self, scope: Scope, receive: Receive
    ) -> tuple[bytes, tuple[int, str, str | None] | None]:
        limit = self.max_body_bytes
        too_large = (
            413,
            f"The request body is larger than the server's limit of {limit} bytes "
            "(`sllm start --max-body-bytes`).",
            None,
        )
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return b"", too_large
            except ValueError:
                return b"", (400, "The Content-Length header is not a number.", None)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope):
            try:
                parse_json(body)
            except BadJSON as exc:
                return body, (400, exc.message, exc.param)
        return body, None


def _is_json(scope: Scope) -> bool:
    """FastAPI parses a body as JSON when it says so, or says nothing."""
    ctype = (_header(scope, b"content-type") or b"").decode("latin-1").lower()
    return not ctype or "json" in ctype


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: a disconnect, for streaming responses

    return replay
