"""The `backend_config` of the `peft_lora` backend: its shape, its defaults and its checks.

Everything here is cheap: pydantic for the shape; `transformers`/`peft` are imported lazily only by
the checks that construct `TrainingArguments` / `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import types
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)

from sllm.errors import InvalidRequestError

P = "backend_config"
DS = f"{P}.dataset_config"

DEFAULT_MAX_SEQ_LENGTH = 1024
# Token budget of a `token_budget` batch when the config gives none: GPUs want big batches; on a
# CPU a bigger batch buys nothing and its logits alone take 4 bytes x vocab per token.
DEFAULT_TOKENS_PER_BATCH = {"cuda": 16384, "cpu": 4096}

# Keys of `lora_config` the user leaves out take these values.
DEFAULT_LORA_CONFIG: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

LOCAL_EXTENSIONS = ("json", "csv", "parquet", "text")
_EXTENSION_ALIASES = {"jsonl": "json", "txt": "text", "tsv": "csv"}

# `dataset_config` extras that are never passed on to `datasets.load_dataset`: credentials, places
# to write, and ways to run code or read outside the allowed data roots.
REFUSED_DATASET_KEYS: dict[str, str] = {
    "token": "credentials are not accepted in a job config; configure the worker's environment",
    "use_auth_token": "credentials are not accepted in a job config",
    "storage_options": "may carry credentials and remote filesystems; not accepted",
    "download_config": "may carry credentials; not accepted",
    "cache_dir": "the datasets cache is configured on the server (HF_HOME / HF_DATASETS_CACHE)",
    "path": "use `hf_dataset_name` (hf_hub) or `extension_type` + `data_files` (local)",
    "trust_remote_code": "running dataset code is not allowed",
    "streaming": "streaming datasets are not supported; the job needs the row count",
}


# `load_dataset` keywords that are refused although the loader accepts them.
REFUSED_LOADER_KEYS: dict[str, str] = {
    "features": "a `datasets.Features` object cannot be given in JSON; the columns are inferred",
    "save_infos": "it writes into the dataset's directory",
}
_LOADER_CHOICES: dict[str, tuple[str, ...]] = {
    "download_mode": ("reuse_dataset_if_exists", "reuse_cache_if_exists", "force_redownload"),
    "verification_mode": ("all_checks", "basic_checks", "no_checks"),
}


class DatasetConfig(BaseModel):
    """Where the training text comes from. Extra keys go to `datasets.load_dataset` as keywords."""

    model_config = ConfigDict(extra="allow")

    dataset_source: Literal["hf_hub", "local", "file"] = Field(
        description="`hf_hub`: a dataset repository id (or a directory inside the data roots); "
        "`local`: files given by `data_files` and `extension_type`; `file`: a file uploaded "
        "with `POST /v1/files`, given by `file_id` (JSON Lines)."
    )
    file_id: str | None = Field(
        None, description="`file` only: the id of an uploaded file (`file-...`)."
    )
    hf_dataset_name: str | None = Field(
        None, description="Hub dataset id such as `fka/awesome-chatgpt-prompts` (hf_hub only)."
    )
    tokenization_field: str | None = Field(
        None,
        min_length=1,
        description="Column whose text is tokenized and trained on (`text` format; required "
        "there, unused by `chat` and `prompt_completion`).",
    )
    format: Literal["auto", "text", "chat", "prompt_completion"] = Field(
        "auto",
        description="Shape of the rows. `chat`: OpenAI chat fine-tuning rows, `messages` = list "
        "of {role: system|user|assistant, content, weight?}, rendered with the base model's "
        "chat template. `prompt_completion`: `prompt` and `completion` columns. `text`: the "
        "`tokenization_field` column. `auto` (default): `chat` when rows have `messages`, "
        "`prompt_completion` when they have `prompt` and `completion`, else `text`.",
    )
    train_on_inputs: StrictBool = Field(
        False,
        description="Loss on every token (system and user turns, prompts, template markup). "
        "Default false: loss only on assistant answers (chat; an assistant message with "
        "`weight: 0` is context only) and completions (prompt_completion).",
    )
    use_chat_template: StrictBool = Field(
        True,
        description="`prompt_completion` only: render the prompt as the user turn of the base "
        "model's chat template (default, when the model has one); false: plain concatenation "
        "prompt + completion + EOS.",
    )
    split: str = Field("train", min_length=1, description="Dataset split to train on.")
    data_files: str | list[str] = Field(
        "",
        description="Local file(s) or glob(s) (local); relative paths resolve against the server's "
        "working directory and must lie inside one of its data roots.",
    )
    extension_type: str = Field(
        "", description="Format of the local files: json (also jsonl), csv, parquet or text."
    )
    validation_split: StrictInt | StrictFloat | None = Field(
        None,
        gt=0,
        le=2**31 - 1,
        description="Hold out rows of this data for validation: a fraction in (0, 1) or a row "
        "count (at least 1), drawn with the job's `data_seed` (else `seed`); the held-out rows "
        "are not trained on. Not with `validation_dataset_config`.",
    )

    @field_validator("validation_split")
    @classmethod
    def _fraction_or_count(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("must be a fraction in (0, 1) or a whole number of rows")
        return value

    def extras(self) -> dict[str, Any]:
        """The extra keys, passed on to `datasets.load_dataset`."""
        return dict(self.model_extra or {})


DEFAULT_CHECKPOINT_MINUTES = 10.0


class BackendConfig(BaseModel):
    """The `backend_config` of a `peft_lora` fine-tuning job."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str | None = Field(
        None,
        description="Where the adapter is saved, relative to `$STORAGE_PATH/transformers`; "
        "default `ft_<model>_adapter`.",
    )
    dataset_config: DatasetConfig = Field(description="The training data.")
    lora_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of `peft.LoraConfig`; omitted keys default to r=8, "
        "lora_alpha=16, lora_dropout=0.05, bias=none, task_type=CAUSAL_LM.",
    )
    training_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of `transformers.TrainingArguments` (minus the keys that "
        "write outside the job or send data elsewhere).",
    )
    max_seq_length: int | None = Field(
        None,
        gt=0,
        le=2**31 - 1,
        description="Longer texts are truncated; default min(model max_position_embeddings, 1024).",
    )
    batching: Literal["padding_free", "padded", "token_budget"] = Field(
        "padding_free",
        description="How rows become batches. `padding_free` (default): the same rows per step as "
        "`per_device_train_batch_size` gives, concatenated into one row with positions restarting "
        "per sequence and no attention across sequences, so no compute goes to padding and the "
        "loss equals the padded one; on a model where a packed forward does not reproduce "
        "per-sequence logits (checked when the job starts) it falls back to padded batches of "
        "similar lengths (`train_sampling_strategy=group_by_length`). `padded`: plain padded "
        "batches (the Trainer's usual behaviour). `token_budget`: throughput mode, each batch "
        "holds as many rows as fit in `tokens_per_batch` tokens (`per_device_train_batch_size` "
        "is then ignored, so steps, and the rows per step, differ from the padded run).",
    )
    tokens_per_batch: int | None = Field(
        None,
        ge=16,
        le=2**31 - 1,
        description="`token_budget` only: tokens per batch (per device, before gradient "
        f"accumulation); default {DEFAULT_TOKENS_PER_BATCH['cuda']} on a GPU, "
        f"{DEFAULT_TOKENS_PER_BATCH['cpu']} on CPU (at least the longest row). Must be at least "
        "`max_seq_length`.",
    )
    compile: StrictBool = Field(
        False,
        description="Compile the model's repeated decoder layers with `torch.compile` (dynamic "
        "shapes: one compile serves every batch length, and one layer's graph serves all "
        "layers). Fuses the many small kernels of a step (LoRA, norms, activations, casts) for "
        "a one-time cost at the first step (tens of seconds; PyTorch caches it on disk for later "
        "jobs of the same shape). For long jobs, and for GPUs where small steps wait on kernel "
        "launches. Packed rows then use FlashAttention varlen on CUDA in half precision, else "
        "one masked attention call (its mask grows with the square of a packed row's length). "
        "Skipped, with a warning, where it cannot run (no C++ compiler on CPU, no Triton on "
        "CUDA). Not with `training_config.torch_compile` (the whole model).",
    )
    checkpoint_minutes: float = Field(
        DEFAULT_CHECKPOINT_MINUTES,
        strict=True,  # a number: not "5", not true
        ge=0,
        le=24 * 60,
        description="Minutes between checkpoints (LoRA weights, optimizer and scheduler state, "
        "RNG, step) in the job's scratch directory; 0 turns them off. A job re-queued after a "
        "server restart or a lost node resumes from its last checkpoint instead of step 0. "
        "Checkpoints are deleted when the job ends. (`save_strategy`/`save_steps` in "
        "`training_config` add checkpoints of their own; the job resumes from those too.)",
    )
    validation_dataset_config: DatasetConfig | None = Field(
        None,
        description="Validation data, the same shape as `dataset_config` (and checked the same "
        "way). Its loss (`valid_loss`) and token accuracy (`valid_mean_token_accuracy`) are "
        "measured every `training_config.eval_steps` (default: 10 evaluations per run, "
        '`eval_strategy` "steps", `eval_steps` 0.1) and at the end; the adapter saved is the '
        "one of the evaluation with the lowest `valid_loss`. Not with "
        "`dataset_config.validation_split`.",
    )
    early_stopping_patience: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=2**31 - 1,
        description="Stop training after this many evaluations in a row without the validation "
        "loss improving on the best by more than `early_stopping_threshold`; the adapter of the "
        "best evaluation is saved. Needs validation data.",
    )
    early_stopping_threshold: float | None = Field(
        None,
        strict=True,
        ge=0,
        description="How much lower than the best the validation loss must be to count as an "
        "improvement for `early_stopping_patience` (default 0).",
    )
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="Start from an earlier LoRA adapter instead of fresh LoRA weights: a path "
        "relative to `$STORAGE_PATH/transformers` (like `output_dir`) of an adapter trained on "
        "the same base model. Its LoRA config is used; keys given in `lora_config` must agree "
        "with it. The new adapter goes to `output_dir`, which must be another directory.",
    )


