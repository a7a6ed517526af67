"""The running batch of an engine: rows, their KV cache, and the cache surgery that lets rows
leave (finished) and join (newly prefilled) between decoding steps.

Rows are left-padded: column t of `mask` is 1 where row i has a real token at cache slot t.
Positions are per row (the count of real tokens before it), so padding never shifts a row's
positions and a row computes the same logits alone or in a batch (up to float rounding).
Joining needs a cache whose layers are plain `DynamicLayer`s (keys/values of shape
[batch, heads, time, dim]); with other caches (sliding windows) new rows wait for the batch to
drain instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sllm.serve.decoding import SamplingParams, TextTracker

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Row:
    """One request while it is decoded."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_key: str  # peft internal adapter name, or BASE
    emit: Callable[[dict], None]
    tracker: TextTracker
    max_new: int
    generator: Any = None
    version: Any = None  # the adapter version it holds a reference on
    generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@lru_cache(maxsize=8)
def _cache_kwarg(model_cls: type) -> str:
    """transformers >= 5 calls the KV cache `cache`; earlier versions `past_key_values`."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@lru_cache(maxsize=8)
def _takes_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


class AdapterRouter:
    """Hands every LoRA layer the batch's per-row adapter names, as peft's `adapter_names=`
    does, but through hooks attached once per adapter change instead of on every forward pass
    (peft walks all modules twice per call; that was a fifth of a decoding step on tiny models).
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self._handles: list[Any] = []

    def attach(self, peft_model: Any) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for handle in self._handles:
            handle.remove()
        self._handles = [
            m.register_forward_pre_hook(self._hook, with_kwargs=True)
            for m in peft_model.modules()
            if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))
        ]

    def _hook(self, module, args, kwargs):
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs


def run_forward(model, base_cls: type, ids, mask, pos, cache):
    """One forward pass; returns (last-position logits [B, V] in float32, the updated cache)."""
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "use_cache": True,
        _cache_kwarg(base_cls): cache,
    }
    if _takes_logits_to_keep(base_cls):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.logits[:, -1, :].float(), new_cache


class Batch:
    def __init__(self, rows: list[Row], cache: Any, mask, last, pos) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, T] long
        self.last = last  # [B] long: the token each row feeds next
        self.pos = pos  # [B] long: that token's position

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def adapter_names(self) -> list[str]:
        return [r.adapter_key for r in self.rows]

    def joinable(self) -> bool:
        layers = getattr(self.cache, "layers", None)
        return layers is not None and all(type(x).__name__ == "DynamicLayer" for x in layers)

    def step_inputs(self):
        import torch

        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.last[:, None], self.mask, self.pos[:, None]

    def advance(self, tokens: list[int]) -> None:
        import torch

        self.last = torch.tensor(tokens, dtype=torch.long, device=self.pos.device)
        self.pos = self.pos + 1

    def keep(self, indices: list[int]) -> None:
        """Drop every row not in `indices` (finished or cancelled), then unused padding."""
        import torch

        if len(indices) == len(self.rows):
            return
        idx = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.mask, self.last, self.pos = self.mask[idx], self.last[idx], self.pos[idx]
        if hasattr(self.cache, "batch_select_indices"):
            self.cache.batch_select_indices(idx)
        else:  # pragma: no cover - older caches
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self._trim()

    def _trim(self) -> None:
        """Remove leading cache slots that no row uses any more."""
        if not self.rows or not self.joinable():
            return
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:, :]
            layer.values = layer.values[:, :, start:, :]

    def merge(self, other: Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.last = torch.cat([self.last, other.last])
        self.pos = torch.cat([self.pos, other.pos])
        self.rows = self.rows + other.rows


def _pad_left(t, width: int):
    """Zero-pad the time axis (dim 2 of a [B, H, T, D] cache tensor, dim 1 of a mask) to width."""
    import torch

    axis = 1 if t.dim() == 2 else 2
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def left_padded(prompts: list[list[int]], pad_id: int, device: Any):
    """(ids, mask, positions) tensors for a prefill of `prompts`."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)
