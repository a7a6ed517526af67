"""Reading a job's worker log by byte offsets: the last N lines, or a page from an offset.

Offsets are bytes into `_jobs/<id>/worker.log`, so a client follows a growing log by asking again
from the `next_offset` it was given. A page never ends inside a UTF-8 character (the cut moves back
to the character's first byte), so pages decode on their own and join up byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TAIL_LINES = 200
MAX_TAIL_LINES = 10_000
DEFAULT_LIMIT_BYTES = 64 * 1024
MAX_LIMIT_BYTES = 1024 * 1024
TAIL_SCAN_BYTES = MAX_LIMIT_BYTES  # how far back a tail looks for its lines
TAIL_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class LogPage:
    offset: int  # byte offset of the first byte of `data`
    next_offset: int  # where the next page starts (offset + len(data))
    size: int  # the log's size when it was read
    data: bytes


def _complete_utf8(data: bytes) -> int:
    """The length of `data` without a trailing, incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the first byte of the last character
            need = (
                1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            )
            return len(data) if back >= need else len(data) - back
    return len(data)


def read_range(path: Path, offset: int, limit: int) -> LogPage:
    """At most `limit` bytes from `offset` (an offset past the end reads nothing)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = min(offset, size)
            f.seek(start)
            data = f.read(min(limit, size - start))
    except FileNotFoundError:
        return LogPage(0, 0, 0, b"")
    keep = _complete_utf8(data)
    if keep == 0 and data:  # one character longer than the page: send it whole
        keep = len(data)
    data = data[:keep]
    return LogPage(start, start + len(data), size, data)


def read_tail(path: Path, lines: int) -> LogPage:
    """The last `lines` lines, read backwards in chunks (looking back at most TAIL_SCAN_BYTES)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start, data = size, b""
            while start > max(0, size - TAIL_SCAN_BYTES):
                step = min(TAIL_CHUNK_BYTES, start - max(0, size - TAIL_SCAN_BYTES))
                start -= step
                f.seek(start)
                data = f.read(step) + data
                if data.count(b"\n", 0, len(data) - 1) >= lines:
                    break
    except FileNotFoundError:
        return LogPage(0, 0, 0, b"")
    cut = len(data)
    body_end = cut - 1 if data.endswith(b"\n") else cut  # a final newline ends the last line
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, body_end)
        if cut < 0:
            break
        body_end = cut
    first = 0 if cut < 0 else body_end + 1
    if cut < 0 and start > 0:  # the window starts mid-line: begin at its first whole line
        newline = data.find(b"\n")
        first = newline + 1 if newline >= 0 else 0
    return LogPage(start + first, start + len(data), size, data[first:])
