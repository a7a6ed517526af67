"""Epoch checkpoints: the newest few are kept (the final always), each complete with its
metrics; a half-written one is never listed."""

from __future__ import annotations

import json
from pathlib import Path

from sllm.finetune import epochs


class FakeAdapter:
    """Stands in for a PeftModel: `save_pretrained` writes what the real one writes."""

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"w")
        (Path(path) / "adapter_config.json").write_text("{}")


def test_keeps_the_newest_and_lists_them_newest_first(tmp_path):
    root = tmp_path / "epochs"
    history = []
    for epoch in range(1, 6):
        history.append({"step": epoch * 4, "loss": float(10 - epoch)})
        metrics = epochs.epoch_metrics(history, (epoch - 1) * 4)
        epochs.save_checkpoint(FakeAdapter(), root, epoch * 4, float(epoch), metrics)
    (root / ".tmp-step-99-1").mkdir()  # a save cut short: not a checkpoint
    (root / "step-98").mkdir()  # no metrics.json: not complete
    listed = epochs.read_checkpoints(root)
    assert [c["step_number"] for c in listed] == [20, 16, 12]
    assert listed[0]["metrics"] == {"step": 20, "train_loss": 5.0, "valid_loss": None}
    assert json.loads((root / "step-12" / "metrics.json").read_text())["epoch"] == 3.0


def test_metrics_average_the_epoch_and_take_the_last_eval():
    history = [
        {"step": 1, "loss": 4.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 3.5},
        {"step": 3, "loss": 1.0},
    ]
    assert epochs.epoch_metrics(history, 1) == {"train_loss": 1.5, "valid_loss": 3.5}
    assert epochs.epoch_metrics(history, 3)["train_loss"] == 1.0  # none since: the last one
