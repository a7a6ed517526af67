"""The web console: static files (HTML, plain JS modules, CSS) served by `sllm start` at `/`.

No build step and nothing fetched at run time: the browser loads `static/` as it ships in the
package and talks to the same public API as every other client (with the API key the user types
in, kept in the tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
# What the edge lets through without an API key: the page and its files, exactly (not a prefix:
# nothing else under /console/ opens).
STATIC_PATHS = frozenset(
    {"/", *(f"/console/{p.name}" for p in STATIC_DIR.iterdir() if p.is_file())}
)
