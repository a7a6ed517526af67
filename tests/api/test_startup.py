"""Start-up: the server warms validation before it listens, but never hangs on it."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from sllm.api import app as app_module
from sllm.config import Settings


def test_a_hanging_warm_up_delays_listening_by_the_deadline_only(tmp_path, monkeypatch):
    release = threading.Event()
    calls = []

    def stuck() -> None:
        calls.append(time.monotonic())
        release.wait(30)

    monkeypatch.setattr(app_module, "_prewarm", stuck)
    monkeypatch.setattr(app_module, "WARM_UP_DEADLINE_S", 0.3)
    app = app_module.create_app(Settings(storage_path=tmp_path, num_cpus=1, num_gpus=0))
    started = time.monotonic()
    try:
        with TestClient(app) as client:
            waited = time.monotonic() - started
            assert client.get("/health").json()["status"] == "ok"
            assert calls and 0.3 <= waited < 10, waited
            release.set()  # let the warm-up end before the server's loop shuts down
    finally:
        release.set()


def test_start_up_runs_the_warm_up_before_serving(tmp_path, monkeypatch):
    done = []
    monkeypatch.setattr(app_module, "_prewarm", lambda: done.append(True))
    app = app_module.create_app(Settings(storage_path=tmp_path, num_cpus=1, num_gpus=0))
    with TestClient(app) as client:
        assert done == [True]  # before the first request could be served
        assert client.get("/health").status_code == 200