def default_output_dir(model: str) -> str:
    return f"ft_{model}_adapter"


def parse_backend_config(raw: Any) -> BackendConfig:
    """Shape-check `raw`; the first problem becomes an `InvalidRequestError` naming its field."""
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"`{P}` must be a JSON object.", param=P)
    try:
        return BackendConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        path = ".".join([P, *(str(part) for part in first["loc"])])
        more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
        raise InvalidRequestError(f"`{path}`: {first['msg']}.{more}", param=path) from None


def normalise_extension(extension_type: str) -> str:
    ext = extension_type.strip().lower().lstrip(".")
    ext = _EXTENSION_ALIASES.get(ext, ext)
    if ext not in LOCAL_EXTENSIONS:
        raise InvalidRequestError(
            f"`{P}.dataset_config.extension_type` must be one of {', '.join(LOCAL_EXTENSIONS)} for "
            f"a local dataset, got {extension_type!r}.",
            param=f"{P}.dataset_config.extension_type",
        )
    return ext


def check_dataset_extras(
    extras: dict[str, Any],
    *,
    local: bool,
    extension: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Refused keys, then every key must be a keyword `datasets.load_dataset` (or the builder of
    `extension`; any packaged builder for a Hub dataset) accepts, with a value it can use."""
    for key, value in extras.items():
        param = f"{P}.dataset_config.{key}"
        reason = REFUSED_DATASET_KEYS.get(key)
        if key in ("trust_remote_code", "streaming") and not value:
            reason = None
        if reason:
            raise InvalidRequestError(f"`{param}` is refused: {reason}.", param=param)
        if key == "data_dir" and value is not None:
            if local:
                raise InvalidRequestError(
                    f"`{param}` is not supported for a local dataset; list the files in "
                    "`data_files` instead.",
                    param=param,
                )
            if (
                not isinstance(value, str)
                or os.path.isabs(value)
                or ".." in value.split("/")
                or "://" in value
                or "::" in value
            ):
                raise InvalidRequestError(
                    f"`{param}` must be a relative directory inside the dataset repository.",
                    param=param,
                )
    _check_loader_keywords(extras, extension if local else None, num_cpus)


def _check_loader_keywords(
    extras: dict[str, Any], builder: str | None, num_cpus: int | None
) -> None:
    """Unknown keywords would make `load_dataset` (or the builder's config) raise in the job."""
    if not extras:
        return
    loader, builders = _loader_keywords()
    allowed = loader | (builders.get(builder, frozenset()) if builder else _all_builder_keys())
    kinds = _builder_value_kinds(builder) if builder else {}
    for key, value in extras.items():
        param = f"{P}.dataset_config.{key}"
        if key not in allowed:
            where = f"the {builder!r} builder" if builder else "any packaged builder"
            raise InvalidRequestError(
                f"`{param}` is not a keyword that `datasets.load_dataset` or {where} accepts; "
                "remove it (see the datasets documentation for the loader's options).",
                param=param,
            )
        kind = kinds.get(key)
        if isinstance(kind, list) and value not in kind:
            raise InvalidRequestError(
                f"`{param}` must be one of {', '.join(map(str, kind))}, got {value!r}.",
                param=param,
            )
        if isinstance(kind, tuple):
            if not _type_ok(value, kind):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in kind)
                raise InvalidRequestError(f"`{param}` must be {names}.", param=param)
            if key in _POSITIVE_BUILDER_KEYS and _is_num(value) and value < 1:
                raise InvalidRequestError(f"`{param}` must be at least 1.", param=param)
        reason = REFUSED_LOADER_KEYS.get(key)
        if reason and value is not None:
            raise InvalidRequestError(f"`{param}` is refused: {reason}.", param=param)
        choices = _LOADER_CHOICES.get(key)
        if choices and value is not None and value not in choices:
            raise InvalidRequestError(
                f"`{param}` must be one of {', '.join(choices)}, got {value!r}.", param=param
            )
        if key == "num_proc" and value is not None:
            limit = num_cpus or 1
            if not _is_int(value) or not 1 <= value <= limit:
                raise InvalidRequestError(
                    f"`{param}` must be an integer from 1 to the job's num_cpus ({limit}).",
                    param=param,
                )
        if key in ("name", "revision", "encoding", "encoding_errors", "field") and not (
            value is None or isinstance(value, str)
        ):
            raise InvalidRequestError(f"`{param}` must be a string.", param=param)


@functools.lru_cache(maxsize=1)
def _loader_keywords() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(`load_dataset`'s own keywords, {packaged builder: its config's keywords})."""
    import importlib
    import inspect

    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    params = inspect.signature(datasets.load_dataset).parameters
    loader = frozenset(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD and n != "path")
    inherited = {"name", "version", "data_dir", "data_files", "description"}
    builders: dict[str, frozenset[str]] = {}
    for builder, (module_path, _hash) in _PACKAGED_DATASETS_MODULES.items():
        try:
            module = importlib.import_module(module_path)
        except Exception:  # noqa: BLE001 - a builder whose optional dependency is missing
            continue
        fields: set[str] = set()
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, datasets.BuilderConfig)
                and dataclasses.is_dataclass(obj)
            ):
                fields |= {f.name for f in dataclasses.fields(obj)} - inherited
        builders[builder] = frozenset(fields)
    return loader, builders


_POSITIVE_BUILDER_KEYS = frozenset({"chunksize", "block_size", "batch_size"})


@functools.cache
def _builder_value_kinds(builder: str) -> dict[str, tuple[type, ...] | list[Any]]:
    """Keyword -> the scalar types (tuple) or the literal choices (list) the builder's config
    declares; keywords of other types (objects, lists, pyarrow values) are not listed."""
    import importlib

    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if builder not in _PACKAGED_DATASETS_MODULES:
        return {}
    module = importlib.import_module(_PACKAGED_DATASETS_MODULES[builder][0])
    out: dict[str, tuple[type, ...] | list[Any]] = {}
    for obj in vars(module).values():
        if not (isinstance(obj, type) and issubclass(obj, datasets.BuilderConfig)):
            continue
        try:
            hints = typing.get_type_hints(obj)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: no type check for it
            continue
        for name, hint in hints.items():
            if typing.get_origin(hint) is typing.Literal:
                out[name] = list(typing.get_args(hint))
                continue
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            members = typing.get_args(hint) if union else (hint,)
            if all(m in (int, float, bool, str, type(None)) for m in members):
                out[name] = tuple(members)
    return out


@functools.lru_cache(maxsize=1)
def _all_builder_keys() -> frozenset[str]:
    return frozenset().union(*_loader_keywords()[1].values())


def packaged_builders() -> frozenset[str]:
    """Names `datasets.load_dataset` treats as a file format rather than a dataset id."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return frozenset(_PACKAGED_DATASETS_MODULES)


