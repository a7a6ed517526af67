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
- JSON hygiene: the body must parse as strict JSON (no `NaN`/`Infinity`, no float that overflows to
  infinity such as `1e999`, no integer beyond a signed 64-bit one), nested at most `MAX_DEPTH`
  deep, with no unpaired UTF-16 surrogate and no NUL in any string, no control character in any
  key, and keys at most `MAX_KEY_CHARS` long. Such a
  value could not be stored, serialised back or used: it is a 400 naming where it was found,
  instead of a job whose every later read answers 500.

The routes then parse the same bytes again with pydantic; the extra parse of a body of a few KiB
costs microseconds.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sllm import console
from sllm.api.errors import error_body, send_json
from sllm.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from sllm.jobs.models import INT64_MAX

MAX_DEPTH = 64
MAX_KEY_CHARS = 256
UPLOAD_FRAMING_BYTES = 64 * 1024  # multipart boundaries, part headers and the small fields
INT64_MIN = -INT64_MAX - 1
log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health", *console.STATIC_PATHS})  # liveness probes, the console shell

# In any string: NUL (no C API, path or tokenizer takes it) and unpaired surrogates (no UTF-8
# encoder does). In keys (names of fields and columns) every control character but none of
# tab/newline/CR either. Other control characters in values (a form feed in source code, an ANSI
# escape in a chat) are stored and serialised back escaped; names and paths refuse them in their
# own field checks (`sllm.paths.check_path_text`, `sllm.serve.fields`).
_BAD_CHAR = re.compile(r"[\x00\ud800-\udfff]")
_BAD_KEY_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BadJSON(ValueError):
    """The body is not JSON sllm can store and answer with; `param` says where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Refused:
    """A number the parser met that sllm refuses; the walk reports it with where it was."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse_constant(name: str) -> _Refused:
    return _Refused(f"`{name}` is not a number JSON allows; send a finite number")


def _finite_float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"the number {text[:40]} is too large; send a finite number")
    return value


def _int64(text: str) -> int | _Refused:
    if len(text.lstrip("-")) > 19 or not INT64_MIN <= int(text) <= INT64_MAX:
        shown = text if len(text) <= 40 else text[:40] + "..."
        return _Refused(f"the integer {shown} does not fit in 64 bits")
    return int(text)


def parse_json(raw: bytes) -> Any:
    """Strict JSON: raises `BadJSON` for what sllm cannot store or echo back."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"The body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_int64,
        )
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"The body is nested too deeply (at most {MAX_DEPTH} levels).") from None
    except ValueError as exc:
        raise BadJSON(f"Malformed JSON body: {exc}.") from None
    check_value(value)
    return value


def _where(path: list[str]) -> str | None:
    return ".".join(path) or None


def _check_string(s: str, path: list[str], what: str, pattern: re.Pattern = _BAD_CHAR) -> None:
    bad = pattern.search(s)
    if bad is None:
        return
    char = bad.group()
    kind = (
        "an unpaired UTF-16 surrogate"
        if "\ud800" <= char <= "\udfff"
        else f"the control character U+{ord(char):04X}"
    )
    where = _where(path)
    raise BadJSON(
        f"{what} {'at `' + where + '` ' if where else ''}contains {kind} (position "
        f"{bad.start()}); remove it.",
        where,
    )


def check_value(value: Any) -> None:
    """Walk a parsed body (iteratively: depth is bounded, not the stack)."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BadJSON(f"The body is nested too deeply (at most {MAX_DEPTH} levels).")
        if isinstance(item, _Refused):
            where = _where(path)
            at = f"`{where}`: " if where else ""
            raise BadJSON(f"{at}{item.reason}.", where)
        if isinstance(item, str):
            _check_string(item, path, "The string")
        elif isinstance(item, dict):
            for key, child in item.items():
                if len(key) > MAX_KEY_CHARS:
                    raise BadJSON(
                        f"A key at `{_where(path) or '(top level)'}` is {len(key)} characters "
                        f"long; keys are at most {MAX_KEY_CHARS}.",
                        _where(path),
                    )
                _check_string(key, [*path, "(key)"], "A key", _BAD_KEY_CHAR)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, str(i)]) for i, child in enumerate(item))


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
            await send_json(send, status, error_body(message, type_, param, status))
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
            await send_json(send, 500, error_body(message, "internal_error", None, 500))

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
            await send_json(
                send,
                400,
                error_body(
                    "The Content-Length header is not a number.", "invalid_request_error", None, 400
                ),
            )
            return
        if too_big:
            message = (
                f"The upload is larger than the server's limit of {self.max_upload_bytes} bytes "
                "(`sllm start --max-upload-bytes`)."
            )
            await send_json(send, 413, error_body(message, "request_too_large", "file", 413))
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
        body = error_body(message, "invalid_request_error", None, 401)
        body["error"]["code"] = "invalid_api_key"  # OpenAI's code for both cases
        return body

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
