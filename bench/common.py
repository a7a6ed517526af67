"""What every benchmark shares: the machine's description, result files (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict[str, Any]:
    """Where a result was measured: CPU, load, GPU, library versions."""
    info: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "git_commit": _git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], table: str, out_dir: Path = RESULTS) -> Path:
    """`<name>.json` and `<name>.md` (the table and the machine) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    env = data.get("machine", {})
    where = ", ".join(
        f"{k} {env[k]}"
        for k in ("cpu_model", "cpus", "gpu", "torch", "transformers", "loadavg_1m")
        if env.get(k) is not None
    )
    (out_dir / f"{name}.md").write_text(
        f"### {name}\n\n{table}\n\nMeasured {env.get('when', '?')} on {where}.\n"
    )
    return path


def bar_plot(
    path: Path,
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    unit: str,
    log: bool = False,
):
    """Grouped bars (one group per label); skipped quietly without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot at {path})", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=name)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_child(module: str, variant: str, size: str, prep_file: Path, device: str) -> dict:
    """`python -m MODULE --variant V --size S --prep P --device D` in a fresh process (a clean
    peak memory and no state shared between variants): the JSON of its `RESULT ` line."""
    cmd = [sys.executable, "-m", module, "--variant", variant, "--size", size]
    cmd += ["--prep", str(prep_file), "--device", device]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
