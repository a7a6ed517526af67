"""When the current request's first token was generated, for the TTFT histogram.

The metrics middleware puts a `RequestTiming` in a context variable before it calls the app; the
serving path calls `mark_first_token()` when the first text event comes back from an instance.
A streaming response runs in a task that copies the request's context, so it marks the same
object. Outside a request (tests calling services directly) it does nothing.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start


current: ContextVar[RequestTiming | None] = ContextVar("sllm_request_timing", default=None)


def mark_first_token() -> None:
    """Record now as the first token's time of the current request (only the first call counts)."""
    timing = current.get()
    if timing is not None and timing.first_token is None:
        timing.first_token = time.perf_counter()
