"""One inference instance: `python -m sllm.serve.instance --storage S --model M --ready-file F`.

It loads the base model from the store, runs one forward pass, starts the batching engine, and
serves a small HTTP API on 127.0.0.1 (or `--host`) at an ephemeral port, which it announces by
writing `{"port", "pid", "load_seconds", "phases"}` to the ready file once it accepts connections
(`phases`: seconds of each cold-start step, see `load_engine`). It usually runs in a process
taken from the server's warm pool (`sllm.procpool`), which has imported torch already. The server
talks to it only:

    GET    /health              model, loaded adapters, in-flight requests, engine stats
    POST   /adapters            {name, path, fingerprint}: load or replace an adapter
    DELETE /adapters/{name}     unload an adapter (requests already admitted finish with it)
    PUT    /lora-cache          {max_loras}: how many on-demand adapters to keep (LRU)
    POST   /generate            {messages | prompt, adapter, adapter_path, adapter_fingerprint,
                                max_tokens, temperature, top_p, stop, seed}: NDJSON events,
                                first {"type": "start", "prompt_tokens": n}, then the engine's
                                events (see engine.py); with `adapter_path` the adapter is
                                loaded on demand when it is not (see adapters.py), and
                                `start` has "lora": {"loaded": bool, "cached": [LRU names]}

Every request must carry the secret the server put in `$SLLM_INSTANCE_SECRET` as
`Authorization: Bearer ...` (`sllm.serve.auth`); without it the answer is 401, so a local user
cannot drive the instance directly. Errors use the server's OpenAI-style bodies and status codes.
It runs in its own process group, pinned by `worker_env`, and dies with the server
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sllm.serve.fields import (
    MAX_LORAS,
    MAX_PATH_CHARS,
    MAX_STOPS,
    AdapterName,
    MaxTokens,
    Seed,
    StopString,
    Temperature,
    Text,
    TopP,
    check_name_chars,
)

log = logging.getLogger("sllm.instance")


CleanString = Annotated[str, Field(max_length=MAX_PATH_CHARS), AfterValidator(check_name_chars)]


class GenerateBody(BaseModel):
    """What the server forwards; checked again here, as the instance trusts nobody's numbers."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Text]] | None = Field(None, max_length=4096)
    prompt: Text | None = None
    adapter: AdapterName | None = None
    adapter_path: CleanString | None = None
    adapter_fingerprint: CleanString = ""
    max_tokens: MaxTokens = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOPS)
    seed: Seed | None = None


class AdapterBody(BaseModel):
    name: AdapterName
    path: CleanString = Field(min_length=1)
    fingerprint: CleanString = ""


class LoraCacheBody(BaseModel):
    max_loras: int = Field(ge=1, le=MAX_LORAS)


