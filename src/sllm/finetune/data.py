"""Training data for the `peft_lora` backend: where it may come from, loading it, tokenizing it.

`check_*` functions run in the API server (no heavy imports); `load_training_dataset` and
`tokenize_dataset` run in the job's worker.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import (
    DatasetConfig,
    P,
    check_dataset_extras,
    normalise_extension,
    packaged_builders,
)
from sllm.paths import db_path, jobs_dir

DS = f"{P}.dataset_config"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _roots_text(roots: list[Path]) -> str:
    if not roots:
        return "none are configured"
    return ", ".join(str(r) for r in roots)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _outside_roots_error(path: str, roots: list[Path], param: str):
    # The resolved path is not shown: it may name places outside the roots (a symlink's target).
    return InvalidRequestError(
        f"`{param}`: {path!r} is outside the data roots this server may read from "
        f"({_roots_text(roots)}). Move the file under one of them, or start the server with "
        "`--data-root DIR` to allow another directory.",
        param=param,
    )


def _store_internal(real: Path, storage: Path | None) -> bool:
    """The store's own files: its database (and its journal files) and the jobs' scratch."""
    if storage is None:
        return False
    store = Path(storage).expanduser().resolve()
    if real != store and store not in real.parents:
        return False
    parts = real.relative_to(store).parts
    return bool(parts) and (
        parts[0] == jobs_dir(store).name or parts[0].startswith(db_path(store).name)
    )


def _hidden(real: Path, roots: list[Path]) -> bool:
    """A dot-file, or a file under a dot-directory, below the data root that holds it (the
    store's scratch and lock files, editors' and tools' private files)."""
    holding = [root for root in roots if real == root or root in real.parents]
    if not holding:
        return False
    closest = max(holding, key=lambda root: len(root.parts))  # a root may live in a dot-dir
    return any(part.startswith(".") for part in real.relative_to(closest).parts)


def check_data_path(
    entry: str, real: Path, roots: list[Path], param: str, *, storage: Path | None = None
) -> None:
    """`real` (resolved) may be read as training data: inside a data root, not hidden, not one
    of the store's own files."""
    if not _inside(real, roots):
        raise _outside_roots_error(entry, roots, param)
    if _store_internal(real, storage) or _hidden(real, roots):
        raise InvalidRequestError(
            f"`{param}`: {entry!r} is one of the store's own files or a hidden (dot) file; "
            "those are never training data. Put the data in a visible file under a data root.",
            param=param,
        )


def resolve_local_files(
    data_files: str | list[str],
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
) -> list[str]:
    """Absolute, symlink-resolved files for `data_files`; each must exist inside `roots`.

    Relative paths resolve against `cwd` (default: the current working directory); globs are
    expanded (each must match at least one file).
    """
    param = f"{DS}.data_files"
    entries = [data_files] if isinstance(data_files, str) else list(data_files)
    entries = [e for e in entries if e and e.strip()]
    if not entries:
        raise InvalidRequestError(
            f"`{param}` must name at least one file for a local dataset.", param=param
        )
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    out: list[str] = []
    for entry in entries:
        raw = Path(entry).expanduser()
        absolute = raw if raw.is_absolute() else base / raw
        if _GLOB_CHARS.search(entry):
            matches = sorted(glob.glob(str(absolute), recursive=True))
            candidates = [
                Path(m)
                for m in matches
                if Path(m).is_file()
                and not _store_internal(Path(m).resolve(), storage)
                and not _hidden(Path(m).resolve(), resolved_roots)
            ]  # a pattern skips the store's own files; naming one is refused below
            if not candidates:
                raise InvalidRequestError(
                    f"`{param}`: the pattern {entry!r} matches no data file.", param=param
                )
        else:
            candidates = [absolute]
        for candidate in candidates:
            real = candidate.resolve()
            check_data_path(entry, real, resolved_roots, param, storage=storage)
            if not real.is_file():
                what = "is a directory" if real.is_dir() else "does not exist"
                raise InvalidRequestError(
                    f"`{param}`: {entry!r} {what} (looked for {real}); give the path of a data "
                    "file, absolute or relative to the server's working directory.",
                    param=param,
                )
            if real.stat().st_size == 0:
                raise InvalidRequestError(
                    f"`{param}`: {entry!r} is empty ({real}); nothing to train on.", param=param
                )
            out.append(str(real))
    return out


def check_hf_dataset_name(
    name: str | None,
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
) -> str:
    """A Hub id stays as given; a local directory must be inside `roots` and becomes absolute.

    A packaged builder name (`json`, `csv`, `text`, `imagefolder`, ...) is refused: with
    `data_files` it would read any file the server can read; `dataset_source: local` holds
    such files to the data roots.
    """
    param = f"{DS}.hf_dataset_name"
    if not name or not name.strip():
        raise InvalidRequestError(
            f"`{param}` is required when dataset_source is 'hf_hub' (e.g. "
            "'fka/awesome-chatgpt-prompts').",
            param=param,
        )
    name = name.strip()
    if name.lower() in packaged_builders():
        raise InvalidRequestError(
            f"`{param}`: {name!r} is a file format, not a dataset. For files, use "
            "dataset_source 'local' with `data_files` and `extension_type` (json, csv, parquet "
            "or text); the files must lie inside the server's data roots.",
            param=param,
        )
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    raw = Path(name).expanduser()
    local = raw if raw.is_absolute() else base / raw
    looks_local = raw.is_absolute() or name.startswith((".", "~")) or local.exists()
    if looks_local:
        real = local.resolve()
        resolved_roots = [Path(r).expanduser().resolve() for r in roots]
        check_data_path(name, real, resolved_roots, param, storage=storage)
        store = Path(storage).expanduser().resolve() if storage is not None else None
        if store is not None and (real == store or real in store.parents):
            raise InvalidRequestError(
                f"`{param}`: {name!r} contains the whole store (its database and job scratch "
                "among it); point at the directory that holds only the dataset.",
                param=param,
            )
        if not real.is_dir():
            raise InvalidRequestError(
                f"`{param}`: {name!r} is not a dataset directory. For single files use "
                "dataset_source 'local' with data_files and extension_type.",
                param=param,
            )
        _check_dataset_dir(name, real, resolved_roots, param, storage)
        return str(real)
    if name.startswith(("hf://", "buckets/")) or _HUB_ID.match(name):
        return name
    raise InvalidRequestError(
        f"`{param}`: {name!r} is neither a Hub dataset id ('owner/name') nor an existing "
        "directory inside the data roots.",
        param=param,
    )


MAX_DATASET_DIR_ENTRIES = 100_000


def _check_dataset_dir(
    name: str, real: Path, roots: list[Path], param: str, storage: Path | None
) -> None:
    """Nothing in a dataset directory leads out of the data roots (a symlink to /etc, say) or
    into the store's own files; `datasets` would read every data file below it."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(real):
        for entry in [*dirnames, *filenames]:
            seen += 1
            if seen > MAX_DATASET_DIR_ENTRIES:
                raise InvalidRequestError(
                    f"`{param}`: {name!r} holds more than {MAX_DATASET_DIR_ENTRIES} files; "
                    "point at a smaller directory or list the files in `data_files`.",
                    param=param,
                )
            path = Path(dirpath) / entry
            if path.is_symlink():
                shown = f"{name}/{path.relative_to(real)}"
                check_data_path(shown, path.resolve(), roots, param, storage=storage)


def _hub_offline() -> bool:
    import huggingface_hub.constants

    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        import datasets.config

        offline = offline or bool(datasets.config.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return offline


def hub_dataset_cached(name: str) -> bool:
    """`name` is in the datasets cache (an earlier load built it) or the Hub download cache."""
    import datasets.config
    import huggingface_hub.constants

    built = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    snapshots = (
        Path(huggingface_hub.constants.HF_HUB_CACHE)
        / f"datasets--{name.replace('/', '--')}"
        / "snapshots"
    )
    return any(p.is_dir() and any(p.iterdir()) for p in (built, snapshots))


HUB_CHECK_TIMEOUT_S = 10.0


def check_hub_dataset_available(name: str, revision: str | None = None) -> None:
    """A Hub dataset the job could not load (not cached, and the Hub unreachable or without
    it) is a 400 now rather than a failed job later."""
    param = f"{DS}.hf_dataset_name"
    if _HUB_ID.match(name) and hub_dataset_cached(name):
        return
    if _hub_offline():
        raise InvalidRequestError(
            f"`{param}`: {name!r} is not in this server's datasets cache and the server is "
            "offline (HF_HUB_OFFLINE); load it once where the Hub is reachable, or put the "
            "files under a data root and use dataset_source 'local'.",
            param=param,
        )
    if not _HUB_ID.match(name):
        return  # hf:// and bucket paths: the job's loader resolves them
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(name, revision=revision, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        raise InvalidRequestError(
            f"`{param}`: {name!r} is gated on the Hub and this server's token cannot read it.",
            param=param,
        ) from None
    except RevisionNotFoundError:
        raise InvalidRequestError(
            f"`{DS}.revision`: {name!r} has no revision {revision!r} on the Hub.",
            param=f"{DS}.revision",
        ) from None
    except RepositoryNotFoundError:
        raise InvalidRequestError(
            f"`{param}`: no dataset {name!r} on the Hub (or it is private); check the id.",
            param=param,
        ) from None
    except Exception as exc:  # noqa: BLE001 - network errors of every kind
        raise InvalidRequestError(
            f"`{param}`: {name!r} is not in this server's datasets cache and the Hub could not "
            f"be reached ({type(exc).__name__}); retry later, or use dataset_source 'local'.",
            param=param,
        ) from None


def check_dataset_config(
    ds: DatasetConfig,
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Validate and normalise a dataset config (paths made absolute; the data itself read
    cheaply, see `check_local_data`); returns a plain dict."""
    local = ds.dataset_source == "local"
    extras = ds.extras()
    extension = normalise_extension(ds.extension_type) if local else None
    check_dataset_extras(extras, local=local, extension=extension, num_cpus=num_cpus)
    out = ds.model_dump()
    if local:
        out["extension_type"] = extension
        files = resolve_local_files(ds.data_files, roots, cwd=cwd, storage=storage)
        check_local_data(files, extension, ds.tokenization_field, extras)
        out["data_files"] = (
            files[0] if isinstance(ds.data_files, str) and len(files) == 1 else files
        )
        return out
    name = check_hf_dataset_name(ds.hf_dataset_name, roots, cwd=cwd, storage=storage)
    out["hf_dataset_name"] = name
    files = ds.data_files if isinstance(ds.data_files, list) else [ds.data_files]
    for f in files:
        if f and (os.path.isabs(f) or ".." in Path(f).parts):
            raise InvalidRequestError(
                f"`{DS}.data_files` for an hf_hub dataset must be relative paths or patterns "
                f"inside the dataset repository, got {f!r}.",
                param=f"{DS}.data_files",
            )
    if not os.path.isabs(name):
        revision = extras.get("revision")
        check_hub_dataset_available(name, revision if isinstance(revision, str) else None)
    return out


# ---------------------------------------------------------------------------------------------
# the data itself, read cheaply at submit time

# Bytes of local data read per submission: a whole file below it (every JSON line parsed), the
# first SCAN_BUDGET_BYTES of bigger ones (the rest is checked when the job loads it).
SCAN_BUDGET_BYTES = 64 * 2**20
# Keys that change how a CSV is parsed: with any of them only the file's readability is checked.
_CSV_SHAPE_KEYS = frozenset(
    {"names", "column_names", "header", "skiprows", "usecols", "comment", "quotechar",
     "escapechar", "lineterminator", "quoting", "index_col", "dtype", "converters",
     "true_values", "false_values", "na_values", "keep_default_na", "skip_blank_lines",
     "doublequote", "skipinitialspace", "delim_whitespace", "engine"}
)  # fmt: skip


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int) -> bool:
        self.left -= n
        return self.left >= 0


