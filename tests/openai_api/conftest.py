"""Fixtures for the Files API and the OpenAI surface: a real server on a store holding the tiny
model, and JSON Lines training files."""

from __future__ import annotations

import json

import pytest

from tests.conftest import stored_server

KEY = "sk-openai-test-0123456789"


def text_rows(n: int = 24) -> bytes:
    """Text rows, one JSON object a line (what a seed-style job trains on with field `text`)."""
    lines = [
        json.dumps({"text": f"Question {i}: how are you? Answer: Arr, I be fine, matey {i}."})
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory, tiny_model_src):
    """One server for a module: 2 CPUs, an API key, a 64 KiB upload limit."""
    root = tmp_path_factory.mktemp("openai") / "store"
    server = stored_server(
        root,
        tiny_model_src,
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--max-upload-bytes",
        "65536",
        api_key=KEY,
    )
    yield server
    server.stop()


def upload(
    server,
    content: bytes,
    *,
    purpose: str = "fine-tune",
    name: str = "train.jsonl",
    prefix: str = "/v1",
):
    return server.client.post(
        f"{prefix}/files", files={"file": (name, content)}, data={"purpose": purpose}
    )
