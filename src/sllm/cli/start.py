"""`sllm start`: run the API server and its job supervisor in the foreground."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from sllm.cli.client import finite_float
from sllm.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES


def add_parser(sub) -> None:
    p = sub.add_parser("start", help="Start the sllm server (API + job supervisor).")
    p.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=8343, help="Port (default 8343).")
    p.add_argument("--storage-path", default=None, help="Model store (default $STORAGE_PATH).")
    p.add_argument("--num-cpus", type=int, default=None, help="CPU cores to hand out.")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs to hand out.")
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        help="Directory local datasets may be read from (repeatable; default: storage and cwd).",
    )
    p.add_argument(
        "--starvation-seconds",
        type=finite_float,
        default=600.0,
        help="A pending job that has waited this long reserves the next free CPUs/GPUs: no job "
        "behind it starts first (default 600).",
    )
    p.add_argument(
        "--shutdown-grace-seconds",
        type=finite_float,
        default=30.0,
        help="On SIGTERM or Ctrl-C, how long running jobs get to checkpoint at their next step "
        "before their workers are killed; they resume on the next start (default 30).",
    )
    p.add_argument(
        "--log-retention-days",
        type=finite_float,
        default=7.0,
        help="Days the worker logs of ended jobs are kept under $STORAGE_PATH/_jobs (default 7).",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Run fine-tuning jobs and inference instances on this Ray cluster (host:port; "
        "'auto': the one started on this machine; 'local': a private one); capacity then comes "
        "from its nodes and --num-cpus/--num-gpus are ignored. Default: this machine, no Ray.",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="Require `Authorization: Bearer KEY` on every route but /health (repeatable; also "
        "$SLLM_API_KEY, comma-separated).",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="Serve a non-loopback --host without an API key (anyone who reaches it can use it).",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"Largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES}).",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        help="Largest file `POST /v1/files` takes; streamed to disk, larger ones get 413 "
        f"(default {DEFAULT_MAX_UPLOAD_BYTES}, 1 GiB).",
    )
    p.add_argument(
        "--openai-num-cpus",
        type=int,
        default=1,
        help="CPU cores of a job created through /openai/v1/fine_tuning/jobs (default 1).",
    )
    p.add_argument(
        "--openai-num-gpus",
        type=int,
        default=None,
        help="GPUs of such a job (default: 1 if the server has a GPU, else 0).",
    )
    p.add_argument(
        "--openai-timeout-seconds",
        type=finite_float,
        default=24 * 3600.0,
        help="Timeout of such a job (default 86400, a day).",
    )
    p.add_argument(
        "--metrics-unauthenticated",
        action="store_true",
        help="Serve GET /metrics without the API key, for a Prometheus scraper (every other "
        "route still needs it).",
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
        help="Server log level: info logs each job's life; debug adds every loopback call to "
        "an inference instance.",
    )
    p.add_argument(
        "--warm-pool",
        type=pool_size,
        default=2,
        metavar="N",
        help="Keep N processes that have imported torch, transformers and peft ready for the next "
        "job worker or inference instance, refilled in the background (default 2: one job and "
        "one instance; 0: off). With --ray-address, N on every node of the cluster.",
    )
    p.set_defaults(func=run)


def pool_size(text: str) -> int:
    """argparse type for --warm-pool: a count from 0 (off) to 64."""
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be between 0 (off) and 64, got {text!r}")
    return value


def api_keys(flags: list[str]) -> list[str]:
    """--api-key flags plus $SLLM_API_KEY (comma-separated), blanks dropped."""
    env = os.environ.get("SLLM_API_KEY", "")
    return [k.strip() for k in [*flags, *env.split(",")] if k.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def refuse_open_server(host: str, keys: list[str], allowed: bool) -> str | None:
    """Why the server must not start, or None: an address others can reach needs a key."""
    if keys or allowed or is_loopback(host):
        return None
    return (
        f"refusing to serve {host} without an API key: anyone who can reach it could run jobs "
        "and read adapters. Set one with `--api-key KEY` (or SLLM_API_KEY=KEY; clients send "
        "`Authorization: Bearer KEY`), or pass --allow-unauthenticated if the network is trusted."
    )


def configure_logging(level: str) -> None:
    """The server's log: sllm's own lines at `level`. httpx logs each request at INFO, and the
    server's only httpx requests are its loopback calls to inference instances (one or more per
    completion): those appear only at debug."""
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sllm.api.app import create_app
    from sllm.config import Settings
    from sllm.paths import storage_path
    from sllm.serverlock import StorageInUseError, acquire_server_lock

    keys = api_keys(args.api_key)
    refusal = refuse_open_server(args.host, keys, args.allow_unauthenticated)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    if args.ray_address and (args.num_cpus is not None or args.num_gpus is not None):
        logging.getLogger("sllm").warning(
            "--num-cpus/--num-gpus are ignored with --ray-address: the cluster's nodes say what "
            "there is"
        )
    settings = Settings(
        host=args.host,
        port=args.port,
        storage_path=storage_path(args.storage_path),
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        data_roots=args.data_root,
        starvation_s=args.starvation_seconds,
        shutdown_grace_s=args.shutdown_grace_seconds,
        log_retention_days=args.log_retention_days,
        ray_address=args.ray_address,
        api_keys=keys,
        max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes,
        openai_num_cpus=args.openai_num_cpus,
        openai_num_gpus=args.openai_num_gpus,
        openai_timeout_s=args.openai_timeout_seconds,
        metrics_unauthenticated=args.metrics_unauthenticated,
        warm_pool=args.warm_pool,
    )
    try:  # before anything reads the store: a second server must not touch the first's jobs
        lock = acquire_server_lock(settings.storage_path, host=settings.host, port=settings.port)
    except StorageInUseError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    finally:
        lock.release()
    return 0
