"""`sllm models`: list the models a server answers for, and delete a fine-tuned one.

`sllm models list` shows deployed models, their adapters and fine-tuned models (`ft:...`, served
on demand) with their base model; `sllm models delete NAME` removes a fine-tuned model's adapter
from the store and from every instance (`DELETE /v1/models/{name}`). Exit codes: 0 done, 1 the
server said no (its message is printed) or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
from urllib.parse import quote

from sllm.cli.client import add_server_args, call_server, server_url

MODELS = "/v1/models"


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="List models; delete a fine-tuned model.")
    cmds = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("list", help="Models the server serves (fine-tuned ones with `parent`).")
    _common(p, list_models)

    p = cmds.add_parser(
        "delete", help="Delete a fine-tuned model: its adapter leaves the store and instances."
    )
    p.add_argument("name", help="The model's name, ft:<base>:<suffix>:<job id>[:ckpt-step-N].")
    _common(p, delete)


def _common(p: argparse.ArgumentParser, func) -> None:
    add_server_args(p)
    p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    p.set_defaults(func=func)


def _call(args: argparse.Namespace, method: str, path: str) -> dict | None:
    return call_server(method, server_url(args.url), path, key=args.api_key)


def list_models(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", MODELS)
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    rows = [(m["id"], m.get("parent") or "-") for m in answer["data"]]
    width = max([len("MODEL"), *(len(name) for name, _ in rows)])
    print(f"{'MODEL':<{width}}  PARENT")
    for name, parent in rows:
        print(f"{name:<{width}}  {parent}")
    return 0


def delete(args: argparse.Namespace) -> int:
    answer = _call(args, "DELETE", f"{MODELS}/{quote(args.name, safe='/:')}")
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"Deleted model {answer['id']}")
    return 0