# ---------------------------------------------------------------------------------------------
# numbers anywhere in backend_config


def check_finite(value: Any, path: str = P) -> None:
    """Every float in `value` is finite: NaN and Infinity cannot be stored (the job record is
    JSON) and no training setting means anything with them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"`{path}` must be a finite number, got {value!r}.", param=path)
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{path}.{i}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_batching(cfg: BackendConfig) -> None:
    """The batching and compile keys agree with each other."""
    if cfg.compile and cfg.training_config.get("torch_compile"):
        raise InvalidRequestError(
            f"`{P}.compile` (the decoder layers) and `{P}.training_config.torch_compile` (the "
            "whole model) exclude each other; set one.",
            param=f"{P}.compile",
        )
    param = f"{P}.tokens_per_batch"
    if cfg.batching != "token_budget":
        if cfg.tokens_per_batch is not None:
            raise InvalidRequestError(
                f"`{param}` applies to `{P}.batching`='token_budget' only (got "
                f"{cfg.batching!r}); set that too, or leave `tokens_per_batch` out.",
                param=param,
            )
        return
    budget = cfg.tokens_per_batch
    if budget is not None and cfg.max_seq_length is not None and budget < cfg.max_seq_length:
        raise InvalidRequestError(
            f"`{param}`={budget} is smaller than `{P}.max_seq_length`={cfg.max_seq_length}, so "
            "the longest rows would fit in no batch; raise it or lower max_seq_length.",
            param=param,
        )


def token_budget(cfg: BackendConfig, *, device: str, max_seq_length: int) -> int | None:
    """The run's tokens per batch: None unless `token_budget`; the config's value, else the
    device's default raised to the longest row."""
    if cfg.batching != "token_budget":
        return None
    if cfg.tokens_per_batch is not None:
        return cfg.tokens_per_batch
    return max(
        DEFAULT_TOKENS_PER_BATCH.get(device, DEFAULT_TOKENS_PER_BATCH["cpu"]), max_seq_length
    )