def check_local_data(
    files: list[str], extension: str, field: str, extras: dict[str, Any] | None = None
) -> None:
    """The files open and parse, hold at least one row, and `field` is a column of text.

    Streaming (one line or one Parquet footer at a time) and bounded by `SCAN_BUDGET_BYTES`.
    Errors name the file (it is inside the data roots), the line and the column names, never
    the file's values.
    """
    extras = extras or {}
    budget = _Budget(SCAN_BUDGET_BYTES)
    rows = 0
    columns: set[str] = set()
    found = False
    for path in files:
        if budget.left <= 0:
            break
        if extension == "json":
            n, cols, has = _scan_json(path, field, extras, budget)
        elif extension == "csv":
            n, cols, has = _scan_csv(path, field, extras, budget)
        elif extension == "parquet":
            n, cols, has = _scan_parquet(path, field)
        else:
            n, cols, has = _scan_text(path, field, extras, budget)
        if n is None:
            return  # a shape this check does not model: the job's loader decides
        rows += n
        columns |= cols
        found = found or has
    if budget.left <= 0 and rows:
        found = found or field in columns
    if rows == 0:
        raise InvalidRequestError(
            f"`{DS}.data_files`: the data holds no rows; nothing to train on.",
            param=f"{DS}.data_files",
        )
    if not found:
        raise InvalidRequestError(
            f"`{DS}.tokenization_field`: the data has no column {field!r}; its columns: "
            f"{_columns_text(columns)}.",
            param=f"{DS}.tokenization_field",
        )


