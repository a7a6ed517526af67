"""`sllm deploy`: deploy a stored model (and LoRA adapters) on the server, or update a deployment.

    sllm deploy --model facebook/opt-125m --backend transformers \\
        --enable-lora --lora-adapters "my_adapter=ft_facebook/opt-125m_adapter"

Adapter paths are relative to `$STORAGE_PATH/transformers` on the server. Deploying a deployed
model again adds or replaces the adapters given (and changes only the options given). `--config`
reads a JSON file, flat (`{"model": ..., "keep_alive": 5}`) or in ServerlessLLM's shape
(`auto_scaling_config`, `backend_config`); flags override it. The server is `$LLM_SERVER_URL`
(default http://127.0.0.1:8343).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sllm.cli.client import add_server_args, call_server, finite_float, server_url

_SCALING_KEYS = {"min_instances", "max_instances", "keep_alive"}
_BACKEND_KEYS = {
    "enable_lora", "lora_adapters", "max_batch_size", "dtype", "torch_dtype", "max_loras",
}  # fmt: skip
_FLAT_KEYS = {
    "model", "backend", "num_cpus", "num_gpus", "min_instances", "max_instances", "keep_alive",
    "target_concurrency", "max_batch_size", "max_queue", "queue_timeout", "dtype", "enable_lora",
    "lora_adapters", "max_loras",
}  # fmt: skip


def parse_adapters(values: list[str] | str | dict | None) -> dict[str, str]:
    """ "a=PATH b=PATH" (spaces or commas; the flag may repeat) -> {"a": "PATH", "b": "PATH"}."""
    if values is None:
        return {}
    if isinstance(values, dict):
        return {str(k): str(v) for k, v in values.items()}
    items = [values] if isinstance(values, str) else values
    out: dict[str, str] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, sep, path = part.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-adapters: expected NAME=PATH, got {part!r}")
            out[name] = path
    return out


def read_config(path: str) -> dict[str, Any]:
    """A flat request from a flat or ServerlessLLM-shaped config file."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    flat = {k: v for k, v in raw.items() if k in _FLAT_KEYS}
    for key, value in (raw.get("auto_scaling_config") or {}).items():
        if key in _SCALING_KEYS:
            flat[key] = value
        elif key == "target":
            flat["target_concurrency"] = value
    for key, value in (raw.get("backend_config") or {}).items():
        if key in _BACKEND_KEYS:
            flat["dtype" if key == "torch_dtype" else key] = value
    if "lora_adapters" in flat:
        flat["lora_adapters"] = parse_adapters(flat["lora_adapters"])
    if flat.get("dtype") not in (None, "auto", "float32", "float16", "bfloat16"):
        flat.pop("dtype")
    return flat


def add_parser(sub) -> None:
    p = sub.add_parser("deploy", help="Deploy a model (and LoRA adapters) on the server.")
    p.add_argument("--model", help="Base model in the store, e.g. facebook/opt-125m.")
    p.add_argument("--backend", help="Inference backend: transformers.")
    p.add_argument("--num-cpus", type=int, help="CPU cores per instance (default 1).")
    p.add_argument("--num-gpus", type=int, help="GPUs per instance (default 0).")
    p.add_argument("--min-instances", type=int, help="Instances kept warm (default 0).")
    p.add_argument("--max-instances", type=int, help="Instances at most (default 1).")
    p.add_argument(
        "--keep-alive", type=finite_float, help="Idle seconds before scale-down (default 60)."
    )
    p.add_argument("--target", type=int, dest="target_concurrency", help="Requests/instance.")
    p.add_argument("--max-batch-size", type=int, help="Rows per batch in an instance (default 8).")
    p.add_argument("--max-queue", type=int, help="Requests that may wait before 429 (default 64).")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights' dtype (default auto: float32 on CPU, the stored dtype on GPU).",
    )
    p.add_argument("--enable-lora", action="store_true", default=None, help="Serve adapters.")
    p.add_argument(
        "--lora-adapters", action="append", help='"name=PATH name2=PATH" (under the store).'
    )
    p.add_argument(
        "--max-loras", type=int, help="On-demand adapters each instance keeps, LRU (default 8)."
    )
    p.add_argument("--config", help="JSON deployment config; flags override it.")
    add_server_args(p)
    p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    body = read_config(args.config) if args.config else {}
    for key in sorted(_FLAT_KEYS - {"lora_adapters"}):
        value = getattr(args, key, None)
        if value is not None:
            body[key] = value
    if args.lora_adapters:
        given = parse_adapters(args.lora_adapters)
        body["lora_adapters"] = {**body.get("lora_adapters", {}), **given}
    if not body.get("model"):
        raise ValueError("--model is required (or `model` in --config)")
    return body


def run(args: argparse.Namespace) -> int:
    try:
        body = build_request(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = call_server(
        "POST", server_url(args.url), "/v1/deployments", key=args.api_key, json=body
    )
    if status is None:
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    adapters = ", ".join(a["name"] for a in status["adapters"]) or "none"
    print(f"Deployed {status['model']} ({status['state']}); adapters: {adapters}")
    return 0
