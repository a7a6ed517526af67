"""`sllm delete MODEL [--lora-adapters "a b"]`: remove adapters, or the whole deployment."""

from __future__ import annotations

import argparse
import json
import sys

from sllm.cli.client import add_server_args, call_server, server_url


def add_parser(sub) -> None:
    p = sub.add_parser("delete", help="Delete a deployment, or only some of its adapters.")
    p.add_argument("model", help="The deployed model.")
    p.add_argument(
        "--lora-adapters", action="append", help='Adapter names, "a b" or "a,b" (repeatable).'
    )
    add_server_args(p)
    p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = [n for raw in args.lora_adapters or [] for n in raw.replace(",", " ").split()]
    if args.lora_adapters is not None and not names:
        print("error: --lora-adapters needs at least one name", file=sys.stderr)
        return 2
    params = {"lora_adapters": ",".join(names)} if names else None
    answer = call_server(
        "DELETE",
        server_url(args.url),
        f"/v1/deployments/{args.model}",
        key=args.api_key,
        params=params,
    )
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer["deleted"] == "adapters":
        print(f"Deleted adapters {', '.join(answer['adapters'])} of {answer['model']}")
    else:
        print(f"Deleted deployment {answer['model']}")
    return 0