def create_instance_app(engine: Any, model_name: str, secret: str, on_ready=None):
    """The instance's HTTP API; every request must carry `secret` (see `sllm.serve.auth`)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse

    from sllm.api.errors import install_error_handlers
    from sllm.errors import InvalidRequestError
    from sllm.serve.auth import RequireSecret
    from sllm.serve.decoding import SamplingParams
    from sllm.serve.prompts import encode_chat, encode_prompt

    @asynccontextmanager
    async def lifespan(_app):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title=f"sllm instance {model_name}", lifespan=lifespan)
    app.add_middleware(RequireSecret, secret=secret)
    install_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "adapters": engine.adapters.names(),
            "in_flight": engine.in_flight(),
            "max_batch_size": engine.max_batch_size,
            "max_loras": engine.max_loras,
            "stats": dict(engine.stats),
        }

    @app.post("/adapters")
    def load_adapter(body: AdapterBody) -> dict:
        return engine.load_adapter(body.name, body.path, body.fingerprint)

    @app.delete("/adapters/{name}")
    def unload_adapter(name: str) -> dict:
        engine.unload_adapter(name)
        return {"name": name, "status": "unloaded"}

    @app.put("/lora-cache")
    def lora_cache(body: LoraCacheBody) -> dict:
        engine.set_max_loras(body.max_loras)
        return {"max_loras": engine.max_loras}

    @app.post("/generate")
    async def generate(body: GenerateBody):
        if (body.messages is None) == (body.prompt is None):
            raise InvalidRequestError("Give exactly one of `messages` and `prompt`.")
        tok = engine.tokenizer
        if body.messages is not None:
            ids = await run_in_threadpool(encode_chat, tok, body.messages)
        else:
            ids = await run_in_threadpool(encode_prompt, tok, body.prompt)
        params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is gone: the instance is stopping
                pass

        version, start = None, {"type": "start", "prompt_tokens": len(ids)}
        if body.adapter and body.adapter_path:
            args = (body.adapter, body.adapter_path, body.adapter_fingerprint)
            version, loaded = await run_in_threadpool(engine.acquire_on_demand, *args)
            start["lora"] = {"loaded": loaded, "cached": engine.on_demand_names()}
        try:
            row = engine.submit(ids, params, emit, body.adapter, version=version)
        except BaseException:
            if version is not None:
                engine.adapters.release(version)
            raise
        events = _events(engine, row, queue, start)
        return StreamingResponse(events, media_type="application/x-ndjson")

    return app


async def _events(engine: Any, row: Any, queue: asyncio.Queue, start: dict):
    try:
        yield json.dumps(start) + "\n"
        while True:
            event = await queue.get()
            yield json.dumps(event) + "\n"
            if event["type"] in ("done", "error"):
                return
    finally:
        if not row.done:
            engine.cancel(row)


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return "cuda" if visible.strip() and torch.cuda.is_available() else "cpu"


def load_engine(args: argparse.Namespace, phases: dict[str, float]):
    """The started engine; `phases` gets the seconds of each cold-start step (`process_s`: from
    the server's launch call until torch, transformers and peft are imported, about zero for a
    process from the warm pool; `model_load_s` and `model_load_gb_per_s`, the files' GB/s onto the
    device; `first_forward_s`)."""
    import peft  # noqa: F401 - imported here so a fresh process's import cost is counted
    import torch

    from sllm.procpool import process_wait_s
    from sllm.serve.engine import Engine
    from sllm.store import load_model

    phases["process_s"] = process_wait_s() or 0.0
    threads = int(os.environ.get("SLLM_NUM_CPUS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = pick_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else None
    t0 = time.monotonic()
    stats: dict[str, Any] = {}
    model, tokenizer = load_model(
        Path(args.storage), args.model, device=device, dtype=dtype, stats=stats
    )
    phases["model_load_s"] = round(time.monotonic() - t0, 4)
    phases["model_load_gb_per_s"] = stats.get("gb_per_s", 0.0)
    t0 = time.monotonic()
    first_forward(model, tokenizer, device)
    phases["first_forward_s"] = round(time.monotonic() - t0, 4)
    return Engine(model, tokenizer, device=device, max_batch_size=args.max_batch_size).start()


def first_forward(model: Any, tokenizer: Any, device: str) -> None:
    """One token through the model before the instance says it is ready, so the first request
    does not pay for lazy kernel set-up (and the phase is measured on its own)."""
    import torch

    token = tokenizer.bos_token_id
    if token is None:
        token = tokenizer.eos_token_id or 0
    with torch.inference_mode():
        model(input_ids=torch.tensor([[token]], device=device))


def write_ready(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sllm-instance")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ready-file", required=True, type=Path)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1", help="Listen address (Ray: the node's).")
    args = parser.parse_args(argv)

    from sllm.jobs.worker import die_with_parent
    from sllm.serve.auth import take_secret_from_env

    secret = take_secret_from_env()  # first: refuse to load a model nobody may call
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    engine = load_engine(args, phases)
    load_seconds = time.monotonic() - t0
    log.info("loaded %s in %.2fs (%s)", args.model, load_seconds, phases)

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]

    def on_ready() -> None:
        info = {"port": port, "pid": os.getpid(), "load_seconds": load_seconds, "phases": phases}
        write_ready(args.ready_file, info)

    app = create_instance_app(engine, args.model, secret, on_ready)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
