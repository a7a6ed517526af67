"""Padding-free batching: sequences concatenated into one row, attention kept inside each sequence.

A padded batch of rows of 20-400 tokens spends a third or more of its FLOPs on padding. Here a
batch becomes one row `[1, sum(lengths)]` with `position_ids` restarting at 0 for every sequence,
the first label of every sequence masked (so no token is trained to predict the next sequence),
and the sequence boundaries handed to the attention function registered below, which attends
only within each sequence:

- on CUDA with half-precision inputs, one call to PyTorch's FlashAttention varlen kernel
  (`torch.nn.attention.varlen`) when this torch has it;
- otherwise one causal `scaled_dot_product_attention` per sequence (no quadratic cost in the
  packed length, no dense mask);
- for a compiled model (`backend_config.compile`) where the varlen kernel is out (CPU, float32):
  one SDPA call with a block-diagonal causal mask built from the boundaries tensor. Its memory
  grows with the square of the packed length, but it has no per-sequence Python, so one compiled
  graph serves every batch (the loop's list of lengths would recompile the graph per batch).

The boundaries travel as extra keyword arguments of the model's `forward`, which transformers
passes down to the attention function untouched. Whether an architecture honours all of this
(reset positions, our attention function, the kwargs) is not assumed from its name: `probe`
compares per-sequence logits of a packed forward with separate forwards on the real model.

Token-budget batching (the opt-in throughput mode) groups rows into packs of at most N tokens
(`build_packs`); each pack is one padding-free row (or, where packing is unsupported, a padded
batch of rows of similar length).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

ATTN_IMPLEMENTATION = "sllm_varlen"
# Extra model kwargs (names no transformers code reads).
SEQ_LENS = "sllm_seq_lens"  # python list of ints: the loop kernel (no host-device sync)
CU_SEQLENS = "sllm_cu_seqlens"  # int32 tensor [n+1]: the varlen kernel
MAX_SEQLEN = "sllm_max_seqlen"  # python int, upper bound on a sequence's length
NUM_TOKENS = "sllm_num_tokens"  # python int: processed (non-pad) tokens; popped before the model
LOSS_TOKENS = "sllm_loss_tokens"  # python int: tokens that carry loss; popped before the model

KERNEL = "sllm_kernel"  # str: which of the kernels below the collator prepared the batch for

KERNEL_LOOP = "sdpa_loop"
KERNEL_VARLEN = "flash_varlen"
KERNEL_MASK = "sdpa_mask"


# ------------------------------------------------------------------------------- attention


_VARLEN: tuple[Any, tuple[str, ...]] | None = None


def _torch_varlen():
    """(varlen_attn, its keyword names) from this torch, or (None, ()) where it has none.

    Looked up once, outside any compiled region (the attention function only reads the result).
    """
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn

            names = tuple(inspect.signature(varlen_attn).parameters)
        except Exception:  # noqa: BLE001 - older torch: no varlen kernel
            varlen_attn, names = None, ()
        _VARLEN = (varlen_attn, names)
    return _VARLEN


def varlen_kernel_available(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    fn, names = _torch_varlen()
    return fn is not None and ("is_causal" in names or "window_size" in names)


def _repeat_kv(x, n_rep: int):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _tokens_first(x, dtype):
    return x[0].transpose(0, 1).to(dtype).contiguous()


def _flash_varlen(query, key, value, cu_seqlens, max_seqlen: int, scaling, n_rep: int):
    """query/key/value [1, H, T, D] -> [1, T, H, D] through torch's FlashAttention varlen kernel."""
    import torch

    fn, names = _torch_varlen()
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    if dtype not in (torch.float16, torch.bfloat16):
        return None  # FlashAttention needs half precision; the caller loops instead
    kwargs: dict[str, Any] = {}
    if "scale" in names:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
        return None  # this torch's kernel has no scale argument: loop instead
    q = _tokens_first(query, dtype)  # [T, H, D]; plain statements keep torch.compile's tracer fast
    k = _tokens_first(key, dtype)
    v = _tokens_first(value, dtype)
    if n_rep > 1:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
    if "is_causal" in names:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    out = fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return out.unsqueeze(0)