def _columns_text(columns: set[str] | list[str], limit: int = 30) -> str:
    names = sorted(columns) if isinstance(columns, set) else list(columns)
    shown = ", ".join(repr(c[:100]) for c in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (shown + more) or "(none)"


def _data_error(path: str, where: str, what: str, param: str = f"{DS}.data_files"):
    return InvalidRequestError(f"`{param}`: {path}{where}: {what}.", param=param)


def _not_text(path: str, where: str, field: str, value: Any):
    kind = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )
    return _data_error(
        path,
        where,
        f"column {field!r} holds a {kind}, not text; every value of `tokenization_field` must "
        "be a string (or null)",
        param=f"{DS}.tokenization_field",
    )


def _lines(path: str, encoding: str, budget: _Budget):
    """(line number, text) of a text file, within the budget; decoding errors name the line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not budget.take(len(raw)):
                return
            try:
                yield number, raw.decode(encoding)
            except UnicodeDecodeError:
                raise _data_error(path, f", line {number}", f"not valid {encoding} text") from None


def _encoding(extras: dict[str, Any]) -> str:
    enc = extras.get("encoding") or "utf-8"
    try:
        import codecs

        codecs.lookup(enc)
    except LookupError:
        raise InvalidRequestError(
            f"`{DS}.encoding`: unknown text encoding {enc!r}.", param=f"{DS}.encoding"
        ) from None
    return enc


def _scan_json(path: str, field: str, extras: dict[str, Any], budget: _Budget):
    """JSON Lines, one object a line; or one JSON document (a list of objects, an object of
    columns, or with the `field` keyword an object holding either)."""
    encoding = _encoding(extras)
    rows = 0
    columns: set[str] = set()
    found = False
    document = "field" in extras
    if not document:
        for number, line in _lines(path, encoding, budget):
            text = line.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except ValueError:
                if rows == 0 and text[0] in "[{":
                    document = True  # a pretty-printed JSON document, not JSON Lines
                    break
                raise _data_error(
                    path, f", line {number}", "not valid JSON (JSON Lines: one object a line)"
                ) from None
            if not isinstance(row, dict):
                if rows == 0 and isinstance(row, list):
                    document = True  # a JSON array on one line
                    break
                raise _data_error(path, f", line {number}", "not a JSON object")
            rows += 1
            columns |= set(row)
            if field in row:
                found = True
                if row[field] is not None and not isinstance(row[field], str):
                    raise _not_text(path, f", line {number}", field, row[field])
        if not document:
            return rows, columns, found
    size = os.path.getsize(path)
    if not budget.take(size):
        return None, set(), False  # too big to parse whole here
    try:
        with open(path, encoding=encoding) as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise _data_error(path, "", f"not valid {encoding} text") from None
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise _data_error(path, f", line {line}" if line else "", "not valid JSON") from None
    if "field" in extras:
        key = extras["field"]
        if not isinstance(data, dict) or key not in data:
            raise _data_error(
                path, "", f"no top-level key {key!r} (the `field` keyword)", param=f"{DS}.field"
            )
        data = data[key]
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise _data_error(path, f", item {i}", "not a JSON object")
            columns |= set(row)
            if field in row:
                found = True
                if row[field] is not None and not isinstance(row[field], str):
                    raise _not_text(path, f", item {i}", field, row[field])
        return len(data), columns, found
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        values = data.get(field)
        for i, value in enumerate(values or []):
            if value is not None and not isinstance(value, str):
                raise _not_text(path, f", item {i}", field, value)
        return max((len(v) for v in data.values()), default=0), set(data), field in data
    raise _data_error(path, "", "a JSON document must be a list of objects or an object of lists")


def _scan_csv(path: str, field: str, extras: dict[str, Any], budget: _Budget):
    encoding = _encoding(extras)
    delimiter = extras.get("delimiter") or extras.get("sep") or ","
    if not isinstance(delimiter, str) or len(delimiter) != 1 or _CSV_SHAPE_KEYS & set(extras):
        for _ in _lines(path, encoding, budget):  # still: it decodes
            pass
        return None, set(), False
    lines = (text for _, text in _lines(path, encoding, budget))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return 0, set(), False
        rows = 0
        numeric = True
        col = header.index(field) if field in header else None
        for row in reader:
            if not row:
                continue
            if len(row) > len(header):
                raise _data_error(
                    path,
                    f", line {reader.line_num}",
                    f"{len(row)} fields where the header has {len(header)}",
                )
            rows += 1
            if col is not None and col < len(row) and row[col].strip():
                numeric = numeric and _looks_numeric(row[col])
    except csv.Error:
        raise _data_error(path, f", line {reader.line_num}", "not valid CSV") from None
    if col is not None and rows and numeric:
        raise _data_error(
            path,
            "",
            f"column {field!r} holds only numbers (or booleans), which are read as such, not as "
            "text; `tokenization_field` must name a column of text",
            param=f"{DS}.tokenization_field",
        )
    return rows, set(header), col is not None


def _looks_numeric(value: str) -> bool:
    if value.strip().lower() in ("true", "false"):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def _scan_parquet(path: str, field: str):
    """The footer only: row count and schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        rows = meta.metadata.num_rows
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise _data_error(path, "", "not a readable Parquet file") from None
    names = set(schema.names)
    if field in names:
        kind = schema.field(field).type
        if not (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)
        ):
            raise _data_error(
                path, "", f"column {field!r} holds {kind}, not text",
                param=f"{DS}.tokenization_field",
            )  # fmt: skip
    return rows, names, field in names


