"""A job killed mid-training resumes from its last checkpoint when it runs again.

The worker is a real process, SIGKILLed once it has written a checkpoint; the second run (what a
re-queued job's worker does) must pick the checkpoint up and end with the adapter an
uninterrupted run produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ft_helpers import PIRATE_DATA, RecordingReporter, pirate_dataset

from sllm.finetune import checkpoints
from sllm.finetune.base import JobSpec, ValidationContext, get_backend
from sllm.paths import jobs_dir

RUN_ONE = """
import json, sys
from pathlib import Path
from sllm.finetune.base import JobSpec, get_backend

class Quiet:
    def progress(self, **fields): pass
    def event(self, kind, message, data=None): pass

spec = JobSpec(sys.argv[1], "tiny", Path(sys.argv[2]), json.loads(sys.argv[3]), num_cpus=1)
get_backend("peft_lora").run(spec, Quiet())
"""


def config(output: str, checkpoint_minutes: float) -> dict:
    return {
        "output_dir": f"adapters/{output}",
        "dataset_config": pirate_dataset(),
        "lora_config": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "training_config": {
            "num_train_epochs": 25,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,
            "seed": 5,
        },
        "max_seq_length": 48,
        "checkpoint_minutes": checkpoint_minutes,
    }


def normalised(storage: Path, cfg: dict) -> dict:
    ctx = ValidationContext(storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    return get_backend("peft_lora").validate(cfg, ctx)


def adapter(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _checkpoint(root: Path, step: int, *, state=True, optimizer=True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if optimizer:
        (d / checkpoints.OPTIMIZER_FILE).write_bytes(b"x")
    if state:
        body = {"global_step": step, "log_history": [{"step": step, "loss": 1.5}]}
        (d / checkpoints.STATE_FILE).write_text(json.dumps(body))
    return d


def test_latest_complete_checkpoint_skips_one_cut_short_or_without_optimizer(tmp_path):
    assert checkpoints.latest_complete_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8)
    _checkpoint(tmp_path, 12, state=False)  # killed mid-save
    _checkpoint(tmp_path, 16, optimizer=False)  # save_only_model: would reset the optimizer
    (tmp_path / "checkpoint-99").write_text("not a directory")
    _checkpoint(tmp_path, 10, state=False)
    (tmp_path / "checkpoint-10" / checkpoints.STATE_FILE).write_text("{truncated")
    best = checkpoints.latest_complete_checkpoint(tmp_path)
    assert best == tmp_path / "checkpoint-8"
    assert checkpoints.earlier_losses(best) == [{"step": 8, "loss": 1.5}]


def test_checkpoints_of_another_run_are_dropped_not_resumed(tmp_path):
    scratch = tmp_path / "trainer"
    first = checkpoints.run_fingerprint(config={"lr": 1}, data="abc")
    assert checkpoints.resumable_checkpoint(scratch, first) == (None, None)  # nothing yet
    _checkpoint(scratch, 6)
    assert checkpoints.resumable_checkpoint(scratch, first) == (scratch / "checkpoint-6", None)
    # the data file was edited before the job ran again
    other = checkpoints.run_fingerprint(config={"lr": 1}, data="abd")
    found, why = checkpoints.resumable_checkpoint(scratch, other)
    assert found is None and "checkpoint-6 was not resumed" in why
    assert not (scratch / "checkpoint-6").exists()
    _checkpoint(scratch, 3)  # written by the new attempt: resumable by the next one
    assert checkpoints.resumable_checkpoint(scratch, other) == (scratch / "checkpoint-3", None)


@pytest.mark.slow
def test_a_killed_job_resumes_from_its_checkpoint_and_ends_where_it_would_have(ft_storage):
    backend = get_backend("peft_lora")
    straight_cfg = normalised(ft_storage, config("straight", 0))
    spec = JobSpec("ckpt-straight", "tiny", ft_storage, straight_cfg, num_cpus=1)
    straight = backend.run(spec, RecordingReporter())
    assert not list((jobs_dir(ft_storage) / "ckpt-straight" / "trainer").glob("checkpoint-*"))
    straight_meta = json.loads((straight.adapter_path / "training_metadata.json").read_text())
    total_steps = straight_meta["steps"]

    job = "ckpt-killed"
    cfg = normalised(ft_storage, config("resumed", 0.002))  # a checkpoint every ~0.1 s
    scratch = jobs_dir(ft_storage) / job / "trainer"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_ONE, job, str(ft_storage), json.dumps(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        found = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = checkpoints.latest_complete_checkpoint(scratch)
            if found is not None and checkpoints.read_state(found)["global_step"] >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoints.read_state(checkpoints.latest_complete_checkpoint(scratch))
    assert 5 <= killed_at["global_step"] < total_steps

    reporter = RecordingReporter()
    result = backend.run(JobSpec(job, "tiny", ft_storage, cfg, num_cpus=1), reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())

    resumed = meta["resumed_from"]
    assert resumed["step"] >= killed_at["global_step"]
    assert any("Resuming from checkpoint-" in e["message"] for e in reporter.events("info"))
    first_progress = reporter.progress_calls[0]
    assert first_progress["step"] > resumed["step"]  # no step was trained twice
    assert meta["steps"] == total_steps
    # the loss tokens of the killed attempt's steps came back with its checkpoint
    assert meta["trained_tokens"] == straight_meta["trained_tokens"] > 0
    steps_logged = [p["step"] for p in meta["loss_history"]]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[0] < resumed["step"]
    # The same adapter as the uninterrupted run: weights, optimizer, schedule, data order and
    # RNG all came back.
    import torch

    mine, theirs = adapter(result.adapter_path), adapter(straight.adapter_path)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=1e-6, rtol=1e-5), name
