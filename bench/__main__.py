"""`python -m bench finetune|overhead|api|load|host|adapters|coldstart|all|render [options]`: see
bench/README.md.

`render RESULT.json...` rewrites the Markdown table and PNG plot of saved finetune results (the
GPU script brings back JSON only).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from bench.common import RESULTS
    from bench.workload import SIZES

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    whats = [
        "finetune",
        "overhead",
        "api",
        "load",
        "host",
        "adapters",
        "coldstart",
        "all",
        "render",
    ]
    parser.add_argument("what", choices=whats)
    parser.add_argument("files", nargs="*", type=Path, help="render: finetune result JSON files")
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES), help="finetune, load, host")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--variants", default=None, help="finetune, host: comma-separated variants")
    parser.add_argument("--repeat", type=int, default=1, help="finetune: interleaved rounds")
    parser.add_argument("--rounds", type=int, default=None, help="load: rounds (5; 3 on cuda)")
    parser.add_argument("--deadline-s", type=float, default=None, help="finetune: stop starting")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller api/overhead/adapters runs; coldstart: tiny only",
    )
    parser.add_argument("--adapters", type=int, default=None, help="adapters: how many (100)")
    parser.add_argument(
        "--threads", type=int, default=None, help="finetune: CPU threads (the job's num_cpus)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="finetune, host, adapters: reuse model+data"
    )
    parser.add_argument("--name", default=None, help="finetune: result file name")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["SLLM_BENCH_THREADS"] = str(args.threads)
    device = args.device or _default_device()
    if args.what == "render":
        import json

        from bench import finetune

        for path in args.files:
            finetune.render(json.loads(path.read_text()), args.out, path.stem)
        return 0
    todo = ["finetune", "overhead", "api", "load"] if args.what == "all" else [args.what]
    for what in todo:
        if what == "finetune":
            from bench import finetune

            variants = args.variants.split(",") if args.variants else None
            finetune.run(
                args.size,
                device,
                variants,
                args.repeat,
                out_dir=args.out,
                deadline_s=args.deadline_s,
            )
        elif what == "overhead":
            from bench import overhead

            overhead.run(quick=args.quick, out_dir=args.out)
        elif what == "api":
            from bench import api

            api.run(quick=args.quick, out_dir=args.out)
        elif what == "host":
            from bench import host

            variants = args.variants.split(",") if args.variants else None
            host.run(args.size, device, variants, out_dir=args.out, workdir=args.workdir)
        elif what == "adapters":
            from bench import adapters

            adapters.run(args.quick, args.out, adapters=args.adapters, workdir=args.workdir)
        elif what == "coldstart":
            from bench import coldstart

            coldstart.run(quick=args.quick, out_dir=args.out)
        elif what == "load":
            from bench import load

            load.run(args.size, device, out_dir=args.out, rounds=args.rounds)
    return 0


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
