"""The fine-tuning workload every variant trains on: model shapes, data and training settings.

Models are random-init (no hub access) with a real byte-level BPE tokenizer from
`sllm.testing`; the model's vocabulary is the real model's size, so the LM head costs what it
costs in practice. Rows are text whose token counts are spread uniformly over 20-400.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_NAME = "bench/model"


@dataclass
class Workload:
    size: str
    arch: str  # llama | opt
    shape: dict[str, Any]
    rows: int
    min_tokens: int = 20
    max_tokens: int = 400
    batch_size: int = 8
    epochs: int = 1
    learning_rate: float = 2e-4
    lora: dict[str, Any] = field(
        default_factory=lambda: {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "target_modules": "all-linear",
        }
    )
    tokens_per_batch: int | None = None  # token_budget: None = the backend's default per device
    max_seq_length: int = 512

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _llama(hidden, inter, layers, heads, kv, vocab=32000, pos=2048, tie=False) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": pos,
        "tie_word_embeddings": tie,
    }


def _opt(hidden, ffn, layers, heads, vocab=50272, pos=2048) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "word_embed_proj_dim": hidden,
        "vocab_size": vocab,
        "max_position_embeddings": pos,
    }


SIZES: dict[str, Workload] = {
    # Checks the whole flow in seconds (CPU); not a measurement.
    "tiny": Workload("tiny", "llama", _llama(64, 128, 2, 4, 2, vocab=1024, pos=512), rows=24,
                     max_tokens=120, tokens_per_batch=512),
    "tiny-opt": Workload("tiny-opt", "opt", _opt(64, 128, 2, 4, vocab=1024, pos=512), rows=24,
                         max_tokens=120, tokens_per_batch=512),
    # `python -m bench coldstart`: a small job (~27k tokens) whose fixed costs show.
    "coldstart": Workload("coldstart", "llama", _llama(128, 256, 2, 4, 2, vocab=1024, pos=512),
                          rows=128),
    # What this 2-core machine can measure in minutes.
    "cpu": Workload("cpu", "llama", _llama(384, 1024, 6, 6, 6, tie=True), rows=96),
    "cpu-opt": Workload("cpu-opt", "opt", _opt(384, 1536, 6, 6), rows=96),
    # `python -m bench host` on CPU: the layer structure of the GPU sizes (same layers, LoRA
    # modules, heads per KV head), narrow enough that arithmetic is negligible next to dispatch.
    "opt-125m-narrow": Workload("opt-125m-narrow", "opt", _opt(64, 128, 12, 4, vocab=1024),
                                rows=160),
    "llama-1.1b-narrow": Workload("llama-1.1b-narrow", "llama",
                                  _llama(64, 128, 22, 16, 2, vocab=1024), rows=160),
    # GPU sizes: the shapes of OPT-125m and TinyLlama-1.1B.
    "opt-125m": Workload("opt-125m", "opt", _opt(768, 3072, 12, 12), rows=512),
    "llama-1.1b": Workload("llama-1.1b", "llama", _llama(2048, 5632, 22, 32, 4), rows=640),
}  # fmt: skip


def make_model_dir(path: Path, work: Workload, *, dtype: str = "float32", device: str = "cpu"):
    """Write a random-init model of `work`'s shape and the test tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from sllm.testing import make_tokenizer

    tokenizer = make_tokenizer()
    common = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if work.arch == "llama":
        config = LlamaConfig(**work.shape, **common)
    else:
        config = OPTConfig(**work.shape, **common, pad_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_WORDS = (
    "arr matey ship sea sail wind captain crew gold treasure map island parrot rum anchor deck "
    "storm wave port harbour cannon flag mast rope knot star night moon sun morning answer "
    "question please thank you how what where when why the a an and or but of to in on with "
    "is are was be have has do does can will would should quick brown fox lazy dog poem sky"
).split()


def make_rows(work: Workload, tokenizer, seed: int = 0) -> list[str]:
    """`work.rows` texts whose token counts are uniform over [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    texts = []
    for _ in range(work.rows):
        target = rng.randint(work.min_tokens, work.max_tokens)
        words = [rng.choice(_WORDS) for _ in range(target)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:target]
        texts.append(tokenizer.decode(ids))
    return texts


def write_dataset(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def dataset_config(prep: dict) -> dict[str, Any]:
    """The job's `dataset_config` for the rows `prepare` wrote."""
    return {
        "dataset_source": "local",
        "data_files": prep["data"],
        "extension_type": "json",
        "tokenization_field": "text",
    }


def token_stats(texts: list[str], tokenizer, batch_size: int, max_len: int) -> dict[str, Any]:
    """Row lengths as the trainer sees them, and the padding a padded batch of them carries."""
    lengths = [min(len(tokenizer(t)["input_ids"]), max_len) for t in texts]
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "min": min(lengths),
        "mean": round(sum(lengths) / len(lengths), 1),
        "max": max(lengths),
        "padding_fraction_in_order": round(1 - sum(lengths) / padded, 3),
    }


def prepare(
    root: Path,
    work: Workload,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    through_store: bool = False,
) -> dict:
    """A storage path holding the model (as `bench/model`) and `data/train.jsonl`.

    `through_store` saves the model with `sllm.store.save_model` (a manifest and checksums: what
    the server needs before it accepts a job); otherwise the files are written in place, which
    the backend accepts and which saves minutes for the GPU sizes.
    """
    from transformers import AutoTokenizer

    model_dir = root / "transformers" / MODEL_NAME
    if not (model_dir / "config.json").is_file():
        if through_store:
            from sllm.store import save_model

            src = make_model_dir(root / "_src", work, dtype=dtype, device=device)
            save_model(MODEL_NAME, root, local_model_path=src)
        else:
            make_model_dir(model_dir, work, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = root / "data" / "train.jsonl"
    texts = make_rows(work, tokenizer)
    write_dataset(data, texts)
    return {
        "storage": str(root),
        "model_dir": str(model_dir),
        "data": str(data),
        "tokens": token_stats(texts, tokenizer, work.batch_size, work.max_seq_length),
    }
