"""A real `sllm start` server in a subprocess on a loopback port, for the server benchmarks."""

from __future__ import annotations

from pathlib import Path

from sllm.testing import LocalServer

ROOT = Path(__file__).resolve().parents[1]


class BenchServer(LocalServer):
    """The shared `LocalServer`, run from the repo root, plus a look at its worker processes."""

    def __init__(self, storage: Path, *args: str) -> None:
        super().__init__(storage, *args, cwd=ROOT)

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
