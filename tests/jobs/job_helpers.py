"""Fakes and helpers shared by the job tests: a launcher whose workers are plain objects, so the
supervisor's decisions can be driven pass by pass."""

from __future__ import annotations


class FakeHandle:
    def __init__(self) -> None:
        self.pid = None
        self.host = "fake"
        self.rc: int | None = None
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.rc

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.rc = -9

    def log_tail(self, lines: int = 20) -> str:
        return "Traceback: boom"


class FakeLauncher:
    def __init__(self) -> None:
        self.handles: dict[str, FakeHandle] = {}
        self.order: list[str] = []

    def launch(self, job_id, alloc, on_exit):
        handle = FakeHandle()
        self.handles[job_id] = handle
        self.order.append(job_id)
        return handle


def add(store, priority=0, cpus=1, gpus=0, timeout=3600.0):
    return store.create(
        model="m",
        ft_backend="peft_lora",
        num_cpus=cpus,
        num_gpus=gpus,
        timeout=timeout,
        priority=priority,
        config={},
        backend_config={},
    ).id


def complete(store, launcher, job_id):
    store.set_result(job_id, "/adapter")
    launcher.handles[job_id].rc = 0
