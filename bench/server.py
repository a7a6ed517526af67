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
        """Pids of this server's worker processes for `job_id`, fresh or from its warm pool (read
        from /proc)."""
        from sllm.jobs.launcher import is_worker_of

        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            if self.proc and int(stat[1]) == self.proc.pid and is_worker_of(pid, job_id):
                pids.append(pid)
        return pids
