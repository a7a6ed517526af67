"""A real `sllm start` server in a subprocess on a loopback port, for the server benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    def __init__(self, storage: Path, *args: str) -> None:
        self.storage = storage
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = storage / f"server-{self.port}.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BenchServer:
        cmd = [sys.executable, "-m", "sllm.cli.main", "start", "--port", str(self.port)]
        cmd += ["--storage-path", str(self.storage), "--log-level", "warning", *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
                try:
                    if client.get("/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def worker_pids(self, job_id: str) -> list[int]:
        """Pids of this server's worker processes for `job_id` (read from /proc)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent = int(stat[1])
            if b"sllm.jobs.worker" in cmdline and job_id.encode() in cmdline:
                if self.proc and parent == self.proc.pid:
                    pids.append(int(entry.name))
        return pids