def _sdpa_per_sequence(query, key, value, seq_lens, dropout: float, scaling, n_rep: int):
    """One causal SDPA call per sequence of the packed row; [1, H, T, D] -> [1, T, H, D]."""
    import torch
    import torch.nn.functional as F

    outs = []
    start = 0
    for length in seq_lens:
        end = start + int(length)
        q = query[:, :, start:end]
        k = _repeat_kv(key[:, :, start:end], n_rep)
        v = _repeat_kv(value[:, :, start:end], n_rep)
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling
            )
        )
        start = end
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _sdpa_block_mask(query, key, value, cu_seqlens, dropout: float, scaling, n_rep: int):
    """One SDPA call over the packed row with a block-diagonal causal mask; [1, T, H, D] out."""
    import torch
    import torch.nn.functional as F

    length = query.shape[2]
    pos = torch.arange(length, device=query.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)  # sequence per token
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(
        query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous()


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    **kwargs,
):
    """A transformers attention function (`AttentionInterface`) that never attends across the
    sequences of a packed row. Without packing kwargs it is plain causal SDPA over each row: the
    mask machinery is skipped for this implementation, and with right padding (the only kind the
    backend makes) the pads come after every real token, so causal attention alone is exact."""
    import torch.nn.functional as F

    n_rep = query.shape[1] // key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} attention supports causal (decoder) attention only"
        )
    seq_lens = kwargs.get(SEQ_LENS)
    cu_seqlens = kwargs.get(CU_SEQLENS)
    if cu_seqlens is not None and kwargs.get(KERNEL) == KERNEL_MASK:
        if query.shape[0] != 1:
            raise ValueError("packed batches must be a single row")
        return _sdpa_block_mask(query, key, value, cu_seqlens, dropout, scaling, n_rep), None
    if cu_seqlens is not None and query.is_cuda and dropout == 0.0:
        out = _flash_varlen(query, key, value, cu_seqlens, int(kwargs[MAX_SEQLEN]), scaling, n_rep)
        if out is not None:
            return out, None
    if seq_lens is None and cu_seqlens is not None:
        seq_lens = cu_seqlens.diff().tolist()  # a host sync: only when the fast paths are out
    if seq_lens is not None:
        if query.shape[0] != 1:
            raise ValueError("packed batches must be a single row")
        return _sdpa_per_sequence(query, key, value, seq_lens, dropout, scaling, n_rep), None
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(
        query, k, v, dropout_p=dropout, is_causal=query.shape[2] > 1, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make `sllm_varlen` a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention)
    return ATTN_IMPLEMENTATION


# ------------------------------------------------------------------------------- collators


def _labels_for(
    ids: list[int], pad_token_id: int | None, given: list[int] | None = None
) -> list[int]:
    """The row's own labels (`sllm.finetune.formats`: -100 where no loss) when it has them, else
    as the padded baseline makes them (`DataCollatorForLanguageModeling`: tokens equal to the pad
    token are not trained on); the first token masked either way: in a packed row, the previous
    sequence's last token would predict it."""
    labels = list(given) if given is not None else [-100 if t == pad_token_id else t for t in ids]
    if labels:
        labels[0] = -100
    return labels


def _rows_of(features: list[dict[str, Any]]) -> list[tuple[list[int], list[int] | None]]:
    """(ids, labels or None) of every sequence in the features (rows, or token-budget packs)."""
    rows: list[tuple[list[int], list[int] | None]] = []
    for f in features:
        if "rows" in f:  # a token-budget pack
            labels = f.get("labels") or [None] * len(f["rows"])
            for r, lab in zip(f["rows"], labels, strict=True):
                rows.append((list(r), None if lab is None else list(lab)))
        else:
            labels = f.get("labels")
            rows.append((list(f["input_ids"]), None if labels is None else list(labels)))
    return [(r, lab) for r, lab in rows if r]


def pop_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """Take the host-side counts (processed tokens, loss tokens) out of a collated batch, leaving
    what the model's forward takes."""
    return int(batch.pop(NUM_TOKENS, 0) or 0), int(batch.pop(LOSS_TOKENS, 0) or 0)


def _loss_tokens(labels: list[int]) -> int:
    return sum(1 for t in labels if t != -100)


