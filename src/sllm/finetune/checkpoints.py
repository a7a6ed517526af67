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
it only once the new one is written. One without `optimizer.pt` (`save_only_model`) would resume
with a fresh optimizer and schedule, so it is skipped too.

A checkpoint is only resumed by the run it belongs to: each attempt writes a fingerprint of what
determines the training (the normalised config, the base model's checksum, the tokenized data's
fingerprint, the device, precision, token budget and batching plan, library versions) beside the
checkpoints; when it differs (the data file was edited,
the server upgraded), the checkpoints are dropped and the job trains from step 0, with an event
saying why. (Resuming someone else's steps would skip the wrong batches, or none at all.)

A clean server shutdown SIGTERMs the worker (`graceful_stop`): before training starts it simply
stops (nothing trained yet, nothing lost); while it trains, the Trainer saves a checkpoint at the
next step boundary and the run ends with `StopRequested`; once the last step is done, the adapter
is saved as usual. So a shutdown costs at most one step, whatever `checkpoint_minutes` is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
FINGERPRINT_FILE = "sllm_fingerprint.json"


def read_state(checkpoint: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def _checkpoints(scratch: Path) -> list[tuple[int, Path]]:
    if not scratch.is_dir():
        return []
    out = []
    for entry in scratch.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir():
            out.append((int(m.group(1)), entry))
    return out


def latest_complete_checkpoint(scratch: Path) -> Path | None:
    """The highest-step `checkpoint-N` under `scratch` with a readable trainer state and the
    optimizer state."""
    found = [
        (step, path)
        for step, path in _checkpoints(scratch)
        if (path / OPTIMIZER_FILE).is_file() and read_state(path) is not None
    ]
    return max(found)[1] if found else None


def run_fingerprint(**parts: Any) -> str:
    """A digest of what determines a run's steps (see the module docstring)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def resumable_checkpoint(scratch: Path, fingerprint: str) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from, or None; why checkpoints found were dropped, or None).

    Records `fingerprint` as this attempt's, so the checkpoints it writes can be resumed by the
    next attempt of the same run.
    """
    found = latest_complete_checkpoint(scratch)
    dropped = None
    if found is not None:
        try:
            stored = json.loads((scratch / FINGERPRINT_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            stored = None
        if stored != fingerprint:
            for _, path in _checkpoints(scratch):
                shutil.rmtree(path, ignore_errors=True)
            dropped = (
                f"{found.name} was not resumed: the job's configuration, data, base model, "
                "device or library versions differ from those of the attempt that wrote it (or "
                "could not be compared); training starts from step 0."
            )
            found = None
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return found, dropped


def earlier_losses(checkpoint: Path) -> list[dict[str, Any]]:
    """The loss points the attempt that wrote `checkpoint` logged, as `{"step", "loss"}` (and
    `train_mean_token_accuracy` where it was logged)."""
    state = read_state(checkpoint) or {}
    accuracy = "train_mean_token_accuracy"
    return [
        {"step": int(h["step"]), "loss": float(h["loss"])}
        | ({accuracy: h[accuracy]} if accuracy in h else {})
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


class StopRequested(BaseException):
    """The worker was asked to stop (SIGTERM: a server shutdown) and did, cleanly. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` turns it into
    a failure."""


class GracefulStop:
    """What SIGTERM means to a training run, by phase: `preparing` (loading the model and data:
    stop at once), `training` (finish the step, save a checkpoint, stop), `finishing` (the last
    step is done: save the adapter, then exit as usual)."""

    def __init__(self) -> None:
        self.requested = False
        self.phase = "preparing"
        self.stopped_at: int | None = None
        self.job_ended: Callable[[], bool] | None = None

    def install(self, job_ended: Callable[[], bool] | None = None) -> None:
        """Handle SIGTERM in this process (the worker's main thread). `job_ended` tells a cancel
        or a timeout (the job's status already written) from a shutdown: the worker then dies at
        once, as SIGTERM always made it, with no checkpoint nor adapter to write."""
        self.job_ended = job_ended
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        try:
            ended = self.job_ended is not None and self.job_ended()
        except Exception:  # noqa: BLE001 - cannot tell: stop cleanly, the safe choice
            ended = False
        if ended:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True
        if self.phase == "preparing":
            raise StopRequested("Stopped before training began; nothing was lost.")

    def callback(self):
        """The `TrainerCallback` that turns a stop request into a checkpoint and an exit."""
        from transformers import TrainerCallback

        stop = self

        class GracefulStopCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                stop.phase = "training"
                if stop.requested and state.global_step < state.max_steps:
                    raise StopRequested("Stopped before the first step; nothing was lost.")

            def on_step_end(self, args, state, control, **kwargs):
                if stop.requested and state.global_step < state.max_steps:
                    control.should_save = True
                    stop.stopped_at = state.global_step

            def on_save(self, args, state, control, **kwargs):
                if stop.stopped_at is not None:  # the checkpoint is complete on disk now
                    raise StopRequested(
                        f"Stopped at step {stop.stopped_at}; checkpoint-{stop.stopped_at} saved."
                    )

            def on_train_end(self, args, state, control, **kwargs):
                stop.phase = "finishing"

        return GracefulStopCallback()


graceful_stop = GracefulStop()  # one per process: the signal handler is process-wide
