"""Child processes that own a process group: spawn one, signal the whole group, stop it.

Job workers and inference instances (local or inside a Ray actor) are all started this way, so a
cancel, a timeout or a scale-down also reaches every child they made.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def spawn(cmd: list[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `cmd` in a new session, stdout and stderr appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the group led by `pid`; a group already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group, SIGKILL it (and any child left in it) after `grace` s, then reap."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
