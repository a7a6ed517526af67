"""The batching inference engine of one instance: a base model, its LoRA adapters, a queue.

One thread runs the model. Between decoding steps it admits waiting requests (up to
`max_batch_size` rows): they are prefilled together, then join the running batch, whatever
adapter each asks for; every step is ONE forward pass over all rows, with peft's
`adapter_names=[...]` choosing each row's adapter (`__base__` for the base model). Finished rows
leave at once. Greedy rows produce what they would alone (fp32; checked in tests/serve).

Events reach each request through its `emit` callback (called on the engine thread):

    {"type": "text", "text": "..."}                      text that is final (stop strings held)
    {"type": "done", "finish_reason": "stop" | "length" | "cancelled",
     "prompt_tokens": n, "completion_tokens": m}
    {"type": "error", "message": "..."}                  it failed; nothing more follows

A row whose scores are not finite (see `decoding.choose_tokens`) fails alone: it gets its error
event and leaves the batch; the other rows decode on, unchanged. Only an exception of the forward
pass itself fails the whole batch.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.serve.adapters import (
    AdapterSet,
    AdapterVersion,
    check_adapter_dir,
    check_finite_weights,
    check_shapes,
    timed,
)
from sllm.serve.batch import BASE, AdapterRouter, Batch, Row, left_padded, run_forward
from sllm.serve.decoding import (
    RowFailure,
    SamplingParams,
    TextTracker,
    choose_tokens,
    make_generator,
)
from sllm.serve.protocol import DEFAULT_MAX_LORAS  # on-demand adapters kept (LRU)

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 2048


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: Any = "cpu",
        max_batch_size: int = 8,
        max_loras: int = DEFAULT_MAX_LORAS,
    ) -> None:
        self.base = model.eval()
        self.peft: Any = None
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_loras = max_loras
        self._demand_lock = threading.Lock()  # loads and evictions of on-demand adapters
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.adapters = AdapterSet()
        self.router = AdapterRouter()
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "mixed_steps": 0, "requests": 0}
        self.stats["joins"] = 0
        self.stats["row_failures"] = 0
        self._model_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._running: Batch | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + (len(self._running) if self._running else 0)

    # --- requests ----------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[dict], None],
        adapter: str | None = None,
        version: AdapterVersion | None = None,
    ) -> Row:
        """Queue a request; raises (400/404) before queueing when it cannot run. `version` is
        an adapter already held for it (`acquire_on_demand`); the row releases it when done."""
        if not prompt_ids:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequestError(
                f"The prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self.max_context} tokens.",
                param="messages",
            )
        if version is None and adapter:
            version = self.adapters.acquire(adapter)
        row = Row(
            id=uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            adapter_key=version.internal if version else BASE,
            emit=emit,
            tracker=TextTracker(self.tokenizer, params.stop),
            max_new=min(params.max_tokens, self.max_context - len(prompt_ids)),
            generator=make_generator(params, self.device),
            version=version,
        )
        with self._cond:
            self._waiting.append(row)
            self.stats["requests"] += 1
            self._cond.notify_all()
        return row

    def cancel(self, row: Row) -> None:
        row.cancelled = True
        with self._cond:
            self._cond.notify_all()

    # --- adapters ----------------------------------------------------------------------------

    def load_adapter(
        self, name: str, path: str, fingerprint: str = "", on_demand: bool = False
    ) -> dict[str, Any]:
        """Load `path` as `name`, replacing an older version; a no-op if nothing changed.
        An explicit load pins the adapter; an on-demand one joins the LRU."""
        current = self.adapters.get(name)
        if current and current.path == path and current.fingerprint == fingerprint:
            current.on_demand = current.on_demand and on_demand
            return {"name": name, "status": "unchanged", "load_seconds": 0.0}
        check_adapter_dir(path)
        check_shapes(self.base, path)
        check_finite_weights(path)
        internal = self.adapters.next_internal()
        with self._model_lock:
            _, seconds = timed(self._load_into_model, internal, path)
        version = AdapterVersion(name, internal, path, fingerprint, seconds, on_demand=on_demand)
        self.adapters.install(version)
        self._collect()
        status = "replaced" if current else "loaded"
        log.info("adapter %s %s from %s in %.3fs", name, status, path, seconds)
        return {"name": name, "status": status, "load_seconds": seconds}

    def acquire_on_demand(
        self, name: str, path: str, fingerprint: str
    ) -> tuple[AdapterVersion, bool]:
        """The adapter `name` from `path` (and whether this call loaded it), loaded if it is
        not, evicting the least recently used unheld ones beyond `max_loras`; a reference is
        held for one request, so no eviction can take it between loading and admission.
        Blocks while loading (call it off the event loop)."""
        with self._demand_lock:
            current = self.adapters.get(name)
            load = current is None or current.path != path or current.fingerprint != fingerprint
            if load:
                if current is None:  # one more: make room (a replaced version keeps its slot)
                    self.adapters.evict_lru(self.max_loras - 1)
                on_demand = current is None or current.on_demand
                self.load_adapter(name, path, fingerprint, on_demand=on_demand)
            version = self.adapters.acquire(name)
            self.adapters.evict_lru(self.max_loras)  # what held ones kept over the cap
        self._collect()
        return version, load

    def on_demand_names(self) -> list[str]:
        """Adapters in the LRU, least recently used first."""
        return self.adapters.on_demand_names()

    def set_max_loras(self, max_loras: int) -> None:
        with self._demand_lock:
            self.max_loras = max_loras
            self.adapters.evict_lru(max_loras)
        self._collect()

    def _trim_lru(self) -> None:
        """After a request ends: evict what the cap could not while it was held. Skipped when
        a load is under way (it trims itself)."""
        if self._demand_lock.acquire(blocking=False):
            try:
                self.adapters.evict_lru(self.max_loras)
            finally:
                self._demand_lock.release()

    def _load_into_model(self, internal: str, path: str) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=internal)
        else:
            self.peft.load_adapter(path, adapter_name=internal)
        self.peft.eval()
        self.router.attach(self.peft)

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)
        self._collect()

    def _collect(self) -> None:
        if self.peft is None:
            return
        with self._model_lock:
            versions = self.adapters.collectable(len(self.peft.peft_config))
            for version in versions:
                self.peft.delete_adapter(version.internal)
            if versions:
                self.router.attach(self.peft)

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and self._running is None:
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = self._admit_locked()
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._running is not None:
                        self._decode_step()
                except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                    log.exception("batch failed")
                    self._fail(admitted + (self._running.rows if self._running else []), exc)
        self._fail(list(self._waiting) + (self._running.rows if self._running else []), None)

    def _admit_locked(self) -> list[Row]:
        for row in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(row)
            row.finish_reason = "cancelled"
            self._finish(row)
        running = self._running
        if running is not None and not running.joinable():
            return []
        room = self.max_batch_size - (len(running) if running else 0)
        admitted = []
        while self._waiting and len(admitted) < room:
            admitted.append(self._waiting.popleft())
        return admitted

    def _forward(self, ids, mask, pos, cache, names: list[str]):
        with self._model_lock:
            self.router.names = names if self.peft is not None else None
            try:
                return run_forward(self.base, type(self.base), ids, mask, pos, cache)
            finally:
                self.router.names = None

    def _prefill(self, rows: list[Row]) -> None:
        ids, mask, pos = left_padded([r.prompt_ids for r in rows], self.pad_id, self.device)
        logits, cache = self._forward(ids, mask, pos, None, [r.adapter_key for r in rows])
        batch = Batch(rows, cache, mask, last=None, pos=pos[:, -1])
        tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        batch.advance(self._feed(tokens))
        self.stats["prefills"] += 1
        self._accept(rows, tokens)
        if self._running is None:
            self._running = batch
        else:
            self._running.merge(batch)
            self.stats["joins"] += 1
        self._evict()

    def _decode_step(self) -> None:
        batch = self._running
        ids, mask, pos = batch.step_inputs()
        names = batch.adapter_names
        logits, batch.cache = self._forward(ids, mask, pos, batch.cache, names)
        rows = batch.rows
        tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        batch.advance(self._feed(tokens))
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self.stats["mixed_steps"] += len(set(names)) > 1
        self._accept(rows, tokens)
        self._evict()

    def _feed(self, tokens: list[int | RowFailure]) -> list[int]:
        """The tokens each row feeds next; a failed row (leaving at once) feeds padding."""
        return [self.pad_id if isinstance(t, RowFailure) else t for t in tokens]

    def _accept(self, rows: list[Row], tokens: list[int | RowFailure]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            if isinstance(token, RowFailure):
                self._fail_row(row, token)
                continue
            if row.cancelled:
                row.finish_reason = "cancelled"
            else:
                self._advance_row(row, token)
            if row.done:
                self._finish(row)
            else:
                self._send_text(row, row.tracker.take())

    def _advance_row(self, row: Row, token: int) -> None:
        row.generated += 1
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.tracker.add(token)
        if row.tracker.stopped:
            row.finish_reason = "stop"
        elif row.generated >= row.max_new:
            row.finish_reason = "length"

    def _send_text(self, row: Row, text: str) -> None:
        if text:
            row.emit({"type": "text", "text": text})

    def _finish(self, row: Row) -> None:
        row.tracker.flush()
        self._send_text(row, row.tracker.take(final=True))
        row.emit(
            {
                "type": "done",
                "finish_reason": row.finish_reason,
                "prompt_tokens": len(row.prompt_ids),
                "completion_tokens": row.generated,
            }
        )
        self._release(row)

    def _fail_row(self, row: Row, reason: str) -> None:
        """End one row with an error; it leaves the batch at the next eviction."""
        self.stats["row_failures"] += 1
        used = f"the adapter {row.version.name!r}" if row.version else "the base model"
        log.warning("request %s failed alone (%s): %s", row.id, used, reason)
        row.finish_reason = "error"
        row.emit(
            {
                "type": "error",
                "message": f"Generation failed for this request with {used}: {reason}. "
                "Other requests were not affected.",
                "kind": "row",
            }
        )
        self._release(row)

    def _release(self, row: Row) -> None:
        if row.version is not None:
            self.adapters.release(row.version)
            if row.version.on_demand:
                self._trim_lru()
            row.version = None

    def _evict(self) -> None:
        batch = self._running
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        if not keep:
            self._running = None
        else:
            batch.keep(keep)
        self._collect()

    def _fail(self, rows: list[Row], exc: Exception | None) -> None:
        message = f"{type(exc).__name__}: {exc}" if exc else "The instance is shutting down."
        for row in rows:
            if row.done:
                continue
            row.finish_reason = "error"
            row.emit({"type": "error", "message": message})
            self._release(row)
        self._running = None
        with self._cond:
            if exc is None:
                self._waiting.clear()
