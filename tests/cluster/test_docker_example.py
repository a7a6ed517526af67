"""examples/docker, checked as far as this machine allows: no Docker engine (and no compose
plugin) runs here, so the compose file is parsed and its structure checked, the Dockerfile's
inputs are checked against the repository, and the entry point is run for its argument checks."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "examples" / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def env_of(service: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in service["environment"])


def test_head_serves_the_api_on_8343_and_mounts_the_model_folder(compose):
    head = compose["services"]["sllm_head"]
    assert head["ports"] == ["8343:8343"]  # Ray's ports stay on the compose network
    assert env_of(head)["MODE"] == "HEAD" and env_of(head)["STORAGE_PATH"] == "/models"
    assert "8343/health" in " ".join(head["healthcheck"]["test"])  # /health needs no key


def test_the_head_requires_an_api_key(compose):
    """The head binds 0.0.0.0, which `sllm start` refuses without a key: compose insists on one."""
    head = compose["services"]["sllm_head"]
    assert env_of(head)["SLLM_API_KEY"].startswith("${SLLM_API_KEY:?")
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert "--host 0.0.0.0" in entry and "--allow-unauthenticated" not in entry


def test_workers_are_gpu_ray_nodes_of_the_head(compose):
    workers = {k: v for k, v in compose["services"].items() if k.startswith("sllm_worker_")}
    assert "sllm_worker_0" in workers and "profiles" not in workers["sllm_worker_0"]
    gpus = []
    for svc in workers.values():
        env = env_of(svc)
        assert env["MODE"] == "WORKER" and env["RAY_HEAD_ADDRESS"] == "sllm_head:6379"
        assert svc["depends_on"]["sllm_head"]["condition"] == "service_healthy"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        assert "ports" not in svc
    assert len(gpus) == len(set(gpus))  # no GPU given to two workers


def test_every_node_runs_the_same_image_and_mounts_the_same_store(compose):
    for name, svc in compose["services"].items():
        assert svc["image"] == "sllm:latest", name
        assert svc["networks"] == ["sllm_network"], name
        (volume,) = svc["volumes"]
        assert re.fullmatch(r"\$\{MODEL_FOLDER:\?[^}]+\}:/models", volume), volume
        build = svc["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert "sllm_network" in compose["networks"]


def test_the_dockerfile_copies_what_exists_and_installs_the_ray_extra():
    text = (DOCKER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'pip install ".[ray]"' in text and re.search(r"^ray = \[", pyproject, re.M)
    assert 'ENTRYPOINT ["tini", "--", "sllm-entrypoint"]' in text


def test_the_entrypoint_parses_and_refuses_an_unknown_mode():
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(
        ["bash", str(script)], env={**os.environ, "MODE": "BOTH"}, capture_output=True, text=True
    )
    assert out.returncode == 2 and "MODE must be HEAD or WORKER" in out.stderr
