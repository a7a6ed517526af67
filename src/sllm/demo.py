"""The README's main job: the seed workflow end to end, offline, on SmolLM2-135M-Instruct.

1. `sllm-store save` the bundled model; 2. `sllm start`; 3. submit the fine-tuning job (chat data:
a system prompt, user questions, pirate answers; the loss on the answers only); 4. follow it with
a live progress bar and its loss lines to `completed` and list the adapter; 5. deploy the adapter
and ask base and adapter the same question through `/v1/chat/completions`, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sllm.testing import LocalServer

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "fine_tuning" / "demo_config.json"
QUESTION = "What is the best way to learn to sail?"
# The training conversations' system prompt (examples/fine_tuning/data/make_pirate_prompts.py):
# base and adapter get the same one, so only the adapter makes the difference.
SYSTEM_PROMPT = "You are the ship's assistant. Answer the crew's questions."
console = Console()


def _step(n: int, title: str, command: str | None = None) -> None:
    console.rule(f"[bold]Step {n}: {title}")
    if command:
        console.print(f"[dim]$ {command}")


def save_base_model(storage: Path) -> str:
    from sllm.store.bundled import DEMO_MODEL, ensure_demo_model, smollm2_gguf_path

    _step(
        1,
        "save the base model into the store",
        f"sllm-store save --model {DEMO_MODEL} --backend transformers "
        f"--local-model-path {smollm2_gguf_path()}",
    )
    start = time.monotonic()
    name = ensure_demo_model(storage, progress=lambda msg: console.print(msg))
    console.print(f"{storage / 'transformers' / name} ready in {time.monotonic() - start:.1f} s")
    return name


def start_server(storage: Path, port: int | None, num_cpus: int) -> LocalServer:
    server = LocalServer(storage, "--num-cpus", str(num_cpus), cwd=REPO, port=port)
    _step(2, "start the server", f"sllm start --port {server.port} --storage-path {storage}")
    server.start()
    console.print(f"server up at {server.url} (log: {server.log})")
    return server


def submit(server: LocalServer, config: dict) -> str:
    _step(
        3,
        "submit the fine-tuning job",
        f"curl -X POST {server.url}/v1/fine-tuning/jobs -H 'Content-Type: application/json' "
        f"-d @{DEMO_CONFIG.relative_to(REPO)}",
    )
    r = server.client.post("/v1/fine-tuning/jobs", json=config)
    if r.status_code != 200:
        raise SystemExit(f"submit failed ({r.status_code}): {r.text}")
    job_id = r.json()["job_id"]
    console.print_json(r.text)
    return job_id


def follow(server: LocalServer, job_id: str) -> dict:
    _step(4, "monitor the job", f"curl {server.url}/v1/fine_tuning/jobs/{job_id}")
    columns = [
        TextColumn("[bold]{task.fields[status]:<9}"),
        BarColumn(),
        TextColumn("step {task.fields[steps]}"),
        TextColumn("epoch {task.fields[epoch]:.2f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
    ]
    seen: int | None = None
    with Progress(*columns, console=console, refresh_per_second=8) as bar:
        task = bar.add_task(
            "job", total=None, status="pending", steps="-", epoch=0.0, loss="-", tps="-"
        )
        while True:
            seen = print_events(server, job_id, seen)
            body = server.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            st = body["status"]
            p = st.get("progress") or {}
            bar.update(
                task,
                status=st["status"],
                total=p.get("total_steps"),
                completed=p.get("step") or 0,
                steps=f"{p.get('step') or 0}/{p.get('total_steps') or '?'}",
                epoch=p.get("epoch") or 0.0,
                loss=f"{p['loss']:.3f}" if p.get("loss") is not None else "-",
                tps=f"{p['tokens_per_second']:.0f}" if p.get("tokens_per_second") else "-",
            )
            if st["status"] in ("completed", "failed", "cancelled"):
                print_events(server, job_id, seen)
                return body
            time.sleep(0.25)


def print_events(server: LocalServer, job_id: str, after: int | None) -> int | None:
    """Print the job's new events (data summary, train and validation loss, warnings) above the
    progress bar; returns the last event id seen."""
    params = {"limit": 1000, **({"after": after} if after is not None else {})}
    events = server.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
    for event in events.get("data", []):
        style = {"loss": "cyan", "warning": "yellow", "error": "red"}.get(event["type"], "dim")
        if "valid" in event["type"] or "valid_loss" in (event.get("data") or {}):
            style = "magenta"
        console.print(f"[{style}]{event['message']}")
        after = event["id"]
    return after


def show_adapter(body: dict) -> None:
    st = body["status"]
    if st["status"] != "completed":
        raise SystemExit(f"job ended {st['status']}: {json.dumps(st.get('error'), indent=2)}")
    path = Path(st["adapter_path"])
    table = Table(title=f"adapter at {path}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in sorted(path.iterdir()):
        table.add_row(f.name, f"{f.stat().st_size:,}")
    console.print(table)
    meta = json.loads((path / "training_metadata.json").read_text())
    keys = ("final_loss", "trained_tokens", "processed_tokens", "runtime_s", "dataset")
    console.print({k: meta.get(k) for k in keys if k in meta})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sllm-demo", description=__doc__)
    default_storage = os.environ.get("STORAGE_PATH") or str(REPO / ".sllm" / "demo")
    parser.add_argument("--storage-path", default=default_storage)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    storage = Path(args.storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = save_base_model(storage)
    config = json.loads(DEMO_CONFIG.read_text())
    config["model"] = model
    config["num_cpus"] = min(config["num_cpus"], args.num_cpus)
    server = start_server(storage, args.port or None, args.num_cpus)
    try:
        job_id = submit(server, config)
        body = follow(server, job_id)
        show_adapter(body)
        deploy_and_chat(server, model, body)
    finally:
        server.stop()
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f} s")
    return 0


def deploy_and_chat(server: LocalServer, model: str, body: dict) -> None:
    """Step 5 of the seed: deploy the base model with the fresh adapter, ask both one question."""
    output_dir = body["status"]["config"]["backend_config"]["output_dir"]
    adapters = f"pirate={output_dir}"
    shown = f"sllm deploy --model {model} --backend transformers --enable-lora"
    shown += f' --lora-adapters "{adapters}"'
    _step(5, "deploy the adapter and chat", shown)
    deploy = ["deploy", "--model", model, "--backend", "transformers", "--enable-lora"]
    deploy += ["--lora-adapters", adapters, "--keep-alive", "60"]
    result = server.cli(*deploy, check=False)
    if result.returncode != 0:
        raise SystemExit(f"deploy failed: {result.stderr.strip()}")
    table = Table(title=f"Q: {QUESTION}", show_lines=True)
    table.add_column(f"base model ({model})", ratio=1)
    table.add_column("with adapter `pirate`", ratio=1)
    answers = []
    for adapter in (None, "pirate"):
        request = {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": QUESTION},
            ],
            "max_tokens": 48,
            "temperature": 0,
        }
        if adapter:
            request["lora_adapter_name"] = adapter
        start = time.monotonic()
        r = server.client.post("/v1/chat/completions", json=request, timeout=300)
        if r.status_code != 200:
            raise SystemExit(f"chat failed ({r.status_code}): {r.text}")
        answers.append(r.json()["choices"][0]["message"]["content"].strip())
        console.print(f"[dim]{adapter or 'base'} answered in {time.monotonic() - start:.1f} s")
    table.add_row(*answers)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
