"""Small pure pieces: CLI parsing, the chat fallback, text tracking, request validation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sllm.cli.deploy import parse_adapters, read_config
from sllm.serve.decoding import TextTracker
from sllm.serve.prompts import fallback_chat_prompt
from sllm.serve.protocol import ChatCompletionRequest, CompletionRequest


def test_lora_adapters_flag_forms():
    assert parse_adapters(["a=x/1 b=y/2", "c=z"]) == {"a": "x/1", "b": "y/2", "c": "z"}
    assert parse_adapters("a=x/1,b=y/2") == {"a": "x/1", "b": "y/2"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters("a")


def test_serverlessllm_shaped_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model": "facebook/opt-125m",
                "backend": "transformers",
                "num_gpus": 0,
                "auto_scaling_config": {"target": 2, "min_instances": 0, "keep_alive": 5},
                "backend_config": {
                    "pretrained_model_name_or_path": "facebook/opt-125m",
                    "torch_dtype": "float32",
                    "enable_lora": True,
                    "lora_adapters": {"a": "ft_facebook/opt-125m_adapter"},
                    "max_loras": 16,
                },
            }
        )
    )
    assert read_config(str(path)) == {
        "model": "facebook/opt-125m",
        "backend": "transformers",
        "num_gpus": 0,
        "target_concurrency": 2,
        "min_instances": 0,
        "keep_alive": 5,
        "dtype": "float32",
        "enable_lora": True,
        "lora_adapters": {"a": "ft_facebook/opt-125m_adapter"},
        "max_loras": 16,
    }


def test_chat_fallback_is_a_role_prefixed_transcript():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert fallback_chat_prompt(messages) == (
        "System: Be terse.\nUser: Hello\nAssistant: Hi!\nUser: How are you?\nAssistant:"
    )


class CharTokenizer:
    """One character per token id, for tracking text exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_are_held_back_then_cut():
    t = TextTracker(CharTokenizer(), ["END"])
    sent = ""
    for ch in "abc EN":
        t.add(ord(ch))
        sent += t.take()
    assert sent == "abc "  # "EN" might start "END": held
    t.add(ord("X"))
    sent += t.take()
    assert sent == "abc ENX"
    for ch in "yEND more":
        t.add(ord(ch))
        sent += t.take()
        if t.stopped:
            break
    assert t.stopped and sent + t.take(final=True) == "abc ENXy"


def test_requests_refuse_what_they_cannot_honour():
    msgs = [{"role": "user", "content": "x"}]
    for extra in ({"n": 2}, {"logprobs": True}, {"presence_penalty": 1}, {"stop": [""]}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="m", messages=msgs, **extra)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", echo=True)
    ok = ChatCompletionRequest(model="m", messages=msgs, user="ignored", max_completion_tokens=3)
    assert ok.token_limit() == 3 and ok.stop_list() == []
    assert CompletionRequest(model="m", prompt=["only"]).prompt == "only"


def test_invalid_bytes_are_not_held_until_the_end():
    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", "replace")

    t = TextTracker(ByteTokenizer(), [])
    for b in "é".encode():  # a 2-byte character arrives whole
        t.add(b)
    assert t.take() == "é"
    sent = ""
    for _ in range(8):  # lone continuation bytes never complete a character
        t.add(0x80)
        sent += t.take()
    assert sent.startswith("\ufffd")
