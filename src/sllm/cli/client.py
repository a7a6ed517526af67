"""How the `sllm` commands reach the server: its URL, its API key, and one call that prints the
server's error in a line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8343"


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="Server URL (default $LLM_SERVER_URL or 127.0.0.1:8343).")
    p.add_argument(
        "--api-key", help="The server's API key (default $SLLM_API_KEY; its first if a list)."
    )


def finite_float(text: str) -> float:
    """argparse type: a float that JSON can carry (no inf/nan)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def server_url(explicit: str | None = None) -> str:
    return (explicit or os.environ.get("LLM_SERVER_URL") or DEFAULT_URL).rstrip("/")


def api_key(explicit: str | None = None) -> str | None:
    """--api-key, else the first of $SLLM_API_KEY (the server takes a comma-separated list)."""
    if explicit:
        return explicit
    keys = [k.strip() for k in os.environ.get("SLLM_API_KEY", "").split(",") if k.strip()]
    return keys[0] if keys else None


def call_server(
    method: str, url: str, path: str, *, key: str | None = None, **kwargs: Any
) -> dict | None:
    """The JSON answer, or None after printing the server's error (callers exit 1)."""
    import httpx

    key = key or api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, f"{url}{path}", timeout=600, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the sllm server at {url}: {exc}", file=sys.stderr)
        return None
    except ValueError as exc:  # a body JSON cannot carry (NaN/Infinity from a --config file)
        print(f"error: cannot send that request: {exc}", file=sys.stderr)
        return None
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text.strip() or response.reason_phrase}}
    if response.status_code >= 400:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else body
        print(f"error ({response.status_code}): {message}", file=sys.stderr)
        return None
    return body


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the help already says it or there is
    no default worth showing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def walk_parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's parser below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(child)


def use_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give `parser` and all its subcommands `HelpFormatter` (defaults shown in --help)."""
    for p in walk_parsers(parser):
        p.formatter_class = HelpFormatter
    return parser
