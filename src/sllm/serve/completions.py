"""OpenAI chat and text completions on top of `DeploymentService` (no FastAPI here).

The adapter comes from `lora_adapter_name`, or from `model` when it names an adapter (as vLLM
does) or a fine-tuned model (served on demand, see `sllm.serve.finetuned`); neither means the
base model. Chat templating happens inside the instance (it owns the
tokenizer; see `sllm.serve.prompts` for the fallback used by models without a template).

Streaming returns an async iterator of server-sent-event lines; it is returned only after the
instance admitted the request, so every error known before the first token is an HTTP error. A
failure after that (the instance died mid-answer) can only be reported in the stream: one
`data: {"error": {...}}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sllm.api.errors import error_body
from sllm.serve.client import GenerationStream
from sllm.serve.deployments import DeploymentService
from sllm.serve.errors import InstanceError
from sllm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    SamplingFields,
    Usage,
)

DONE = "data: [DONE]\n\n"


def _payload(req: SamplingFields, max_tokens: int) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop_list(),
        "seed": req.seed,
    }


def _usage(done: dict) -> Usage:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _sse(obj: Any) -> str:
    data = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else obj
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _error_event(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'instance_error', None, 500))}\n\n"


class CompletionService:
    def __init__(self, deployments: DeploymentService) -> None:
        self.deployments = deployments

    async def _open(self, req: SamplingFields, payload: dict) -> GenerationStream:
        route = self.deployments.resolve(req.model, req.lora_adapter_name)
        return await self.deployments.open(route.model, route.adapter, payload, route.on_demand)

    async def _collect(self, stream: GenerationStream) -> tuple[str, dict]:
        text = []
        async for event in stream.events():
            if event["type"] == "text":
                text.append(event["text"])
            elif event["type"] == "error":
                raise InstanceError(event["message"])
            elif event["type"] == "done":
                return "".join(text), event
        raise InstanceError("The instance ended the answer without finishing it.")

    # --- chat --------------------------------------------------------------------------------

    def _chat_payload(self, req: ChatCompletionRequest) -> dict:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return {"messages": messages, **_payload(req, req.token_limit())}

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        stream = await self._open(req, self._chat_payload(req))
        text, done = await self._collect(stream)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text), finish_reason=done["finish_reason"]
                )
            ],
            usage=_usage(done),
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        stream = await self._open(req, self._chat_payload(req))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        base["model"] = req.model

        def chunk(delta: ChatDelta, finish: str | None = None) -> str:
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            return _sse(ChatCompletionChunk(**base, choices=[choice]))

        async def lines() -> AsyncIterator[str]:
            yield chunk(ChatDelta(role="assistant", content=""))
            async for event in stream.events():
                if event["type"] == "text":
                    yield chunk(ChatDelta(content=event["text"]))
                elif event["type"] == "error":
                    yield _error_event(event["message"])
                elif event["type"] == "done":
                    yield chunk(ChatDelta(), event["finish_reason"])
                    if req.stream_options and req.stream_options.include_usage:
                        usage = _usage(event)
                        yield _sse(ChatCompletionChunk(**base, choices=[], usage=usage))
            yield DONE

        return _closing(lines(), stream)

    # --- text completions --------------------------------------------------------------------

    def _completion_payload(self, req: CompletionRequest) -> dict:
        return {"prompt": req.prompt, **_payload(req, req.token_limit())}

    async def complete(self, req: CompletionRequest) -> Completion:
        stream = await self._open(req, self._completion_payload(req))
        text, done = await self._collect(stream)
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=[CompletionChoice(text=text, finish_reason=done["finish_reason"])],
            usage=_usage(done),
        )

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        stream = await self._open(req, self._completion_payload(req))
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        base["model"] = req.model

        def chunk(text: str, finish: str | None = None, usage: Usage | None = None) -> str:
            choices = [] if usage else [CompletionChoice(text=text, finish_reason=finish)]
            return _sse(Completion(**base, choices=choices, usage=usage))

        async def lines() -> AsyncIterator[str]:
            async for event in stream.events():
                if event["type"] == "text":
                    yield chunk(event["text"])
                elif event["type"] == "error":
                    yield _error_event(event["message"])
                elif event["type"] == "done":
                    yield chunk("", event["finish_reason"])
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk("", usage=_usage(event))
            yield DONE

        return _closing(lines(), stream)


async def _closing(lines: AsyncIterator[str], stream: GenerationStream) -> AsyncIterator[str]:
    """Pass lines through; close the instance stream however the client leaves."""
    try:
        async for line in lines:
            yield line
    finally:
        await stream.aclose()
