"""Checkpoints in the job's scratch directory, so a re-queued job resumes instead of restarting.

A job is re-queued when the server dies under it or its cluster node is lost (see
`sllm.jobs.supervisor`); its worker then runs the backend again with the same job id, finds the
last complete checkpoint in `_jobs/<id>/trainer` and hands it to `Trainer.train(
resume_from_checkpoint=...)`, which restores the LoRA weights, optimizer, scheduler, RNG states
and step, and skips the batches already trained. Checkpoints are written every
`checkpoint_minutes` (a time, not a step count: a user's config says nothing about how long a step
takes), keeping the last one; the supervisor deletes them when the job ends.

The Trainer writes a checkpoint's files one after another and `trainer_state.json` after the
weights, optimizer and RNG state, so a directory without a readable `trainer_state.json` was cut
short (a kill mid-save) and is skipped; the previous one is still there, because rotation deletes
it only once the new one is written.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def read_state(checkpoint: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def latest_complete_checkpoint(scratch: Path) -> Path | None:
    """The highest-step `checkpoint-N` under `scratch` whose trainer state is readable."""
    if not scratch.is_dir():
        return None
    found = []
    for entry in scratch.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir() and read_state(entry) is not None:
            found.append((int(m.group(1)), entry))
    return max(found)[1] if found else None


def earlier_losses(checkpoint: Path) -> list[dict[str, Any]]:
    """The loss points the attempt that wrote `checkpoint` logged, as `{"step", "loss"}`."""
    state = read_state(checkpoint) or {}
    return [
        {"step": int(h["step"]), "loss": float(h["loss"])}
        for h in state.get("log_history", [])
        if isinstance(h, dict) and "loss" in h and "step" in h
    ]


def periodic_checkpoint_callback(interval_s: float):
    """A `TrainerCallback` asking the Trainer to save a checkpoint once `interval_s` seconds have
    passed since training (or the last save) began; never after the last step (the adapter is
    saved then anyway)."""
    from transformers import TrainerCallback

    class PeriodicCheckpoint(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due = time.monotonic() - self.last >= interval_s
            if due and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return PeriodicCheckpoint()
