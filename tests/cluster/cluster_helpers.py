"""A real Ray cluster of several nodes on loopback, for the cluster tests.

Each node is one `ray start` in its own session, so a node is stopped (or "dies") by signalling
its process group, and teardown stops exactly what was started here, nothing else on the
machine. Nodes get distinct custom resources (`head`, `node_b`) so tests can tell them apart;
the node id is read from the raylet's command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

HERE = Path(__file__).parent
# Fast failure detection: a dead node is noticed in about 2 s instead of about 15 s.
HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


class LocalRayCluster:
    def __init__(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sllm-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **HEALTH,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ADDRESS": "",
            # Without it, a token left in ~/.ray/auth_token (any local `ray.init()` writes one)
            # turns token auth on for some of the cluster's processes and not for others.
            "RAY_AUTH_MODE": "disabled",
        }
        self.groups: dict[str, int] = {}  # node name -> process group
        self.node_ids: dict[str, str] = {}

    def _ray_start(self, name: str, args: list[str]) -> None:
        common = [
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            "--object-store-memory=100000000",
        ]
        cmd = [sys.executable, str(HERE / "ray_loopback.py"), "start", *common, *args]
        log = open(self.temp_dir / f"start-{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.groups[name] = proc.pid
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start {name} failed: {self.log(name)}")
        self.node_ids[name] = self._node_id(name)

    def log(self, name: str) -> str:
        return (self.temp_dir / f"start-{name}.log").read_text()[-3000:]

    def _node_id(self, name: str) -> str:
        for pid in group_pids(self.groups[name]):
            args = cmdline(pid)
            if args and args[0].endswith("/raylet"):
                for arg in args:
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
        raise RuntimeError(f"no raylet found for node {name}")

    def start_head(self, cpus: int = 1) -> None:
        self._ray_start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps({'head': 1})}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
            ],
        )

    def add_node(self, name: str, cpus: int) -> None:
        self._ray_start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps({name: 1})}",
            ],
        )
        self.wait_nodes(len(self.groups))

    def wait_nodes(self, count: int, timeout: float = 60) -> None:
        """Until the cluster reports `count` live nodes (asked by a short-lived driver)."""
        script = (
            "import sys, time, ray\n"
            f"ray.init(address={self.address!r}, logging_level='error')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while time.monotonic() < deadline:\n"
            "    if sum(n['Alive'] for n in ray.nodes()) == int(sys.argv[1]): sys.exit(0)\n"
            "    time.sleep(0.2)\n"
            "sys.exit(1)\n"
        )
        cmd = [sys.executable, "-c", script, str(count)]
        if subprocess.run(cmd, env=self.env, timeout=timeout + 30).returncode != 0:
            raise RuntimeError(f"the cluster never had {count} live nodes")

    def stop_node(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Signal every process of the node's group and wait until they are gone."""
        pgid = self.groups.pop(name)
        self.node_ids.pop(name, None)
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_pids(pgid):
            os.killpg(pgid, signal.SIGKILL)

    def stop(self) -> None:
        for name in [n for n in self.groups if n != "head"] + ["head"]:
            if name in self.groups:
                self.stop_node(name, signal.SIGTERM, timeout=3)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        return [p for g in self.groups.values() for p in group_pids(g)]


def raylet_node_of(pid: int) -> str | None:
    """The node id of the raylet that `pid` descends from (Ray's own view of where it runs)."""
    while pid > 1:
        args = cmdline(pid)
        if args and args[0].endswith("/raylet"):
            return next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), None)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        pid = int(stat.rsplit(")", 1)[-1].split()[1])
    return None