class FlatCollator:
    """Rows (or packs of rows) -> one padding-free row with per-sequence positions and labels."""

    def __init__(
        self, pad_token_id: int | None, kernel: str = KERNEL_LOOP, max_seqlen: int | None = None
    ) -> None:
        self.pad_token_id = pad_token_id
        self.kernel = kernel
        # A fixed upper bound on a sequence's length (a compiled model: a Python int that changed
        # from batch to batch could recompile its graph), else each batch's own, rounded up.
        self.max_seqlen = max_seqlen

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = _rows_of(features)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row, given in rows:
            ids += row
            labels += _labels_for(row, self.pad_token_id, given)
            positions += range(len(row))
        lengths = [len(r) for r, _ in rows]
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            NUM_TOKENS: len(ids),
            LOSS_TOKENS: _loss_tokens(labels),
        }
        if self.kernel in (KERNEL_VARLEN, KERNEL_MASK):
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            batch[CU_SEQLENS] = torch.tensor(cu, dtype=torch.int32)
            longest = max(lengths)
            if self.max_seqlen is not None and self.max_seqlen >= longest:
                batch[MAX_SEQLEN] = self.max_seqlen
            else:
                batch[MAX_SEQLEN] = -(-longest // 64) * 64
            batch[KERNEL] = self.kernel
        else:
            batch[SEQ_LENS] = lengths
        return batch


class PaddedCollator:
    """The baseline's batching (`DataCollatorForLanguageModeling`, right padding), plus the count
    of processed and loss-carrying tokens; packs of rows (token-budget mode where packing is
    unsupported) are padded the same way. Rows that carry `labels` keep them (padded with -100)."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = _rows_of(features)
        if any(given is not None for _, given in rows):
            batch = self._pad(rows)
        else:
            plain = [{"input_ids": r, "attention_mask": [1] * len(r)} for r, _ in rows]
            batch = dict(self.inner(plain))
        batch[NUM_TOKENS] = int(batch["attention_mask"].sum())
        batch[LOSS_TOKENS] = int((batch["labels"][:, 1:] != -100).sum())
        return batch

    def _pad(self, rows: list[tuple[list[int], list[int] | None]]) -> dict[str, Any]:
        import torch

        width = max(len(r) for r, _ in rows)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids, labels, mask = [], [], []
        for row, given in rows:
            fill = width - len(row)
            ids.append(row + [pad] * fill)
            labels.append(_labels_for(row, self.pad_token_id, given) + [-100] * fill)
            mask.append([1] * len(row) + [0] * fill)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


# ------------------------------------------------------------------------------- token budget


def build_packs(lengths: list[int], budget: int, *, seed: int, padded: bool) -> list[list[int]]:
    """Row indices grouped so that each group costs at most `budget` tokens.

    Padding-free (`padded=False`): rows in a seeded random order fill each pack in turn (a pack
    costs the sum of its lengths). Padded: rows sorted by length fill each group while
    rows x longest <= budget (a group costs that), so little goes to padding; groups are then
    shuffled. A row longer than the budget gets a group of its own.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if padded:
        order.sort(key=lambda i: lengths[i])
    else:
        rng.shuffle(order)
    packs: list[list[int]] = []
    current: list[int] = []
    cost = 0
    for i in order:
        n = lengths[i]
        # sorted ascending when padded, so the newest row is the group's longest
        new_cost = (len(current) + 1) * n if padded else cost + n
        if current and new_cost > budget:
            packs.append(current)
            current, cost = [], 0
            new_cost = n
        current.append(i)
        cost = new_cost
    if current:
        packs.append(current)
    if padded:
        rng.shuffle(packs)
    return packs


class PackDataset:
    """A map-style dataset whose items are packs, `{"rows": [[ids], ...]}`, read lazily from the
    tokenized rows (a `datasets.Dataset` with `input_ids`, or a list of id lists)."""

    def __init__(self, rows, packs: list[list[int]]) -> None:
        self.rows = rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pack = self.packs[i]
        if isinstance(self.rows, list):
            return {"rows": [self.rows[j] for j in pack]}
        if "labels" in self.rows.column_names:
            picked = self.rows[pack]
            return {"rows": picked["input_ids"], "labels": picked["labels"]}
        return {"rows": self.rows[pack]["input_ids"]}


# ------------------------------------------------------------------------------- the probe


@dataclass
class ProbeResult:
    ok: bool
    max_error: float | None
    tolerance: float | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_error": self.max_error,
            "tolerance": self.tolerance,
            "reason": self.reason,
        }


def probe(
    model, collator: FlatCollator, *, device, autocast_dtype=None, lengths=(7, 12, 5)
) -> ProbeResult:
    """Does a packed forward of `model` give each sequence the logits it gets alone, and does a
    packed backward run? Runs in eval mode (no dropout) on a few random tokens; restores the mode.
    """
    import contextlib

    import torch

    gen = torch.Generator().manual_seed(1234)
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    hi = max(4, min(vocab, 1000))
    rows = [torch.randint(3, hi, (n,), generator=gen).tolist() for n in lengths]
    was_training = model.training
    model.eval()
    amp = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with amp:
            with torch.no_grad():
                alone = [
                    model(input_ids=torch.tensor([r], device=device), use_cache=False)
                    .logits[0]
                    .float()
                    for r in rows
                ]
                batch = _to_device(collator([{"input_ids": r} for r in rows]), device)
                pop_counts(batch)
                batch.pop("labels")
                packed = model(**batch, use_cache=False).logits[0].float()
            reference = torch.cat(alone, dim=0)
            scale = reference.abs().max().item()
            half = autocast_dtype is not None or next(model.parameters()).dtype != torch.float32
            tol = (1e-1 if half else 1e-4) * max(scale, 1.0)
            err = (packed - reference).abs().max().item()
            if not err <= tol:
                return ProbeResult(False, err, tol, "packed logits differ from per-sequence logits")
            batch = _to_device(collator([{"input_ids": r} for r in rows]), device)
            pop_counts(batch)
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            if not torch.isfinite(loss).item():
                return ProbeResult(False, err, tol, "packed loss is not finite")
        return ProbeResult(True, err, tol, "packed logits match per-sequence logits")
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pack this model
        return ProbeResult(False, None, None, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
