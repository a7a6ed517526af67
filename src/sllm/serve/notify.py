"""Wake asyncio tasks from any thread: "something changed, look again".

A waiter is registered *before* the caller inspects the state it waits on, so a change that
happens in between still wakes it (no lost wake-ups).
"""

from __future__ import annotations

import asyncio
import threading


class Waiter:
    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future = self._loop.create_future()

    def _wake(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wake_threadsafe(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed
            pass

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._future, timeout=max(0.0, timeout))
        except asyncio.TimeoutError:
            pass
        finally:
            self._notifier.discard(self)


class Notifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[Waiter] = set()

    def waiter(self) -> Waiter:
        """Call inside a coroutine, before checking the state."""
        w = Waiter(self)
        with self._lock:
            self._waiters.add(w)
        return w

    def discard(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)

    def notify_all(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, set()
        for w in waiters:
            w.wake_threadsafe()