# ---------------------------------------------------------------------------------------------
# lora_config


def lora_config_with_defaults(lora_config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT_LORA_CONFIG, **lora_config}


def build_lora_config(lora_config: dict[str, Any]):
    """`peft.LoraConfig(**lora_config)`, or an `InvalidRequestError` naming what is wrong."""
    from peft import LoraConfig

    param = f"{P}.lora_config"
    task_type = lora_config.get("task_type")
    if task_type is not None and str(task_type) != "CAUSAL_LM":
        raise InvalidRequestError(
            f"`{param}.task_type` must be CAUSAL_LM (this backend trains causal LMs), got "
            f"{task_type!r}.",
            param=f"{param}.task_type",
        )
    _check_lora_values(lora_config)
    try:
        return LoraConfig(**lora_config)
    except TypeError as exc:
        unknown = _unknown_keys(LoraConfig, lora_config)
        where = f"{param}.{unknown[0]}" if unknown else param
        hint = (
            f"unknown key(s) {', '.join(map(repr, unknown))}; see peft.LoraConfig for valid keys"
            if unknown
            else str(exc)
        )
        raise InvalidRequestError(f"`{param}` is invalid: {hint}.", param=where) from None
    except (ValueError, AssertionError) as exc:
        raise InvalidRequestError(f"`{param}` is invalid: {exc}", param=param) from None


