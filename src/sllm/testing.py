"""Tiny random-weight models with a real tokenizer, built offline, for tests and benchmarks.

Nothing here touches the hub: the tokenizer is a byte-level BPE trained on a few sentences and the
model comes from a `transformers` config with random weights.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "Act as a pirate and answer every question with arr.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "You are a helpful assistant. Answer briefly and clearly.",
    "Translate the following sentence into French, please.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
]


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(
    path: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    with_chat_template: bool = True,
) -> Path:
    """Write a random-weight causal LM (llama or opt shape) and its tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    path = Path(path)
    tokenizer = make_tokenizer()
    if not with_chat_template:
        tokenizer.chat_template = None
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            ffn_dim=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.bos_token_id,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