def _scan_text(path: str, field: str, extras: dict[str, Any], budget: _Budget):
    """The `text` builder yields one column, `text`."""
    if field != "text":
        raise InvalidRequestError(
            f"`{DS}.tokenization_field`: a text file has one column, 'text'; got {field!r}.",
            param=f"{DS}.tokenization_field",
        )
    rows = 0
    for _, line in _lines(path, _encoding(extras), budget):
        if line.strip():
            rows += 1
    return rows, {"text"}, True


def describe_dataset(ds: DatasetConfig) -> dict[str, Any]:
    """The dataset as recorded in training_metadata.json."""
    desc: dict[str, Any] = {
        "source": ds.dataset_source,
        "split": ds.split,
        "tokenization_field": ds.tokenization_field,
    }
    if ds.dataset_source == "local":
        desc["data_files"] = ds.data_files
        desc["extension_type"] = ds.extension_type
    else:
        desc["name"] = ds.hf_dataset_name
        if ds.data_files:
            desc["data_files"] = ds.data_files
    return desc


# ---------------------------------------------------------------------------------------------
# worker side


def load_training_dataset(ds: DatasetConfig):
    """`datasets.load_dataset` for the config: the split asked for, as a `datasets.Dataset`."""
    from datasets import load_dataset

    extras = ds.extras()
    name = ds.hf_dataset_name or ""
    if ds.dataset_source != "local" and name.strip().lower() in packaged_builders():
        # refused at submit (it would read any file); a record from before that rule stops here
        raise InvalidRequestError(
            f"`{DS}.hf_dataset_name`: {name!r} is a file format; use dataset_source 'local'.",
            param=f"{DS}.hf_dataset_name",
        )
    try:
        if ds.dataset_source == "local":
            dataset = load_dataset(
                normalise_extension(ds.extension_type),
                data_files=ds.data_files,
                split=ds.split,
                **extras,
            )
        else:
            if ds.data_files:
                extras["data_files"] = ds.data_files
            dataset = load_dataset(ds.hf_dataset_name, split=ds.split, **extras)
    except StopIteration:  # what `datasets` raises for an empty local file
        raise InvalidRequestError(
            f"The dataset is empty ({describe_dataset(ds)}); nothing to train on.", param=DS
        ) from None
    except ValueError as exc:
        if "split" in str(exc).lower() and "unknown" in str(exc).lower():
            raise InvalidRequestError(f"`{DS}.split`: {exc}", param=f"{DS}.split") from None
        raise _load_error(ds, exc) from exc
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - loaders' messages may quote the file's content
        raise _load_error(ds, exc) from exc
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        raise InvalidRequestError(
            f"`{DS}.split` must name a single split (got {ds.split!r}, which loaded "
            f"{type(dataset).__name__}).",
            param=f"{DS}.split",
        )
    return dataset