# No linear layer of any model this backend trains is wider than this; the model's own hidden
# size bounds the rank further (`check_lora_rank`).
MAX_LORA_RANK = 65536
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "word_embed_proj_dim")


def model_hidden_size(model_config: dict[str, Any]) -> int | None:
    """The model's hidden size from its config.json (the text model's, for multimodal ones)."""
    for cfg in (model_config, model_config.get("text_config") or {}):
        for key in _HIDDEN_SIZE_KEYS:
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if _is_int(value) and value > 0:
                return value
    return None


def check_lora_rank(lora_config: dict[str, Any], model_config: dict[str, Any], model: str) -> None:
    """The rank fits the model's layers, read from config.json (nothing allocated).

    Every decoder linear layer has the hidden size on one side, so a rank above it only adds
    parameters (r x (in + out) per layer) without adding capacity; far above it, the adapter
    alone exhausts memory.
    """
    hidden = model_hidden_size(model_config)
    if hidden is None:
        return
    param = f"{P}.lora_config"
    ranks = {"r": lora_config.get("r")}
    for name, value in (lora_config.get("rank_pattern") or {}).items():
        ranks[f"rank_pattern.{name}"] = value
    for key, value in ranks.items():
        if _is_num(value) and value > hidden:
            raise InvalidRequestError(
                f"`{param}.{key}`={value} exceeds {model!r}'s hidden size ({hidden}): a LoRA "
                f"rank above a layer's smaller side adds no capacity; use at most {hidden} "
                "(typically 4 to 64).",
                param=f"{param}.{key}",
            )


