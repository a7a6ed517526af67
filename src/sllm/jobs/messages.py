"""Job error messages as the API shows them: one readable line, no traceback, no foreign paths.

A worker's failure can carry anything: a multi-line exception text, a library's traceback, the
absolute path of a file in the library's install or the user's home. The API answer gets one line
that says what went wrong; the whole story (traceback, last log lines) stays in the job's log,
`_jobs/<id>/worker.log` under the storage path. Paths outside the store are shortened to their
last component, so an answer never tells a client where things live on the server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MAX_REASON_CHARS = 400
MAX_MESSAGE_CHARS = 1000

# An absolute POSIX path, not part of a URL or of a relative path (`a/b`, `http://h/x`).
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(/[^\s'\"`,;()\[\]{}<>|]+)")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
_FRAME_LINE = re.compile(r'^\s*File "[^"]*", line \d+')


def log_hint(job_id: str) -> str:
    """Where the details of a job's failure are: a path inside the store, fine to show."""
    return f"see the job's log `_jobs/{job_id}/worker.log` under the storage path for details"


def scrub_paths(text: str, storage: Path | None) -> str:
    """Keep paths inside `storage`; replace any other absolute path by `…/<its last part>`.

    Only paths whose first component exists on this machine (`/usr`, `/tmp`, `/home`...) are
    touched, so route names such as `/v1/fine_tuning/jobs` stay as they are.
    """
    root = str(storage).rstrip("/") + "/" if storage is not None else None

    def replace(match: re.Match[str]) -> str:
        path = match.group(1)
        trimmed = path.rstrip(".:")
        if root is not None and (trimmed + "/").startswith(root):
            return path
        first = trimmed.split("/")[1] if trimmed.count("/") >= 1 else ""
        if not first or not os.path.exists("/" + first):
            return path
        name = os.path.basename(trimmed.rstrip("/")) or "…"
        return "…/" + name + path[len(trimmed) :]

    return _ABS_PATH.sub(replace, text)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The readable part of `text` on one line: no traceback frames, whitespace collapsed,
    at most `limit` characters (cut at a word, marked with `…`)."""
    text = _TRACEBACK.split(text, maxsplit=1)[0] if _TRACEBACK.search(text) else text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _FRAME_LINE.match(ln)]
    flat = re.sub(r"\s+", " ", " ".join(lines)).strip()
    if len(flat) > limit:
        cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
        flat = cut.rstrip(" ,;:") + " …"
    return flat


def readable_error(text: str, storage: Path | None, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as a job's `error.message`: one line, foreign paths scrubbed, ending in a stop."""
    line = one_line(scrub_paths(text, storage), limit) or "The job failed."
    return line if line.endswith((".", "!", "?", "…")) else line + "."


def exception_reason(exc: BaseException, storage: Path | None) -> str:
    """`Type: first readable line` of an exception, for a failure that is not the client's."""
    detail = one_line(scrub_paths(str(exc), storage))
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name
