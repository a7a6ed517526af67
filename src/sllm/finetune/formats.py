"""Row formats of the training data, and which of their tokens carry the loss.

`dataset_config.format` is one of:

- `text`: one column (`tokenization_field`) of text; every token is trained on (as before).
- `chat`: OpenAI's chat fine-tuning rows, `{"messages": [{"role", "content", "weight"?}, ...]}`
  with roles system/user/assistant, rendered with the base model's own chat template. The loss
  is on the assistant messages (their content and the template's end-of-turn marker), except
  those with `weight: 0`.
- `prompt_completion`: `{"prompt", "completion"}`; the prompt becomes the user turn of the chat
  template (when the model has one and `use_chat_template` is not false), else prompt and
  completion are concatenated and EOS appended. The loss is on the completion.
- `auto` (default): `chat` when rows have `messages`, `prompt_completion` when they have `prompt`
  and `completion`, else `text`.

`train_on_inputs: true` puts the loss on every token. Rows come out as `input_ids` and `labels`
(-100 where no loss), which the collators (`sllm.finetune.packing`) use as they are.

How the answer's tokens are found, exactly: the whole conversation is rendered and tokenized
once; for each trained assistant message the conversation up to it (with the generation prompt)
and up to its end are rendered too, must be string prefixes of the whole (else the template
rewrites history and the row is refused), and are tokenized; their token counts are the answer's
bounds when their tokens are a prefix of the whole's. Where a token merges across a bound (rare:
chat templates put special tokens there), the longest common token prefix decides and the merged
token counts as answer. Pieces are never tokenized separately and glued together. A template
that rewrites earlier turns (a reasoning model dropping old thoughts) is refused unless it marks
the answers with `{% generation %}`, whose `return_assistant_tokens_mask` is then used (as TRL's
`assistant_only_loss` does).

`check_row` and `detect_format` are cheap and pure (no tokenizer): the submit-time scan and the
Files API call them line by line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import DS, DatasetConfig

TEXT = "text"
CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
FORMATS = ("auto", TEXT, CHAT, PROMPT_COMPLETION)
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "weight"})
IGNORE = -100


# ------------------------------------------------------------------------------- shape checks


def detect_format(row: Mapping[str, Any]) -> str:
    """The format a row's keys say it is in: chat, prompt_completion or text."""
    if "messages" in row:
        return CHAT
    if "prompt" in row and "completion" in row:
        return PROMPT_COMPLETION
    return TEXT


def format_of_columns(columns: list[str] | set[str]) -> str:
    """`detect_format` for a table's column names."""
    return detect_format(dict.fromkeys(columns))


def check_row(row: Any, fmt: str, field: str | None = None) -> str | None:
    """What is wrong with one row for format `fmt` (chat, prompt_completion, text), in words
    that quote no value from the row; None when it can be trained on."""
    if not isinstance(row, Mapping):
        return "not a JSON object"
    if fmt == CHAT:
        return check_messages(row.get("messages"))
    if fmt == PROMPT_COMPLETION:
        for key in ("prompt", "completion"):
            if key not in row:
                return f"no {key!r} key (prompt_completion rows have 'prompt' and 'completion')"
            if not isinstance(row[key], str):
                return f"{key!r} must be a string, found {_kind(row[key])}"
        if not row["completion"]:
            return "'completion' is empty; nothing to learn from"
        return None
    if field is None:
        return "`tokenization_field` names no column (text rows need it)"
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        return f"column {field!r} holds {_kind(value)}, not text"
    return None