def _load_error(ds: DatasetConfig, exc: BaseException) -> InvalidRequestError:
    """A loader failure in one sentence that quotes nothing from the data (parsers put rows and
    column names of whatever file they read into their messages); the cause is in the log."""
    if ds.dataset_source == "local":
        what = f"the {normalise_extension(ds.extension_type)} file(s) in `data_files`"
    else:
        what = "the dataset (from the Hub, its cache or its directory)"
    return InvalidRequestError(
        f"`{DS}`: {what} could not be loaded ({type(exc).__name__}); check that the data is "
        "valid and unchanged since the job was submitted. Details are in the job's log.",
        param=DS,
    )


def tokenize_dataset(dataset, tokenizer, field: str, max_seq_length: int, *, num_proc: int = 1):
    """Tokenize column `field` (truncated to `max_seq_length`); drop empty rows and all columns.

    Raises `InvalidRequestError` when the column is missing, holds non-text, or nothing is left.
    """
    param = f"{DS}.tokenization_field"
    columns = list(dataset.column_names)
    if field not in columns:
        raise InvalidRequestError(
            f"`{param}`: the dataset has no column {field!r}; available columns: "
            f"{', '.join(map(repr, columns)) or '(none)'}.",
            param=param,
        )
    if len(dataset) == 0:
        raise InvalidRequestError(
            f"The dataset is empty (split {dataset.split!s}); nothing to train on.",
            param=f"{DS}",
        )

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = batch[field]
        for value in texts:
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(
                    f"`{param}`: column {field!r} must hold text, found a "
                    f"{type(value).__name__} value.",  # the value itself is never echoed
                    param=param,
                )
        enc = tokenizer(
            [t or "" for t in texts],
            truncation=True,
            max_length=max_seq_length,
            add_special_tokens=True,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=columns,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 10_000 else None,
        desc="Tokenizing",
    )
    tokenized = tokenized.filter(lambda ex: sum(ex["attention_mask"]) > 1, desc="Dropping empty")
    if len(tokenized) == 0:
        raise InvalidRequestError(
            f"`{param}`: every row of column {field!r} is empty after tokenization; nothing to "
            "train on.",
            param=param,
        )
    return tokenized
