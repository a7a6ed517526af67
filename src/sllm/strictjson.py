"""Strict JSON: what sllm accepts as a request body and as an uploaded row.

Shared by the server's edge (`sllm.api.edge`, every JSON body) and the file store
(`sllm.files.store`, every line of an upload), so both refuse exactly the same values: no
`NaN`/`Infinity`, no float that overflows to infinity such as `1e999`, no integer beyond a signed
64-bit one, nesting at most `MAX_DEPTH` deep, no unpaired UTF-16 surrogate and no NUL in any
string, no control character in any key, keys at most `MAX_KEY_CHARS` long. Such a value could
not be stored, serialised back or used; `BadJSON` names where it was found.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from sllm.jobs.models import INT64_MAX

MAX_DEPTH = 64
MAX_KEY_CHARS = 256
INT64_MIN = -INT64_MAX - 1

# In any string: NUL (no C API, path or tokenizer takes it) and unpaired surrogates (no UTF-8
# encoder does). In keys (names of fields and columns) every control character but none of
# tab/newline/CR either. Other control characters in values (a form feed in source code, an ANSI
# escape in a chat) are stored and serialised back escaped; names and paths refuse them in their
# own field checks (`sllm.paths.check_path_text`, `sllm.serve.fields`).
_BAD_CHAR = re.compile(r"[\x00\ud800-\udfff]")
_BAD_KEY_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class BadJSON(ValueError):
    """The body is not JSON sllm can store and answer with; `param` says where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Refused:
    """A number the parser met that sllm refuses; the walk reports it with where it was."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse_constant(name: str) -> _Refused:
    return _Refused(f"`{name}` is not a number JSON allows; send a finite number")


def _finite_float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"the number {text[:40]} is too large; send a finite number")
    return value


def _int64(text: str) -> int | _Refused:
    if len(text.lstrip("-")) > 19 or not INT64_MIN <= int(text) <= INT64_MAX:
        shown = text if len(text) <= 40 else text[:40] + "..."
        return _Refused(f"the integer {shown} does not fit in 64 bits")
    return int(text)


def parse_json(raw: bytes) -> Any:
    """Strict JSON: raises `BadJSON` for what sllm cannot store or echo back."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"The body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_int64,
        )
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"The body is nested too deeply (at most {MAX_DEPTH} levels).") from None
    except ValueError as exc:
        raise BadJSON(f"Malformed JSON body: {exc}.") from None
    check_value(value)
    return value


def _where(path: list[str]) -> str | None:
    return ".".join(path) or None


def _check_string(s: str, path: list[str], what: str, pattern: re.Pattern = _BAD_CHAR) -> None:
    bad = pattern.search(s)
    if bad is None:
        return
    char = bad.group()
    kind = (
        "an unpaired UTF-16 surrogate"
        if "\ud800" <= char <= "\udfff"
        else f"the control character U+{ord(char):04X}"
    )
    where = _where(path)
    raise BadJSON(
        f"{what} {'at `' + where + '` ' if where else ''}contains {kind} (position "
        f"{bad.start()}); remove it.",
        where,
    )


def check_value(value: Any) -> None:
    """Walk a parsed body (iteratively: depth is bounded, not the stack)."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BadJSON(f"The body is nested too deeply (at most {MAX_DEPTH} levels).")
        if isinstance(item, _Refused):
            where = _where(path)
            at = f"`{where}`: " if where else ""
            raise BadJSON(f"{at}{item.reason}.", where)
        if isinstance(item, str):
            _check_string(item, path, "The string")
        elif isinstance(item, dict):
            for key, child in item.items():
                if len(key) > MAX_KEY_CHARS:
                    raise BadJSON(
                        f"A key at `{_where(path) or '(top level)'}` is {len(key)} characters "
                        f"long; keys are at most {MAX_KEY_CHARS}.",
                        _where(path),
                    )
                _check_string(key, [*path, "(key)"], "A key", _BAD_KEY_CHAR)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, str(i)]) for i, child in enumerate(item))
