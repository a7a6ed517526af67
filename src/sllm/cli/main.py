"""`sllm`: start the server; deploy, delete and inspect models on it."""

from __future__ import annotations

import argparse
import sys

from sllm.cli import delete as delete_cmd
from sllm.cli import deploy as deploy_cmd
from sllm.cli import jobs as jobs_cmd
from sllm.cli import models as models_cmd
from sllm.cli import start as start_cmd
from sllm.cli import status as status_cmd
from sllm.cli.client import use_help_formatter

COMMANDS = {
    "start": start_cmd,
    "deploy": deploy_cmd,
    "delete": delete_cmd,
    "status": status_cmd,
    "jobs": jobs_cmd,
    "models": models_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return use_help_formatter(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
