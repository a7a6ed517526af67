"""Without `--ray-address` nothing about Ray is imported or started (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from sllm.config import Settings
from sllm.services import Services

services = Services.build(Settings(storage_path=sys.argv[1], num_cpus=1))
services.start()
services.stop()
assert type(services.supervisor.launcher).__name__ == "LocalLauncher"
assert services.cluster is None
leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "sllm.cluster")))
print(leaked)
sys.exit(1 if leaked else 0)
"""


def test_the_embedded_default_never_imports_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
