"""Epoch checkpoints: the adapter as it was at the end of each epoch, servable on its own.

While the job trains they are written to its scratch (`_jobs/<id>/epochs/step-<N>/`: the adapter's
`adapter_model.safetensors` and `adapter_config.json`, plus `metrics.json` with `step_number`,
`epoch` and `metrics` {`step`, `train_loss`, `valid_loss`}); each is written to a `.tmp-` dir and
renamed into place, so a listed one is complete. The last `KEEP` are kept, and the final step's
always (written when training ends, unless an epoch end was the last step). When the adapter is
saved they move with it, atomically, to `<adapter dir>/checkpoints/step-<N>/`: a subdirectory the
adapter loader never reads (it reads the top-level files only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

KEEP = 3  # epoch checkpoints kept (the newest); the final one is always among them
DIR_NAME = "checkpoints"  # inside the saved adapter directory
SCRATCH_NAME = "epochs"  # inside the job's scratch, while it trains
METRICS_FILE = "metrics.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under `root`, oldest first."""
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        match = _STEP_DIR.match(entry.name)
        if match and (entry / METRICS_FILE).is_file():
            out.append((int(match.group(1)), entry))
    return sorted(out)


def read_checkpoints(root: Path) -> list[dict[str, Any]]:
    """The metrics.json of each checkpoint under `root`, newest first, with `created_at` (its
    directory's mtime, seconds)."""
    out = []
    for step, path in reversed(checkpoint_dirs(root)):
        try:
            info = json.loads((path / METRICS_FILE).read_text())
            created = int(path.stat().st_mtime)
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            out.append({**info, "step_number": step, "created_at": created})
    return out


def save_checkpoint(model, root: Path, step: int, epoch: float | None, metrics: dict) -> Path:
    """Write the adapter at `step` under `root` (tmp dir, then rename); prune to `KEEP`."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    if target.is_dir():
        return target
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    info = {"step_number": step, "epoch": epoch, "metrics": {"step": step, **metrics}}
    (tmp / METRICS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    os.rename(tmp, target)
    for _, old in checkpoint_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def epoch_metrics(log_history: list[dict[str, Any]], since_step: int) -> dict[str, float | None]:
    """Mean training loss logged after `since_step`, the last one if none was, and the last
    evaluation loss (when the job has validation data)."""
    losses = [h["loss"] for h in log_history if "loss" in h and h.get("step", 0) > since_step]
    if not losses:
        losses = [h["loss"] for h in log_history if "loss" in h][-1:]
    evals = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return {
        "train_loss": float(sum(losses) / len(losses)) if losses else None,
        "valid_loss": float(evals[-1]) if evals else None,
    }


def epoch_callback(root: Path):
    """A `TrainerCallback` saving a checkpoint at each epoch's end."""
    from transformers import TrainerCallback

    class EpochCheckpointCallback(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            step = int(state.global_step or 0)
            if model is None or step == 0:
                return
            done = checkpoint_dirs(root)
            since = done[-1][0] if done else 0
            metrics = epoch_metrics(state.log_history, since)
            save_checkpoint(model, root, step, _round(state.epoch), metrics)

    return EpochCheckpointCallback()


def save_final(model, root: Path, state) -> None:
    """The final step's checkpoint, unless the last epoch's end already wrote it."""
    step = int(state.global_step or 0)
    done = checkpoint_dirs(root)
    if step == 0 or (done and done[-1][0] == step):
        return
    since = done[-1][0] if done else 0
    save_checkpoint(model, root, step, _round(state.epoch), epoch_metrics(state.log_history, since))


def _round(value: Any) -> float | None:
    return round(float(value), 4) if value is not None else None
