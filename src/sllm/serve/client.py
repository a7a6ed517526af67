"""How the server talks to its instances over loopback HTTP (see instance.py for the API)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from sllm.errors import InvalidRequestError, NotFoundError, OverloadedError, SllmError
from sllm.metrics.timing import mark_first_token
from sllm.serve.errors import InstanceError


def error_from_instance(status: int, body: bytes) -> SllmError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if status == 400:
        return InvalidRequestError(message)
    if status == 404:
        return NotFoundError(message, param="lora_adapter_name")
    return InstanceError(f"The instance answered {status}: {message}")


def unreachable(exc: Exception) -> OverloadedError:
    return OverloadedError(
        f"The model instance stopped answering ({type(exc).__name__}); retry to start another.",
        retry_after=1,
    )


class GenerationStream:
    """Events of one generation: `start` is already read; iterate for the rest; always close."""

    def __init__(self, response: httpx.Response, start: dict, on_close: Callable[[], None]):
        self._response = response
        self._lines = response.aiter_lines()
        self.start = start
        self._on_close = on_close
        self._closed = False

    @classmethod
    async def open(
        cls,
        client: httpx.AsyncClient,
        url: str,
        payload: dict,
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> GenerationStream:
        request = client.build_request("POST", f"{url}/generate", json=payload, headers=headers)
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise unreachable(exc) from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise error_from_instance(response.status_code, body)
        stream = cls(response, {}, on_close)
        try:
            stream.start = await stream._next()
        except BaseException:
            await stream.aclose()
            raise
        if stream.start.get("type") != "start":
            await stream.aclose()
            raise InstanceError(f"Unexpected first event from the instance: {stream.start}")
        return stream

    async def _next(self) -> dict[str, Any]:
        try:
            while True:
                line = await self._lines.__anext__()
                if line.strip():
                    return json.loads(line)
        except StopAsyncIteration:
            return {"type": "error", "message": "The instance closed the stream early."}
        except httpx.TransportError as exc:
            return {"type": "error", "message": str(unreachable(exc))}

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The remaining events, ending with `done` or `error`; closes the stream at the end."""
        try:
            while True:
                event = await self._next()
                if event.get("type") == "text":
                    mark_first_token()  # TTFT of the request this runs for (see sllm.metrics)
                yield event
                if event.get("type") in ("done", "error"):
                    return
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._response.aclose()
        finally:
            self._on_close()


def control(client: httpx.Client, method: str, url: str, **kwargs: Any) -> dict:
    """A control call (adapters, health); raises the instance's error as an `SllmError`."""
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        raise unreachable(exc) from exc
    if response.status_code != 200:
        raise error_from_instance(response.status_code, response.content)
    return response.json()