def _check_lora_values(lora_config: dict[str, Any]) -> None:
    """The checks `LoraConfig` itself skips (it accepts r=0 or bias='bogus' and fails later)."""
    param = f"{P}.lora_config"

    def bad(key: str, what: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"`{param}.{key}` must be {what}, got {lora_config[key]!r}.", param=f"{param}.{key}"
        )

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    r = lora_config.get("r")
    if "r" in lora_config and not (_is_int(r) and 0 < r <= MAX_LORA_RANK):
        raise bad("r", f"an integer from 1 to {MAX_LORA_RANK}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = lora_config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(
            _is_num(v) and 0 < v <= MAX_LORA_RANK for v in pattern.values()
        ):
            raise bad(key, f"an object of module names to numbers from 1 to {MAX_LORA_RANK}")
    if "lora_alpha" in lora_config and not (
        is_num(lora_config["lora_alpha"]) and lora_config["lora_alpha"] > 0
    ):
        raise bad("lora_alpha", "a positive number")
    dropout = lora_config.get("lora_dropout")
    if "lora_dropout" in lora_config and not (is_num(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    if "bias" in lora_config and lora_config["bias"] not in ("none", "all", "lora_only"):
        raise bad("bias", "one of 'none', 'all', 'lora_only'")
    targets = lora_config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise bad("target_modules", "a module name, a list of them, a regex or 'all-linear'")


# ---------------------------------------------------------------------------------------------
# training_config

_REPORT_TO_NONE = (None, "none", [], ["none"], ())

# Keys refused outright, with the reason given to the client.
REFUSED_TRAINING_KEYS: dict[str, str] = {
    "output_dir": f"the adapter goes to `{P}.output_dir`; the trainer's scratch dir is the job's",
    "logging_dir": "logs stay in the job's directory",
    "overwrite_output_dir": "the trainer's scratch dir belongs to the job",
    "resume_from_checkpoint": "jobs cannot read checkpoints from outside their own directory",
    "hub_token": "credentials are not accepted in a job config",
    "deepspeed": "DeepSpeed is not supported by this backend",
}
REFUSED_TRAINING_PREFIXES: dict[str, str] = {
    "hub_": "adapters are saved to the store, never pushed to the Hub",
    "push_to_hub_": "adapters are saved to the store, never pushed to the Hub",
    "trackio_": "training metrics are reported to the job record only",
}
# Keys whose string form is a path to a file to read; the dict form is fine.
_PATH_OR_DICT_KEYS = ("accelerator_config", "fsdp_config")


def check_training_keys(training_config: dict[str, Any], *, validation: bool = False) -> None:
    """Refuse `training_config` keys that write outside the job's directories or send data out.

    The rule: a fine-tuning job reads only its base model and its dataset, and writes only its
    scratch dir (`$STORAGE_PATH/_jobs/<id>/trainer`) and its adapter dir. So `training_config` may
    not set `output_dir`, `logging_dir`, `overwrite_output_dir` or `resume_from_checkpoint`; may
    not push anywhere (`push_to_hub` true, any `hub_*` / `push_to_hub_*` key); may not report to
    an outside service (`report_to` other than "none" / [] / null, any `trackio_*` key); may not
    name config files to read (`deepspeed`, `accelerator_config` / `fsdp_config` given as a path);
    and may ask for evaluation (`eval_strategy` other than "no", `eval_on_start`) only when the
    job has `validation` data; `load_best_model_at_end` never (the best evaluation's adapter is
    kept anyway, see `sllm.finetune.evaluation`).
    """
    for key, value in training_config.items():
        param = f"{P}.training_config.{key}"
        reason = REFUSED_TRAINING_KEYS.get(key)
        if reason is None:
            for prefix, why in REFUSED_TRAINING_PREFIXES.items():
                if key.startswith(prefix):
                    reason = why
        if key == "push_to_hub" and value:
            reason = REFUSED_TRAINING_PREFIXES["hub_"]
        if key == "report_to" and value not in _REPORT_TO_NONE:
            reason = 'metrics go to the job record; use "none" (progress is reported anyway)'
        if key in _PATH_OR_DICT_KEYS and isinstance(value, str):
            reason = "config files are not read from a job config; pass the settings as an object"
        no_data = (
            "there is no validation data (give `dataset_config.validation_split` or "
            "`validation_dataset_config`)"
        )
        if key == "eval_strategy" and value not in (None, "no") and not validation:
            reason = no_data
        if key == "eval_on_start" and value and not validation:
            reason = no_data
        if key == "load_best_model_at_end" and value:
            reason = "with validation data the best evaluation's adapter is saved anyway"
        if reason:
            raise InvalidRequestError(f"`{param}` is refused: {reason}.", param=param)


@functools.lru_cache(maxsize=1)
def _training_argument_types() -> dict[str, tuple[type, ...]]:
    """Plain scalar fields of `TrainingArguments` -> the Python types they accept."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    scalar: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(TrainingArguments):
        hint = hints.get(f.name)
        members = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else (hint,)
        )
        if all(m in (int, float, bool, str, type(None)) for m in members):
            scalar[f.name] = tuple(m for m in members)
    return scalar


def _type_ok(value: Any, allowed: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    return isinstance(value, str) and str in allowed


def check_training_types(training_config: dict[str, Any]) -> None:
    """Scalar `TrainingArguments` fields hold a value of their declared type."""
    param = f"{P}.training_config"
    types_by_key = _training_argument_types()
    for key, value in training_config.items():
        allowed = types_by_key.get(key)
        if allowed is not None and not _type_ok(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise InvalidRequestError(
                f"`{param}.{key}` must be {names}, got {value!r}.", param=f"{param}.{key}"
            )


# The sane bounds of a job's length: far beyond any real LoRA run, small enough that step
# counts, ETAs and progress fit the job record's integers.
MAX_TRAIN_STEPS = 10_000_000
MAX_TRAIN_EPOCHS = 10_000
MAX_COUNT = 2**31 - 1  # batch sizes and other counts: what torch and numpy index with
MAX_SEED = 2**32 - 1  # numpy's seed range (`set_seed` seeds numpy)

# Counts: an integer >= 1 when set.
_COUNT_KEYS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "eval_accumulation_steps",
    "dataloader_prefetch_factor",
    "save_total_limit",
    "torch_empty_cache_steps",
)
# Steps or, below 1, a fraction of the run's steps: > 0, and a whole number when >= 1.
_STEPS_OR_RATIO_KEYS = ("logging_steps", "save_steps", "eval_steps")
# key -> (low, high, low inclusive, high inclusive)
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "weight_decay": (0.0, math.inf, True, False),
    "adam_beta1": (0.0, 1.0, True, False),
    "adam_beta2": (0.0, 1.0, True, False),
    "adam_epsilon": (0.0, math.inf, False, False),
    "max_grad_norm": (0.0, math.inf, True, False),
    "label_smoothing_factor": (0.0, 1.0, True, False),
    "warmup_steps": (0.0, MAX_TRAIN_STEPS, True, True),
}


def check_training_values(training_config: dict[str, Any], *, num_cpus: int | None) -> None:
    """Values `TrainingArguments` accepts but a run cannot use (a zero batch, a NaN learning
    rate, 10**300 epochs, more dataloader workers than the job has CPUs)."""
    param = f"{P}.training_config"

    def bad(key: str, what: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"`{param}.{key}` must be {what}, got {training_config[key]!r}.",
            param=f"{param}.{key}",
        )

    for key, value in training_config.items():
        if value is None or isinstance(value, bool) or not _is_num(value):
            continue  # types are `check_training_types`' business
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, "a finite number")
        if key in _COUNT_KEYS and not (_is_int(value) and 1 <= value <= MAX_COUNT):
            raise bad(key, f"an integer from 1 to {MAX_COUNT}")
        if key in _STEPS_OR_RATIO_KEYS and not (
            0 < value < 1 or (float(value).is_integer() and 1 <= value <= MAX_TRAIN_STEPS)
        ):
            raise bad(key, f"a fraction in (0, 1) or a whole number of steps up to "
                      f"{MAX_TRAIN_STEPS}")  # fmt: skip
        if key == "learning_rate" and not value > 0:
            raise bad(key, "a number > 0")
        if key == "num_train_epochs" and not 0 < value <= MAX_TRAIN_EPOCHS:
            raise bad(key, f"a number > 0 and at most {MAX_TRAIN_EPOCHS}")
        if key == "max_steps" and not (value == -1 or 1 <= value <= MAX_TRAIN_STEPS):
            raise bad(key, f"-1 (train by epochs) or a step count from 1 to {MAX_TRAIN_STEPS}")
        if key in ("seed", "data_seed") and not (_is_int(value) and 0 <= value <= MAX_SEED):
            raise bad(key, f"an integer from 0 to {MAX_SEED}")
        if key == "dataloader_num_workers":
            limit = MAX_COUNT if num_cpus is None else num_cpus
            if not (_is_int(value) and 0 <= value <= limit):
                raise bad(key, f"an integer from 0 to the job's num_cpus ({limit})")
        bounds = _RANGES.get(key)
        if bounds is not None:
            low, high, low_in, high_in = bounds
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (above and below):
                lo, hi = "[("[not low_in], "])"[not high_in]
                raise bad(key, f"in {lo}{low:g}, {high:g}{hi}")


def build_training_arguments(
    training_config: dict[str, Any], output_dir: str | os.PathLike, **overrides: Any
):
    """`TrainingArguments(output_dir=..., **training_config, **overrides)` or a 400."""
    from transformers import TrainingArguments

    param = f"{P}.training_config"
    check_training_types(training_config)
    kwargs = {**training_config, **overrides}
    try:
        return TrainingArguments(output_dir=str(output_dir), **kwargs)
    except TypeError as exc:
        unknown = _unknown_keys(TrainingArguments, kwargs)
        if not unknown:
            raise InvalidRequestError(f"`{param}` is invalid: {exc}", param=param) from None
        key = unknown[0]
        hint = _RENAMED_TRAINING_KEYS.get(key, "see transformers.TrainingArguments for valid keys")
        raise InvalidRequestError(
            f"`{param}.{key}` is not a TrainingArguments option in transformers "
            f"{_transformers_version()}: {hint}.",
            param=f"{param}.{key}",
        ) from None
    except (ValueError, ImportError, OSError) as exc:
        raise InvalidRequestError(f"`{param}` is invalid: {exc}", param=param) from None


def check_training_config(
    training_config: dict[str, Any],
    *,
    cuda_available: bool,
    num_cpus: int | None = None,
    validation: bool = False,
) -> None:
    """Refused keys, types and values, then `TrainingArguments` must construct (as the run
    would on this host)."""
    check_training_keys(training_config, validation=validation)
    check_training_types(training_config)
    check_training_values(training_config, num_cpus=num_cpus)
    overrides = {} if cuda_available else {"use_cpu": True}
    scratch = os.path.join(tempfile.gettempdir(), "sllm-validate-training-args")
    args = build_training_arguments(training_config, scratch, **overrides)
    _check_scheduler_kwargs(args)


# Arguments the Trainer passes to every scheduler itself.
_SCHEDULER_OWN_ARGS = frozenset({"optimizer", "num_warmup_steps", "num_training_steps"})


def _check_scheduler_kwargs(args) -> None:
    """`lr_scheduler_kwargs` are keywords of the chosen scheduler's function (the Trainer
    passes them on when it creates the scheduler, at the first step)."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    kwargs = args.lr_scheduler_kwargs or {}
    function = TYPE_TO_SCHEDULER_FUNCTION.get(args.lr_scheduler_type)
    if not kwargs or function is None:
        return
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = set(params) - _SCHEDULER_OWN_ARGS
    for key in kwargs:
        if key not in accepted:
            param = f"{P}.training_config.lr_scheduler_kwargs.{key}"
            name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
            raise InvalidRequestError(
                f"`{param}` is not an option of the {name!r} scheduler; it takes "
                f"{', '.join(sorted(accepted)) or 'none'}.",
                param=param,
            )


_RENAMED_TRAINING_KEYS = {
    "group_by_length": "removed in transformers 5; use "
    '"train_sampling_strategy": "group_by_length"',
    "torch_dtype": "renamed `dtype`, and it is not a TrainingArguments option; the base model is "
    "loaded in its stored dtype (float32 on CPU)",
    "evaluation_strategy": "renamed `eval_strategy`",
    "no_cuda": "use `use_cpu`",
}


def _unknown_keys(cls: type, kwargs: dict[str, Any]) -> list[str]:
    known = {f.name for f in dataclasses.fields(cls)}
    return [k for k in kwargs if k not in known]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