def check_messages(messages: Any) -> str | None:
    """`messages` is a non-empty list of {role, content, weight?} with a trainable answer."""
    shape = "`messages` must be a non-empty list of {role, content} objects"
    if not isinstance(messages, list) or not messages:
        return f"{shape}, found {_kind(messages)}" if messages != [] else f"{shape}, found []"
    learnable = False
    for i, m in enumerate(messages, 1):
        if not isinstance(m, Mapping):
            return f"{shape}; message {i} is {_kind(m)}"
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            return f"message {i} has no {missing[0]!r}"
        extra = sorted(set(m) - MESSAGE_KEYS)
        if extra:
            return (
                f"message {i} has key {extra[0][:40]!r}; messages hold only role, content and "
                "weight (tools and multi-part content are not supported)"
            )
        if m["role"] not in ROLES:
            return f"message {i} has an unknown role (roles: {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i}: content must be a string, found {_kind(m['content'])}"
        if "weight" in m:
            if m["role"] != "assistant":
                return f"message {i}: only assistant messages take a weight"
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f"message {i}: weight must be 0 or 1"
        if m["role"] == "assistant" and m.get("weight", 1) != 0:
            learnable = True
    if not learnable:
        return "no assistant message to learn from (every answer is missing or has weight 0)"
    return None


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    names.update({dict: "an object", str: "a string", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def resolve_format(ds: DatasetConfig, columns: list[str]) -> str:
    """The configured format, or the one `columns` imply under `auto`; the columns it needs
    must be there (a 400 naming the field otherwise)."""
    fmt = ds.format if ds.format != "auto" else format_of_columns(columns)
    needed = {CHAT: ["messages"], PROMPT_COMPLETION: ["prompt", "completion"]}.get(fmt)
    if needed is None:
        needed = [ds.tokenization_field] if ds.tokenization_field else []
        if not needed:
            raise InvalidRequestError(
                f"`{DS}.tokenization_field` is required for text rows (the data has no "
                "`messages` column for chat, nor `prompt` and `completion`); name the column of "
                "text to train on, or set `format`.",
                param=f"{DS}.tokenization_field",
            )
    missing = [c for c in needed if c not in columns]
    if missing:
        param = f"{DS}.tokenization_field" if fmt == TEXT else f"{DS}.format"
        raise InvalidRequestError(
            f"`{param}`: {fmt} rows need the column {missing[0]!r}; the data's columns: "
            f"{', '.join(map(repr, columns)) or '(none)'}.",
            param=param,
        )
    return fmt


# ------------------------------------------------------------------------------- tokenizing


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class ChatTemplateError(ValueError):
    """The chat template cannot render a row incrementally (it rewrites earlier turns)."""


class RowTokenizer:
    """Rows of one format -> (input_ids, labels, merged): tokens, their loss labels (-100: no
    loss), and whether a token merged across a prompt/answer bound."""

    def __init__(
        self, tokenizer, fmt: str, *, field: str | None = None, train_on_inputs: bool = False,
        use_chat_template: bool = True,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.field = field
        self.train_on_inputs = train_on_inputs
        self.chat = fmt == CHAT or (
            fmt == PROMPT_COMPLETION and use_chat_template and has_chat_template(tokenizer)
        )

    def __call__(self, row: Mapping[str, Any]) -> tuple[list[int], list[int], bool]:
        if self.fmt == TEXT:
            return self._text(row.get(self.field) or "")
        if self.fmt == PROMPT_COMPLETION and not self.chat:
            return self._concatenated(row["prompt"], row["completion"])
        messages = row["messages"] if self.fmt == CHAT else _as_messages(row)
        return self._chat(messages)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _text(self, text: str) -> tuple[list[int], list[int], bool]:
        """As the baseline trains: every token, except those equal to the pad token."""
        ids = self._encode(text, special=True)
        pad = self.tokenizer.pad_token_id
        return ids, [IGNORE if t == pad else t for t in ids], False

    def _concatenated(self, prompt: str, completion: str) -> tuple[list[int], list[int], bool]:
        ids = self._encode(prompt + completion, special=True)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        start, merged = _bound(self._encode(prompt, special=True), ids, inclusive=False)
        labels = list(ids) if self.train_on_inputs else [IGNORE] * start + ids[start:]
        return ids, labels, merged

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chat(self, messages: list[Mapping[str, Any]]) -> tuple[list[int], list[int], bool]:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self._render(plain, False)
        ids = self._encode(full)
        if self.train_on_inputs:
            return ids, list(ids), False
        labels = [IGNORE] * len(ids)
        merged = False
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("weight", 1) == 0:
                continue
            before = self._render(plain[:i], True)
            after = self._render(plain[: i + 1], False).rstrip()
            prefixes = full.startswith(before) and full.startswith(after)
            if not (prefixes and len(after) >= len(before)):
                return self._generation_masked(plain, messages)
            start, m1 = _bound(self._encode(before), ids, inclusive=False)
            end, m2 = _bound(self._encode(after), ids, inclusive=True)
            labels[start:end] = ids[start:end]
            merged = merged or m1 or m2
        return ids, labels, merged

    def _generation_masked(self, plain, messages) -> tuple[list[int], list[int], bool]:
        """For a template that rewrites earlier turns (reasoning models drop old thoughts):
        the template's own `{% generation %}` marks, if it has them, give the answers' tokens
        (`return_assistant_tokens_mask`); one marked run per assistant message."""
        why = (
            "the model's chat template renders a conversation's earlier turns differently once "
            "later turns follow, and marks no answers with {% generation %}, so the answers' "
            "tokens cannot be located exactly"
        )
        if not _GENERATION_TAG.search(self.tokenizer.chat_template or ""):
            raise ChatTemplateError(why)
        out = self.tokenizer.apply_chat_template(
            plain, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        runs = _runs(mask)
        answers = [m for m in messages if m["role"] == "assistant"]
        if len(runs) != len(answers):
            raise ChatTemplateError(why.replace("marks no answers", "does not mark each answer"))
        labels = [IGNORE] * len(ids)
        for (start, end), m in zip(runs, answers, strict=True):
            if m.get("weight", 1) != 0:
                labels[start:end] = ids[start:end]
        return ids, labels, False


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _as_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]


def _bound(prefix: list[int], ids: list[int], *, inclusive: bool) -> tuple[int, bool]:
    """Where `prefix` (the tokens of a string prefix of the text `ids` encode) ends in `ids`, and
    whether a token merged across that point (then the merged token goes to the answer side:
    after a start bound, before an end bound)."""
    n = 0
    limit = min(len(prefix), len(ids))
    while n < limit and prefix[n] == ids[n]:
        n += 1
    if n == len(prefix):
        return n, False
    return (min(n + 1, len(ids)) if inclusive else n), True


# ------------------------------------------------------------------------------- the dataset


def prepare_dataset(ds_cfg: DatasetConfig, tokenizer, max_seq_length: int, *, num_proc: int = 1):
    """Load `ds_cfg`'s rows and tokenize them by format -> (dataset of `input_ids` + `labels`,
    stats). Rows longer than `max_seq_length` are cut there (counted); rows left with no token
    to learn from are dropped (counted). A 400 when the data does not fit the format."""
    from sllm.finetune.data import load_training_dataset

    dataset = load_training_dataset(ds_cfg)
    return tokenize_rows(dataset, ds_cfg, tokenizer, max_seq_length, num_proc=num_proc)


def tokenize_rows(dataset, ds_cfg: DatasetConfig, tokenizer, max_seq_length: int, *, num_proc=1):
    """`prepare_dataset` for rows already loaded (a `datasets.Dataset`)."""
    columns = list(dataset.column_names)
    fmt = resolve_format(ds_cfg, columns)
    if len(dataset) == 0:
        raise InvalidRequestError("The dataset is empty; nothing to train on.", param=DS)
    if fmt == CHAT and not has_chat_template(tokenizer):
        raise InvalidRequestError(no_template_message(), param=f"{DS}.format")
    encode = RowTokenizer(
        tokenizer, fmt, field=ds_cfg.tokenization_field, train_on_inputs=ds_cfg.train_on_inputs,
        use_chat_template=ds_cfg.use_chat_template,
    )  # fmt: skip
    tokenize = _TokenizeBatch(encode, columns, fmt, ds_cfg.tokenization_field, max_seq_length)
    tokenized = dataset.map(
        tokenize,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 10_000 else None,
        desc="Tokenizing",
    )
    kept = tokenized.filter(_trainable, desc="Dropping rows without loss")
    stats = _stats(fmt, encode.chat, tokenized, kept)
    if len(kept) == 0:
        what = (
            f"every row of column {ds_cfg.tokenization_field!r} is empty"
            if fmt == TEXT
            else f"every answer is empty or cut off by max_seq_length {max_seq_length}"
        )
        raise InvalidRequestError(
            f"`{DS}`: no row has a token to train on after tokenization ({what}); nothing to "
            "train on.",
            param=DS,
        )
    return kept.remove_columns(["_cut", "_merged"]), stats


class _TokenizeBatch:
    """`Dataset.map`'s function. An object of a module-level class holding plain values, not a
    closure: `datasets` hashes the function for the cache fingerprint (which decides whether a
    checkpoint is resumed), and a closure's hash takes in module globals whose set-ordering
    differs from process to process."""

    def __init__(self, encode: RowTokenizer, columns, fmt, field, max_seq_length: int) -> None:
        self.encode = encode
        self.columns = list(columns)
        self.fmt = fmt
        self.field = field
        self.max_seq_length = max_seq_length

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "_cut": [], "_merged": []}
        for n, i in enumerate(indices):
            row = {c: batch[c][n] for c in self.columns}
            problem = check_row(row, self.fmt, self.field)
            if problem:
                raise InvalidRequestError(f"`{DS}`: row {i + 1}: {problem}.", param=DS)
            try:
                ids, labels, merged = self.encode(row)
            except ChatTemplateError as exc:
                raise InvalidRequestError(f"`{DS}`: row {i + 1}: {exc}.", param=DS) from None
            out["_cut"].append(len(ids) > self.max_seq_length)
            out["input_ids"].append(ids[: self.max_seq_length])
            out["labels"].append(labels[: self.max_seq_length])
            out["_merged"].append(merged)
        return out


def _trainable(row: dict[str, Any]) -> bool:
    """At least two tokens and a label after the first (the first token is never predicted)."""
    return len(row["input_ids"]) > 1 and any(t != IGNORE for t in row["labels"][1:])


def _stats(fmt: str, chat: bool, tokenized, kept) -> dict[str, Any]:
    loss = sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in kept["labels"])
    return {
        "format": fmt,
        "chat_template": chat,
        "num_rows": len(tokenized),
        "num_train_rows": len(kept),
        "dropped_rows": len(tokenized) - len(kept),
        "truncated_rows": int(sum(tokenized["_cut"])),
        "boundary_merges": int(sum(tokenized["_merged"])),
        "tokens_per_epoch": int(sum(len(ids) for ids in kept["input_ids"])),
        "loss_tokens_per_epoch": int(loss),
    }


def no_template_message() -> str:
    return (
        f"`{DS}.format`: chat rows are rendered with the base model's chat template, and this "
        "model has none (no `chat_template` in its tokenizer files). Use a chat model, or "
        "give the data as text (`format: text` with `tokenization_field`) or as "
        "`prompt_completion` rows, which are concatenated when the model has no template."
    )


def report_dataset(reporter, stats: dict[str, Any], max_seq_length: int) -> None:
    """The job's events about its data: what is trained on, and a warning for cut rows."""
    fmt = stats["format"] + (" (chat template)" if stats["chat_template"] else "")
    reporter.event(
        "info",
        f"Dataset ready: {stats['num_train_rows']} of {stats['num_rows']} rows to train on, "
        f"{fmt}, {stats['tokens_per_epoch']:,} tokens per epoch of which "
        f"{stats['loss_tokens_per_epoch']:,} carry loss (max_seq_length {max_seq_length}).",
        {**stats, "max_seq_length": max_seq_length},
    )
    if stats["truncated_rows"]:
        reporter.event(
            "warning",
            f"{stats['truncated_rows']} of {stats['num_rows']} rows are longer than "
            f"max_seq_length ({max_seq_length}) and were cut there"
            + (
                f"; {stats['dropped_rows']} rows had nothing left to learn from and were dropped"
                if stats["dropped_rows"]
                else ""
            )  # fmt: skip
            + ". Raise `backend_config.max_seq_length` to train on whole rows.",
            {"truncated_rows": stats["truncated_rows"], "max_seq_length": max_seq_length},
        )


# ------------------------------------------------------------------------------- at submit


def model_has_chat_template(model_dir) -> bool:
    """The stored model's tokenizer files carry a chat template (read without loading it)."""
    import json
    from pathlib import Path

    model_dir = Path(model_dir)
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def implied_steps(rows: int, training_config: Mapping[str, Any]) -> int:
    """Optimizer steps a run over `rows` rows takes under `training_config` (as the Trainer
    counts them for padded or padding-free batches; token-budget batches differ)."""
    import math

    max_steps = training_config.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    batch = int(training_config.get("per_device_train_batch_size") or 8)
    accumulation = int(training_config.get("gradient_accumulation_steps") or 1)
    epochs = float(training_config.get("num_train_epochs") or 3.0)
    per_epoch = max(math.ceil(rows / batch) // accumulation, 1)
    return math.ceil(per_epoch * epochs)


def submit_note(summary: Mapping[str, Any], training_config: Mapping[str, Any]):
    """(sentence, data) for the job's first event: rows, estimated tokens, implied steps."""
    rows = summary.get("rows")
    if not rows:
        return None
    tokens = summary.get("estimated_tokens")
    steps = implied_steps(rows, training_config)
    more = "" if summary.get("complete", True) else " at least"
    sentence = (
        f"Data:{more} {rows:,} {summary.get('format')} rows"
        + (f", about {tokens:,} tokens" if tokens else "")
        + f"; the config implies about {steps:,} steps."
    )
    return sentence, {**summary, "implied_steps": steps}
