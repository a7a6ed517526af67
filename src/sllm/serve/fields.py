"""Checked field types of the serving wire models, so a model refuses a bad value by itself.

Services are called directly too (tests, the CLI's config files), not only behind the HTTP edge,
so every bound lives here rather than in a middleware:

- floats are finite (`NaN`, `Infinity` and `1e999` are refused, never stored as `null`) and
  strictly numbers (no `true`, no `"0.5"`);
- integers are bounded by what their field can hold (`seed` fits a 64-bit generator seed);
- strings carry no lone UTF-16 surrogates (they cannot be encoded, so every later read would
  fail) and no NUL; names and paths carry no control characters at all, are length-limited,
  and never name what the store keeps for itself: dot-prefixed components (`.tmp-*` save
  scratch, `.lock`), `_jobs` and `_serve`.

Each check raises `ValueError` with a sentence saying how to fix the value; pydantic puts the
field's name in front of it and the API answers 400.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, StrictFloat, StrictInt

from sllm.paths import MAX_PATH_CHARS
from sllm.store.layout import own_name_problem

MAX_NAME_CHARS = 256  # model and deployment names
MAX_ADAPTER_NAME_CHARS = 128
MAX_STOP_CHARS = 256
MAX_STOPS = 4
MAX_TOKENS = 65536  # per request; the model's context bounds it further
MAX_SEED = 2**63 - 1
MAX_SECONDS = 7 * 24 * 3600.0  # keep_alive: a week (min_instances keeps instances for good)
MAX_QUEUE_SECONDS = 24 * 3600.0
MAX_INSTANCES = 1024
MAX_CPUS = 4096
MAX_GPUS = 1024
MAX_QUEUE = 100_000
MAX_CONCURRENCY = 65536
MAX_ADAPTERS = 64  # per deploy request
MAX_LORAS = 4096  # adapters kept loaded on demand per instance

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_text(value: str) -> str:
    """Free text (prompts, messages, stop strings): no lone surrogates, no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode"
        ) from None
    if "\x00" in value:
        raise ValueError("holds a NUL character (\\u0000); remove it")
    return value


def check_name_chars(value: str) -> str:
    """Names and paths: valid Unicode without any control character."""
    check_text(value)
    bad = _CONTROL.search(value)
    if bad:
        raise ValueError(
            f"holds the control character {bad.group()!r}; names and paths may not contain any"
        )
    return value


def check_store_path(value: str) -> str:
    """A name or relative path under the store: no empty, `.`-prefixed or reserved component."""
    check_name_chars(value)
    if value.startswith("/"):
        raise ValueError(f"{value!r} is an absolute path; give the name relative to the store")
    for part in value.rstrip("/").split("/"):
        if not part:
            raise ValueError(f"{value!r} has an empty path component; write it as a/b")
        if part == "..":
            raise ValueError(f"{value!r} escapes through '..'; use a plain path below the store")
        problem = own_name_problem(part)
        if problem:
            raise ValueError(f"{value!r}: {problem}; rename it")
    return value


def check_adapter_path(value: str) -> str:
    """An adapter path: relative to the store's backend root, or absolute (checked against the
    root later, by `sllm.serve.adapters.resolve_adapter_path`)."""
    check_name_chars(value)
    if value.strip().startswith("/"):
        return value
    return check_store_path(value.strip())


def check_adapter_name(value: str) -> str:
    check_name_chars(value)
    if not ADAPTER_NAME_RE.match(value) or value == "__base__":
        raise ValueError(
            f"{value!r} is not an adapter name: use up to {MAX_ADAPTER_NAME_CHARS} letters, "
            "digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return value


FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Text = Annotated[str, AfterValidator(check_text)]
ModelName = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(check_store_path)
]
AdapterName = Annotated[
    str, Field(min_length=1, max_length=MAX_ADAPTER_NAME_CHARS), AfterValidator(check_adapter_name)
]
AdapterPath = Annotated[
    str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(check_adapter_path)
]
StopString = Annotated[
    str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(check_text)
]
Temperature = Annotated[FiniteFloat, Field(ge=0.0, le=2.0)]
TopP = Annotated[FiniteFloat, Field(gt=0.0, le=1.0)]
MaxTokens = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
