"""Turn a chat or a prompt into token ids, inside an instance (it needs the tokenizer).

Chat uses the tokenizer's chat template (`add_generation_prompt=True`). Base models without one
(e.g. facebook/opt-125m) get this documented fallback, a plain role-prefixed transcript:

    System: You are terse.
    User: Hello
    Assistant: Hi!
    User: How are you?
    Assistant:

that is, one `<Role>: <content>` line per message (roles capitalised; `developer` counts as
System), and a final `Assistant:` for the model to continue. The text is then tokenized like a
completion prompt, with the tokenizer's special tokens (BOS) added.
"""

from __future__ import annotations

from typing import Any

FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User"}


def fallback_chat_prompt(messages: list[dict[str, str]]) -> str:
    lines = []
    for m in messages:
        role = FALLBACK_ROLES.get(m["role"], m["role"].capitalize())
        lines.append(f"{role}: {m['content']}")
    lines.append("Assistant:")
    return "\n".join(lines)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not has_chat_template(tokenizer):
        return encode_prompt(tokenizer, fallback_chat_prompt(messages))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt).input_ids)
