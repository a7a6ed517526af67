"""`sllm-store` as a user runs it: a subprocess, exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sllm.store import has_model, read_manifest


def run_cli(*args: str, env: dict | None = None, timeout: float = 120):
    full_env = {**os.environ, **(env or {})}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "sllm.cli.store", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    out.elapsed = time.monotonic() - started
    return out


def assert_user_error(out, *fragments: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr


def test_save_list_delete(tmp_path, tiny_model_src):
    storage = tmp_path / "store"
    out = run_cli(
        "save",
        "--model",
        "facebook/opt-tiny",
        "--backend",
        "transformers",
        "--local-model-path",
        str(tiny_model_src),
        env={"STORAGE_PATH": str(storage)},  # the storage path from the environment
    )
    assert out.returncode == 0, out.stderr
    path = (storage / "transformers" / "facebook" / "opt-tiny").resolve()
    assert f"saved facebook/opt-tiny to {path}" in out.stdout
    assert "parameters, float32" in out.stdout
    assert read_manifest(storage, "facebook/opt-tiny")["checksum"] in out.stdout
    assert "hashing files" in out.stderr  # progress goes to stderr

    out = run_cli("list", "--storage-path", str(storage))
    assert out.returncode == 0 and "facebook/opt-tiny" in out.stdout
    out = run_cli("list", "--json", "--storage-path", str(storage))
    (entry,) = json.loads(out.stdout)
    assert entry["name"] == "facebook/opt-tiny" and entry["dtype"] == "float32"

    out = run_cli("delete", "--model", "facebook/opt-tiny", "--storage-path", str(storage))
    assert out.returncode == 0 and "deleted facebook/opt-tiny" in out.stdout
    assert not has_model(storage, "facebook/opt-tiny")
    out = run_cli("list", "--storage-path", str(storage))
    assert out.returncode == 0 and "no models" in out.stdout

    out = run_cli("delete", "--model", "facebook/opt-tiny", "--storage-path", str(storage))
    assert_user_error(out, "facebook/opt-tiny is not in the store")


def test_user_errors_exit_1_with_a_message(tmp_path, tiny_model_src):
    s = ["--storage-path", str(tmp_path / "store")]
    src = ["--local-model-path", str(tiny_model_src)]
    assert_user_error(run_cli("save", "--model", "x", "--backend", "vllm", *src, *s), "backend")
    assert_user_error(run_cli("save", "--model", "../x", *src, *s), "escapes")
    assert_user_error(run_cli("save", "--model", "/abs/x", *src, *s), "absolute")
    missing = str(tmp_path / "nowhere")
    assert_user_error(run_cli("save", "--model", "x", "--local-model-path", missing, *s), missing)
    # usage errors are argparse's: exit 2
    assert run_cli("save", *s).returncode == 2
    assert run_cli().returncode == 2


def test_hub_download_fails_fast_when_offline(tmp_path):
    s = ["--storage-path", str(tmp_path / "store")]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": "1"}
    out = run_cli("save", "--model", "facebook/opt-125m", "--backend", "transformers", *s, env=env)
    assert_user_error(
        out,
        "could not reach the Hugging Face hub to download facebook/opt-125m",
        "--local-model-path",
    )
    assert out.elapsed < 30
    assert not (tmp_path / "store" / "transformers" / "facebook").exists()


def test_hub_download_fails_fast_when_the_hub_refuses_connections(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once we leave: connections are refused
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": None,
        "HF_HUB_OFFLINE": None,
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
    }
    out = run_cli("save", "--model", "facebook/opt-125m", "--storage-path", str(tmp_path), env=env)
    assert_user_error(out, "could not reach the Hugging Face hub to download facebook/opt-125m")
    assert out.elapsed < 30


def test_hub_download_times_out_when_the_hub_never_answers(tmp_path):
    with socket.socket() as sock:  # accepts connections (backlog) but never replies
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        env = {
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": None,
            "HF_HUB_OFFLINE": None,
            "HF_ENDPOINT": f"http://127.0.0.1:{sock.getsockname()[1]}",
            "SLLM_HUB_TIMEOUT": "1",
        }
        out = run_cli("save", "--model", "org/model", "--storage-path", str(tmp_path), env=env)
    assert_user_error(out, "could not reach the Hugging Face hub to download org/model")
    assert out.elapsed < 30


def test_hub_path_in_this_environment_finishes_quickly(tmp_path):
    """No endpoint override: with no network it says so; with network the repo does not exist."""
    name = f"sllm-tests/no-such-model-{uuid.uuid4().hex[:8]}"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": None}
    out = run_cli("save", "--model", name, "--storage-path", str(tmp_path), env=env, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        f"could not reach the Hugging Face hub to download {name}" in out.stderr
        or "not found on the Hugging Face hub" in out.stderr
    ), out.stderr
    assert out.elapsed < 30


@pytest.mark.parametrize("args", [["list"], ["delete", "--model", "x"]])
def test_cli_does_not_import_torch_for_cheap_commands(tmp_path, args):
    code = (
        "import sys; from sllm.cli.store import main; "
        f"main({[*args, '--storage-path', str(tmp_path)]!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def test_main_in_process(tmp_path, capsys):
    from sllm.cli.store import main

    assert main(["list", "--storage-path", str(tmp_path)]) == 0
    assert main(["delete", "--model", "x", "--storage-path", str(tmp_path)]) == 1
    assert "error: model x is not in the store" in capsys.readouterr().err
    assert Path(tmp_path).is_dir()
