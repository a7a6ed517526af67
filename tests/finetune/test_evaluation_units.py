"""The validator's bookkeeping: best evaluation, patience, the best weights kept for a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sllm.finetune.evaluation import Validator, check_split_fits, split_sizes


class Weights:
    """A stand-in with `named_parameters` (the validator copies the trainable ones)."""

    def __init__(self, value: float) -> None:
        import torch

        self.a = torch.nn.Parameter(torch.full((2, 2), value))
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def named_parameters(self):
        return [("lora_A", self.a), ("base", self.frozen)]


def validator(tmp_path: Path, **kw) -> Validator:
    return Validator([], None, batch_size=1, scratch=tmp_path / "trainer", **kw)


def evaluate(v: Validator, losses: list[float]) -> list[bool]:
    return [v.record(i + 1, {"valid_loss": x, "valid_mean_token_accuracy": 0.5}, Weights(x))
            for i, x in enumerate(losses)]  # fmt: skip


def test_patience_counts_evaluations_not_beating_the_best_by_the_threshold(tmp_path):
    v = validator(tmp_path, patience=2, threshold=0.1)
    # 2.95 is a new best (kept) but not better by more than 0.1: it counts against patience
    assert evaluate(v, [3.0, 2.95, 3.5]) == [False, False, True]
    assert (v.best_step, v.best_loss, v.stopped_early_at) == (2, 2.95, 3)
    assert v.best_weights["lora_A"].flatten().tolist() == pytest.approx([2.95] * 4)
    assert "base" not in v.best_weights


def test_without_patience_it_never_stops_and_nan_is_never_best(tmp_path):
    v = validator(tmp_path)
    assert not any(evaluate(v, [float("nan"), 4.0, 5.0, 3.0]))
    assert (v.best_step, v.best_loss) == (4, 3.0)
    assert v.history[0]["valid_loss"] is None  # strict JSON in the metadata


def test_best_weights_on_disk_follow_the_checkpoints(tmp_path):
    v = validator(tmp_path)
    scratch = tmp_path / "trainer"
    names = lambda: sorted(p.name for p in scratch.glob("best-*"))  # noqa: E731
    evaluate(v, [3.0, 2.0])
    assert names() == ["best-2.safetensors"]  # no checkpoint yet: only the newest
    v.checkpoint_saved()
    v.record(3, {"valid_loss": 1.0, "valid_mean_token_accuracy": 0.5}, Weights(1.0))
    # a restart resumes from the checkpoint (best: step 2) or a later one (best: step 3)
    assert names() == ["best-2.safetensors", "best-3.safetensors"]
    v.checkpoint_saved()
    assert names() == ["best-3.safetensors"]


def test_restore_replays_the_checkpoints_evaluations(tmp_path):
    first = validator(tmp_path, patience=3)
    evaluate(first, [3.0, 2.0, 2.5])
    first.checkpoint_saved()
    checkpoint = tmp_path / "trainer" / "checkpoint-3"
    checkpoint.mkdir()
    history = [{"step": h["step"], "valid_loss": h["valid_loss"]} for h in first.history]
    state = {"global_step": 3, "log_history": [{"step": 1, "loss": 9.0}, *history]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    again = validator(tmp_path, patience=3)
    assert again.restore(checkpoint) is None
    assert (again.best_step, again.best_loss, again.bad_evaluations) == (2, 2.0, 1)
    assert again.best_weights["lora_A"].flatten().tolist() == [2.0] * 4
    assert [h["step"] for h in again.history] == [1, 2, 3]

    (tmp_path / "trainer" / "best-2.safetensors").unlink()
    lost = validator(tmp_path, patience=3)
    assert "step 2" in lost.restore(checkpoint) and lost.best_step is None
    fresh = validator(tmp_path)
    evaluate(fresh, [1.0])
    assert validator(tmp_path).restore(None) is None  # a fresh start drops what was left
    assert not list((tmp_path / "trainer").glob("best-*"))


@pytest.mark.parametrize(
    "rows,split,sizes,ok",
    [(10, 0.25, (7, 3), True), (10, 9, (1, 9), True), (10, 10, (0, 10), False),
     (3, 0.9, (0, 3), False), (1, 0.5, (0, 1), False), (None, 5, None, True)],
)  # fmt: skip
def test_split_sizes(rows, split, sizes, ok):
    if sizes is not None:
        assert split_sizes(rows, split) == sizes
    if ok:
        check_split_fits(rows, split)
    else:
        with pytest.raises(Exception, match="leaves 0 to train on"):
            check_split_fits(rows, split)
