"""The training data's shape, read cheaply at submit time: it parses, has rows, every JSON row
fits its format (`sllm.finetune.formats.check_row`: chat messages, prompt/completion, or a
`tokenization_field` column of text), and one dataset holds one format.

Streaming (a line, or a Parquet footer, at a time) and bounded by `SCAN_BUDGET_BYTES`, so a
submission costs milliseconds for typical files and never holds a whole file in memory. Errors
name the file (always inside the data roots by then), the line and the column names; never a
value from the file.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import DS
from sllm.finetune.formats import (
    CHAT,
    PROMPT_COMPLETION,
    TEXT,
    check_row,
    detect_format,
    format_of_columns,
)

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


class RowScan:
    """Per-row checks of JSON rows against the configured format (`auto`: the first row's
    format, which every later row must share), and the size of the text to train on."""

    def __init__(self, fmt: str, field: str | None) -> None:
        self.fmt = fmt
        self.field = field
        self.seen: str | None = None  # the first row's format, under `auto`
        self.chars = 0

    def effective(self, columns: set[str]) -> str:
        if self.fmt != "auto":
            return self.fmt
        return self.seen or format_of_columns(columns)

    def check(self, row: dict[str, Any], path: str, where: str) -> None:
        fmt = self.fmt
        if fmt == "auto":
            detected = detect_format(row)
            if self.seen is None:
                self.seen = detected
            elif detected != self.seen:
                raise _data_error(
                    path, where, f"a {detected} row where the first row is {self.seen}; one "
                    "dataset holds rows of one format (chat `messages`, `prompt` + `completion`, "
                    "or text)", param=f"{DS}.format",
                )  # fmt: skip
            fmt = self.seen
        if fmt == TEXT:
            value = row.get(self.field) if self.field else None
            if value is not None and not isinstance(value, str):
                raise _not_text(path, where, self.field, value)
            self.chars += len(value or "")
            return
        problem = check_row(row, fmt)
        if problem:
            raise _data_error(path, where, problem, param=DS)
        if fmt == CHAT:
            self.chars += sum(len(m["content"]) + 16 for m in row["messages"])  # + markup
        else:
            self.chars += len(row["prompt"]) + len(row["completion"]) + 16


# Characters per token of English text under the usual BPE vocabularies: for the estimate only.
CHARS_PER_TOKEN = 4.0


def check_local_data(
    files: list[str],
    extension: str,
    field: str | None,
    extras: dict[str, Any] | None = None,
    fmt: str = "auto",
) -> dict[str, Any]:
    """The files open and parse, hold at least one row, every JSON row fits the format (see
    `RowScan`), and for text rows `field` is a column of text. Returns what was seen: rows,
    format, estimated tokens (None where rows were not read one by one), whether every byte
    was read.

    Streaming (one line or one Parquet footer at a time) and bounded by `SCAN_BUDGET_BYTES`.
    Errors name the file (it is inside the data roots), the line and the column names, never
    the file's values.
    """
    extras = extras or {}
    budget = _Budget(SCAN_BUDGET_BYTES)
    scan = RowScan(fmt, field)
    rows = 0
    columns: set[str] = set()
    found = False
    for path in files:
        if budget.left <= 0:
            break
        try:
            n, cols, has = _scan_file(path, extension, field, extras, budget, scan)
        except OSError as exc:
            raise InvalidRequestError(
                f"`{DS}.data_files`: {Path(path).name} cannot be read ({exc.strerror or exc}).",
                param=f"{DS}.data_files",
            ) from None
        except RecursionError:
            raise InvalidRequestError(
                f"`{DS}.data_files`: {Path(path).name} nests its values too deeply to parse.",
                param=f"{DS}.data_files",
            ) from None
        if n is None:
            # a shape this check does not model: the job's loader decides
            return {"rows": None, "format": scan.effective(columns), "estimated_tokens": None}
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
    effective = scan.effective(columns)
    summary = {
        "rows": rows,
        "format": effective,
        "estimated_tokens": round(scan.chars / CHARS_PER_TOKEN) if scan.chars else None,
        "complete": budget.left > 0,
    }
    if effective != TEXT:
        _check_format_columns(effective, extension, columns)
        return summary
    if field is None:
        raise InvalidRequestError(
            f"`{DS}.tokenization_field` is required for text rows (the data has no `messages` "
            f"column for chat, nor `prompt` and `completion`); its columns: "
            f"{_columns_text(columns)}.",
            param=f"{DS}.tokenization_field",
        )
    if not found:
        raise InvalidRequestError(
            f"`{DS}.tokenization_field`: the data has no column {field!r}; its columns: "
            f"{_columns_text(columns)}.",
            param=f"{DS}.tokenization_field",
        )
    return summary


def _check_format_columns(fmt: str, extension: str, columns: set[str]) -> None:
    """Chat and prompt_completion rows outside JSON: the columns they need are there, and chat
    messages (a list per row) come from JSON or Parquet only."""
    needed = ["messages"] if fmt == CHAT else ["prompt", "completion"]
    if fmt == CHAT and extension in ("csv", "text"):
        raise InvalidRequestError(
            f"`{DS}.format`: chat rows need JSON Lines (or Parquet) files, whose `messages` "
            f"hold a list; {extension} files hold only text.",
            param=f"{DS}.format",
        )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InvalidRequestError(
            f"`{DS}.format`: {fmt} rows need the column {missing[0]!r}; the data's columns: "
            f"{_columns_text(columns)}.",
            param=f"{DS}.format",
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


def _scan_file(
    path: str, extension: str, field: str | None, extras: dict[str, Any], budget: _Budget,
    scan: RowScan,
):  # fmt: skip
    if extension == "json":
        return _scan_json(path, field, extras, budget, scan)
    if extension == "csv":
        return _scan_csv(path, field, extras, budget)
    if extension == "parquet":
        return _scan_parquet(path, field)
    return _scan_text(path, field, extras, budget, scan)


def _encoding(extras: dict[str, Any]) -> str:
    enc = extras.get("encoding") or "utf-8"
    try:
        import codecs

        if not codecs.lookup(enc)._is_text_encoding:  # hex, base64, zlib: bytes-to-bytes
            raise LookupError(enc)
    except (LookupError, TypeError):
        raise InvalidRequestError(
            f"`{DS}.encoding`: unknown text encoding {enc!r}.", param=f"{DS}.encoding"
        ) from None
    return enc


def _scan_json(
    path: str, field: str | None, extras: dict[str, Any], budget: _Budget, scan: RowScan
):
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
            found = found or field in row
            scan.check(row, path, f", line {number}")
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
            found = found or field in row
            scan.check(row, path, f", item {i}")
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


def _scan_text(
    path: str, field: str | None, extras: dict[str, Any], budget: _Budget, scan: RowScan
):
    """The `text` builder yields one column, `text`."""
    if field is not None and field != "text":
        raise InvalidRequestError(
            f"`{DS}.tokenization_field`: a text file has one column, 'text'; got {field!r}.",
            param=f"{DS}.tokenization_field",
        )
    rows = 0
    for _, line in _lines(path, _encoding(extras), budget):
        if line.strip():
            rows += 1
            scan.chars += len(line)
    return rows, {"text"}, field == "text"


# ---------------------------------------------------------------------------------------------
# one row of an uploaded JSON Lines file (the Files API): which training format it is in

ROW_FORMATS = (TEXT, CHAT, PROMPT_COMPLETION)


class RowError(ValueError):
    """A row in no known format; the message says what is wrong (never quoting the row)."""


def row_format(row: Any) -> str:
    """`text` (a `text` string), `chat` (`messages`, see `formats.check_messages`) or
    `prompt_completion` (`prompt` and `completion` strings); else `RowError`. The same row
    checks as a job's data scan (`formats.check_row`), with `text` as the text rows' field."""
    if not isinstance(row, dict):
        raise RowError("not a JSON object")
    fmt = detect_format(row)
    if fmt == TEXT and "text" not in row:
        keys = ", ".join(repr(k[:40]) for k in list(row)[:10]) or "none"
        raise RowError(
            "no `messages`, `prompt` + `completion` or `text` field (a training row needs one); "
            f"its keys: {keys}"
        )
    problem = check_row(row, fmt, "text")
    if problem:
        raise RowError(problem)
    return fmt
