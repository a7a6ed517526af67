"""HTTP request metrics: a pure ASGI middleware outside the edge, so refused requests (401, 413,
400) are counted too.

Requests are labelled by route template (`/v1/fine_tuning/jobs/{fine_tuning_job_id}`), never by
raw path, so ids do not multiply series; a path no route matches is `unmatched`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Match

from sllm.metrics import timing

Scope = dict[str, Any]
Message = dict[str, Any]
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
UNMATCHED = "unmatched"


class RequestMetrics:
    """The request counter and histograms of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sllm_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "sllm_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream's last byte).",
            ["method", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "sllm_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first generated token (cold start "
            "and queueing included), streaming or not.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )

        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # children, looked up once

    def observe(self, method: str, route: str, code: int, t: timing.RequestTiming) -> None:
        series = self._series.get((method, route, code))
        if series is None:
            series = (
                self.requests.labels(method, route, str(code)),
                self.duration.labels(method, route),
            )
            self._series[(method, route, code)] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - t.start)
        ttft = t.ttft()
        if ttft is not None:  # only generation marks a first token (whatever path it is under)
            self.ttft.labels(route).observe(ttft)


def route_template(scope: Scope) -> str:
    """The template of the route that handled (or would handle) this request."""
    route = scope.get("route")
    if route is None:  # answered before routing (the edge refused it): match it ourselves
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    if route is None:
        return UNMATCHED
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED


class MetricsMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], *, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = timing.RequestTiming()
        token = timing.current.set(t)
        code = 500  # what the client gets if the app dies before it answers

        async def send_and_note(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            timing.current.reset(token)
            self.metrics.observe(scope["method"], route_template(scope), code, t)
