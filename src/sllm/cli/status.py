"""`sllm status [MODEL]`: deployments, their adapters, instances and state."""

from __future__ import annotations

import argparse
import json

from sllm.cli.client import add_server_args, call_server, server_url


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="Show deployments, adapters, instances and state.")
    p.add_argument("model", nargs="?", help="Only this deployment.")
    add_server_args(p)
    p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    p.set_defaults(func=run)


def describe(dep: dict) -> list[str]:
    cfg = dep["config"]
    lines = [
        f"{dep['model']}  state={dep['state']}  instances={len(dep['instances'])}"
        f"  min={cfg['min_instances']} max={cfg['max_instances']} keep_alive={cfg['keep_alive']:g}s"
        f"  queued={dep['queued']}"
    ]
    for a in dep["adapters"]:
        extra = f"  error: {a['error']}" if a.get("error") else ""
        lines.append(f"  adapter  {a['name']} = {a['path']}  [{a['state']}]{extra}")
    for i in dep["instances"]:
        cold = f"{i['cold_start_seconds']:.2f}s" if i["cold_start_seconds"] is not None else "-"
        idle = f"{i['idle_seconds']:.1f}s" if i["idle_seconds"] is not None else "-"
        lines.append(
            f"  instance {i['id']}  {i['state']}  pid={i['pid']}  in_flight={i['in_flight']}"
            f"  idle={idle}  cold_start={cold}  cpus={i['cpus']} gpus={i['gpu_ids']}"
        )
    if dep.get("last_error"):
        lines.append(f"  last error: {dep['last_error'].splitlines()[0]}")
    return lines


def run(args: argparse.Namespace) -> int:
    path = f"/v1/deployments/{args.model}" if args.model else "/v1/deployments"
    answer = call_server("GET", server_url(args.url), path, key=args.api_key)
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    deps = [answer] if args.model else answer["data"]
    if not deps:
        print("No deployments.")
    for dep in deps:
        print("\n".join(describe(dep)))
    return 0
