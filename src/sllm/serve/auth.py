"""The per-instance secret: only the server that started an instance may drive it.

An instance listens on a loopback (or, on a Ray cluster, a node-local) port that any local user
can reach, so the server generates a secret per instance (`new_secret`), hands it over in the
instance's environment (never on the command line, which `ps` shows to everyone; a process's
environment is readable only by its own user), and sends it as `Authorization: Bearer ...` on
every call. The instance refuses any request without it with an OpenAI-shaped 401, comparing in
constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Any

from sllm.api.errors import error_body, send_json

SECRET_ENV = "SLLM_INSTANCE_SECRET"
MIN_SECRET_CHARS = 32


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def auth_headers(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def take_secret_from_env() -> str:
    """The secret the server passed; removed from this process's environment so that nothing
    it might start inherits it. Raises `SystemExit` when it is missing or too short."""
    secret = os.environ.pop(SECRET_ENV, "")
    if len(secret) < MIN_SECRET_CHARS:
        raise SystemExit(
            f"sllm instance: ${SECRET_ENV} is missing or shorter than {MIN_SECRET_CHARS} "
            "characters; instances are started by `sllm start`, which sets it."
        )
    return secret


def secret_of(pid: int) -> str:
    """The secret of the local instance `pid`, read from its initial environment, as only its
    own user (and root) can: for the benchmarks and tests that call an instance directly."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    prefix = SECRET_ENV.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode()
    raise LookupError(f"process {pid} has no ${SECRET_ENV}: it is not an sllm instance")


def instance_headers(pid: int) -> dict[str, str]:
    return auth_headers(secret_of(pid))


class RequireSecret:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <secret>`."""

    def __init__(self, app: Any, secret: str) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the instance secret must have at least {MIN_SECRET_CHARS} chars")
        self.app = app
        self._expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            await _unauthorized(send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self._expected)


async def _unauthorized(send: Any) -> None:
    message = (
        "This port belongs to an sllm instance; only its server may call it (send the "
        "instance's secret as `Authorization: Bearer ...`)."
    )
    body = error_body(message, "authentication_error", None, 401)
    await send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})
