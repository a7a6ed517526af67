"""`sllm start`: run the API server and its job supervisor in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys


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
    p.add_argument("--starvation-seconds", type=float, default=600.0)
    p.add_argument(
        "--ray-address",
        default=None,
        help="Run fine-tuning jobs and inference instances on this Ray cluster (host:port; "
        "'auto': the one started on this machine; 'local': a private one); capacity then comes "
        "from its nodes and --num-cpus/--num-gpus are ignored. Default: this machine, no Ray.",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sllm.api.app import create_app
    from sllm.config import Settings
    from sllm.paths import storage_path
    from sllm.serverlock import StorageInUseError, acquire_server_lock

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
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
        ray_address=args.ray_address,
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
