"""`sllm jobs`: submit, list, inspect, follow and cancel fine-tuning jobs on a running server.

`sllm jobs follow ID` (and `logs --follow`) exits by the job's outcome: 0 completed, 1 failed,
2 cancelled, 3 when it could not follow (unknown job, server unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

from sllm.cli.client import add_server_args, call_server, server_url

EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 2}
EXIT_UNREACHABLE = 3
TERMINAL = frozenset(EXIT_CODES)
JOBS = "/v1/fine_tuning/jobs"


def add_parser(sub) -> None:
    jobs = sub.add_parser("jobs", help="Submit, list, follow and cancel fine-tuning jobs.")
    cmds = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("submit", help="Submit a job from its JSON config (the seed's shape).")
    p.add_argument("config", help="Path of the job's JSON config ('-' reads standard input).")
    p.add_argument("--priority", type=int, help="Override the config's priority (higher first).")
    _common(p, submit)

    p = cmds.add_parser("list", help="List jobs, newest first.")
    p.add_argument("--status", help="Only jobs in this status (pending, running, ...).")
    p.add_argument("--limit", type=int, default=20, help="Jobs to show.")
    p.add_argument("--after", help="Page: start after this job id.")
    _common(p, list_jobs)

    p = cmds.add_parser("get", help="Show a job: status, progress, error, adapter path.")
    p.add_argument("job_id", help="The job's id (job-...).")
    _common(p, get)

    p = cmds.add_parser("events", help="A job's events: state changes, loss points, errors.")
    p.add_argument("job_id", help="The job's id (job-...).")
    p.add_argument("--limit", type=int, default=100, help="Events to show.")
    _common(p, events)

    p = cmds.add_parser("logs", help="A job's worker log (its last lines, or follow it).")
    p.add_argument("job_id", help="The job's id (job-...).")
    p.add_argument("--tail", type=int, default=200, help="Lines from the end to print first.")
    p.add_argument(
        "--follow", "-f", action="store_true", help="Keep printing new output until the job ends."
    )
    p.add_argument("--interval", type=float, default=1.0, help="Seconds between polls.")
    _common(p, logs)

    p = cmds.add_parser("cancel", help="Cancel a pending or running job.")
    p.add_argument("job_id", help="The job's id (job-...).")
    _common(p, cancel)

    p = cmds.add_parser(
        "follow",
        help="A live progress bar with the loss until the job ends; exit code 0 completed, "
        "1 failed, 2 cancelled, 3 could not follow.",
    )
    p.add_argument("job_id", help="The job's id (job-...).")
    p.add_argument("--interval", type=float, default=1.0, help="Seconds between polls.")
    _common(p, follow)


def _common(p: argparse.ArgumentParser, func) -> None:
    add_server_args(p)
    if func not in (logs, follow):
        p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    p.set_defaults(func=func)


def _call(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict | None:
    return call_server(method, server_url(args.url), path, key=args.api_key, **kwargs)


def _job_path(job_id: str, tail: str = "") -> str:
    return f"{JOBS}/{quote(job_id, safe='')}{tail}"


def _print_json(body: dict) -> None:
    print(json.dumps(body, indent=2))


def submit(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.config == "-" else Path(args.config).read_text()
        config = json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the config {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.priority is not None and isinstance(config, dict):
        config["priority"] = args.priority
    body = _call(args, "POST", JOBS, json=config)
    if body is None:
        return 1
    _print_json(body) if args.json else print(body["job_id"])
    return 0


def _summary(job: dict) -> str:
    st = job["status"]
    progress = st.get("progress") or {}
    step, total = progress.get("step"), progress.get("total_steps")
    steps = f"{step}/{total}" if step is not None else "-"
    loss = f"{progress['loss']:.4f}" if progress.get("loss") is not None else "-"
    model = st["config"].get("model", "?")
    return f"{job['id']:<40} {st['status']:<10} {steps:>11} {loss:>8}  {model}"


def list_jobs(args: argparse.Namespace) -> int:
    params = {"limit": args.limit}
    params.update({k: v for k, v in (("status", args.status), ("after", args.after)) if v})
    body = _call(args, "GET", JOBS, params=params)
    if body is None:
        return 1
    if args.json:
        _print_json(body)
        return 0
    print(f"{'ID':<40} {'STATUS':<10} {'STEP':>11} {'LOSS':>8}  MODEL")
    for job in body["data"]:
        print(_summary(job))
    if body.get("has_more") and body["data"]:
        print(f"(more: --after {body['data'][-1]['id']})")
    return 0


def get(args: argparse.Namespace) -> int:
    body = _call(args, "GET", _job_path(args.job_id))
    if body is None:
        return 1
    if args.json:
        _print_json(body)
        return 0
    st = body["status"]
    print(_summary(body))
    for key in ("created_time", "started_time", "finished_time", "adapter_path"):
        if st.get(key):
            print(f"  {key}: {st[key]}")
    if st.get("pending_reason"):
        print(f"  waiting: {st['pending_reason']}")
    if st.get("error"):
        print(f"  error ({st['error']['kind']}): {st['error']['message']}")
    return 0


def events(args: argparse.Namespace) -> int:
    body = _call(args, "GET", _job_path(args.job_id, "/events"), params={"limit": args.limit})
    if body is None:
        return 1
    if args.json:
        _print_json(body)
        return 0
    for ev in body["data"]:
        print(f"{ev['created_time']}  {ev['level']:<7} {ev['type']:<14} {ev['message']}")
    return 0


def cancel(args: argparse.Namespace) -> int:
    body = _call(args, "POST", _job_path(args.job_id, "/cancel"))
    if body is None:
        return 1
    _print_json(body) if args.json else print(f"{body['id']}: {body['status']['status']}")
    return 0


def logs(args: argparse.Namespace) -> int:
    path = _job_path(args.job_id, "/logs")
    page = _call(args, "GET", path, params={"tail": args.tail})
    if page is None:
        return EXIT_UNREACHABLE if args.follow else 1
    sys.stdout.write(page["text"])
    if not args.follow:
        return 0
    offset = page["next_offset"]
    while True:
        job = _call(args, "GET", _job_path(args.job_id))
        if job is None:
            return EXIT_UNREACHABLE
        ended = job["status"]["status"] in TERMINAL
        while True:  # read everything there is (after the job ended: the log is complete)
            page = _call(args, "GET", path, params={"offset": offset, "limit": 1 << 20})
            if page is None:
                return EXIT_UNREACHABLE
            sys.stdout.write(page["text"])
            sys.stdout.flush()
            if page["next_offset"] == offset:
                break
            offset = page["next_offset"]
        if ended:
            return EXIT_CODES[job["status"]["status"]]
        time.sleep(args.interval)


def follow(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=False)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(args.job_id, total=None, loss="-")
        while True:
            job = _call(args, "GET", _job_path(args.job_id))
            if job is None:
                return EXIT_UNREACHABLE
            st = job["status"]
            progress = st.get("progress") or {}
            loss = progress.get("loss")
            waiting = f" ({st['pending_reason']})" if st.get("pending_reason") else ""
            bar.update(
                task,
                description=f"{args.job_id} {st['status']}{waiting}",
                total=progress.get("total_steps"),
                completed=progress.get("step") or 0,
                loss=f"{loss:.4f}" if loss is not None else "-",
            )
            if st["status"] in TERMINAL:
                break
            time.sleep(args.interval)
    outcome = st["status"]
    line = f"{args.job_id} {outcome}"
    if st.get("error"):
        line += f" ({st['error']['kind']}): {st['error']['message']}"
    elif st.get("adapter_path"):
        line += f": adapter at {st['adapter_path']}"
    console.print(line, highlight=False, soft_wrap=True)
    return EXIT_CODES[outcome]
