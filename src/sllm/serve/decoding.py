"""Per-request decoding: sampling parameters, next-token choice, and text with stop strings.

Every row of a batch keeps its own `torch.Generator` (seeded from the request's `seed`), so a
seeded request samples the same tokens whether it runs alone or beside others.

Each row's choice is its own: a row whose scores are not usable (NaN or +Inf logits, e.g. from an
adapter whose weights went non-finite) gets a `RowFailure` instead of a token, and the other rows
of the batch go on untouched. Temperatures below `GREEDY_BELOW` are greedy (as in vLLM): dividing
by them only amplifies float noise, and `1e-300` would overflow to Inf. Sampling scales the
logits after subtracting their maximum, so no finite temperature can overflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A UTF-8 character spans at most 4 byte tokens; text that still ends in U+FFFD after that many
# tokens holds invalid bytes for good and is sent as it is (else it would wait until the end).
MAX_CHAR_TOKENS = 4
# Temperatures below this decode greedily (documented in the wire model and the README).
GREEDY_BELOW = 1e-5


class RowFailure(str):
    """What `choose_tokens` returns for a row it cannot decode: the reason, for that request."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature >= GREEDY_BELOW  # NaN, too: never divide by it


def make_generator(params: SamplingParams, device: Any):
    """A generator for sampling rows (None for greedy ones)."""
    import torch

    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def choose_tokens(logits, params: list[SamplingParams], generators: list) -> list[int | RowFailure]:
    """Next token of every row: argmax for greedy rows, top-p sampling with the row's generator;
    a `RowFailure` for a row whose logits or probabilities are not finite (-Inf alone marks an
    impossible token; NaN, +Inf or a row without any finite score is unusable)."""
    import torch

    usable = (~(logits.isnan() | logits.isposinf()).any(dim=-1)) & logits.isfinite().any(dim=-1)
    greedy, ok = torch.stack([logits.argmax(dim=-1), usable.long()]).tolist()  # one device sync
    out: list[int | RowFailure] = []
    for i, p in enumerate(params):
        if not ok[i]:
            out.append(RowFailure("the model produced non-finite scores (NaN or Inf)"))
        elif p.greedy:
            out.append(int(greedy[i]))
        else:
            out.append(_sample(logits[i].float(), p, generators[i]))
    return out


def _sample(row, p: SamplingParams, generator) -> int | RowFailure:
    """Top-p sampling of one row; logits minus their max are <= 0, so scaling cannot overflow."""
    import torch

    scaled = (row - row.max()) / p.temperature
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        probs = _top_p(probs, p.top_p)
    if bool(~probs.isfinite().all() | ~(probs.sum() > 0)):  # e.g. an infinite temperature
        return RowFailure(f"sampling at temperature {p.temperature:g} gave no usable probabilities")
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _top_p(probs, top_p: float):
    import torch

    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop = cumulative - sorted_probs >= top_p  # keeps at least the most likely token
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


class TextTracker:
    """Incremental detokenization of one row's generated ids, with stop strings held back.

    `add` takes one token id; `take` returns the text that may be sent now. Text that could be the
    start of a stop string is held until it is known not to be one. Once a stop string appears,
    the text is cut before it and `stopped` is set.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0
        self._read = 0
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        pending = len(self.ids) - self._read
        if len(new_text) <= len(prefix_text) or (
            new_text.endswith("\ufffd") and pending < MAX_CHAR_TOKENS
        ):
            return  # maybe an incomplete character: wait for the next token(s)
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._check_stops(before)

    def flush(self) -> None:
        """At the end: keep whatever the last tokens decode to, even an incomplete character."""
        if self.stopped or self._read == len(self.ids):
            return
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self._check_stops(before)

    def _check_stops(self, before: int) -> None:
        if not self.stops:
            return
        start = max(0, before - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(self.text) - self._sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def take(self, final: bool = False) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        if end <= self._sent:
            return ""
        out = self.text[self._sent : end]
        self._sent = end
        return out
