"""Validation during a `peft_lora` run: held-out rows, evaluation, early stopping, the best adapter.

Validation data is a second dataset (`backend_config.validation_dataset_config`) or a seeded share
of the training rows (`dataset_config.validation_split`). The Trainer decides *when* to evaluate
(`eval_strategy`/`eval_steps` in `training_config`, defaulting to ten evaluations per run, plus
one at the end); `ValidationMixin.evaluate` decides *how*: one pass over the validation rows with
the job's own collator (padding-free rows included), summing the token losses and the tokens
whose argmax prediction is the label, so `valid_loss` is the mean over every labelled token of
the set (not a mean of batch means) and `valid_mean_token_accuracy` the share predicted right.
The training batches' token accuracy (`train_mean_token_accuracy`) is counted on the device as
the steps run and read at each logging step, like the loss.

`Validator` keeps the best evaluation (lowest `valid_loss`): its LoRA weights in memory and in
the job's scratch directory (`best-<step>.safetensors`), so a run re-queued after a restart
finds the best of the steps it skips. Which evaluation was best, and how many evaluations have
passed without an improvement (`early_stopping_patience`), are replayed from the checkpoint's
`log_history`, where the Trainer recorded every evaluation. At most two weight files are kept:
the best as of the last checkpoint and the newest best.

Importing this module does not import torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import DS, P

VALID_LOSS = "valid_loss"
VALID_ACCURACY = "valid_mean_token_accuracy"
TRAIN_ACCURACY = "train_mean_token_accuracy"
DEFAULT_EVAL_STEPS = 0.1  # a fraction of the run: ten evaluations
IGNORE_INDEX = -100
_BEST_FILE = re.compile(r"^best-(\d+)\.safetensors$")


# ----------------------------------------------------------------------------- submit-time checks


def split_sizes(num_rows: int, split: int | float) -> tuple[int, int]:
    """(training rows, validation rows) for `validation_split` of `num_rows` rows, as
    `datasets.Dataset.train_test_split` draws them (a fraction rounds the held-out share up)."""
    held = int(split) if isinstance(split, int) else math.ceil(split * num_rows)
    return num_rows - held, held


def check_split_fits(num_rows: int | None, split: int | float | None) -> None:
    """A `validation_split` that leaves no row to train on (or holds none out) is a 400."""
    if split is None or num_rows is None:
        return
    train, held = split_sizes(num_rows, split)
    if train < 1 or held < 1:
        param = f"{DS}.validation_split"
        raise InvalidRequestError(
            f"`{param}`={split!r} of {num_rows} row(s) leaves {max(train, 0)} to train on and "
            f"{max(held, 0)} to validate on; both need at least one. Use a smaller share, or "
            f"give separate validation data in `{P}.validation_dataset_config`.",
            param=param,
        )


def check_validation_config(cfg) -> bool:
    """The validation keys of a `BackendConfig` agree with each other; True when the job has
    validation data."""
    split = cfg.dataset_config.validation_split
    separate = cfg.validation_dataset_config
    if split is not None and separate is not None:
        raise InvalidRequestError(
            f"`{DS}.validation_split` and `{P}.validation_dataset_config` exclude each other; "
            "give one.",
            param=f"{DS}.validation_split",
        )
    if separate is not None and separate.validation_split is not None:
        param = f"{P}.validation_dataset_config.validation_split"
        raise InvalidRequestError(
            f"`{param}` has no meaning for the validation data itself; remove it.", param=param
        )
    has_data = split is not None or separate is not None
    if cfg.early_stopping_threshold is not None and cfg.early_stopping_patience is None:
        param = f"{P}.early_stopping_threshold"
        raise InvalidRequestError(
            f"`{param}` only applies with `{P}.early_stopping_patience`.", param=param
        )
    if cfg.early_stopping_patience is not None:
        param = f"{P}.early_stopping_patience"
        if not has_data:
            raise InvalidRequestError(
                f"`{param}` needs validation data to watch: give `{DS}.validation_split` or "
                f"`{P}.validation_dataset_config`.",
                param=param,
            )
        if cfg.training_config.get("eval_strategy") == "no":
            raise InvalidRequestError(
                f"`{param}` needs evaluations during training, but "
                f'`{P}.training_config.eval_strategy` is "no".',
                param=param,
            )
    return has_data


def renamed_errors(fn, *args, **kwargs):
    """Run a `dataset_config` check or loader on the validation config: its errors name
    `validation_dataset_config` instead."""
    try:
        return fn(*args, **kwargs)
    except InvalidRequestError as exc:
        target = f"{P}.validation_dataset_config"
        message = exc.message.replace(DS, target)
        if target not in message:
            message = f"`{target}`: {message}"
        param = exc.param.replace(DS, target) if exc.param else target
        raise InvalidRequestError(message, param=param) from None


def eval_overrides(training_config: dict[str, Any], has_validation: bool) -> dict[str, Any]:
    """TrainingArguments for evaluation: ten evaluations per run unless the config says when."""
    if not has_validation or "eval_strategy" in training_config:
        return {}
    out: dict[str, Any] = {"eval_strategy": "steps"}
    if "eval_steps" not in training_config:
        out["eval_steps"] = DEFAULT_EVAL_STEPS
    return out


# ----------------------------------------------------------------------------- worker side


def split_rows(rows, split: int | float, seed: int):
    """(training rows, validation rows): `split` rows (or that share) drawn with `seed`."""
    check_split_fits(len(rows), split)
    parts = rows.train_test_split(test_size=split, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _token_counts(logits, labels, *, with_loss: bool = True):
    """(summed cross-entropy or None, tokens right, tokens) of the next-token predictions whose
    label is not ignored; device tensors (no host sync)."""
    import torch
    import torch.nn.functional as F

    logits = logits[..., :-1, :]
    labels = labels[..., 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    right = (logits.argmax(-1).eq(labels) & mask).sum()
    total = mask.sum()
    if not with_loss:
        return None, right, total
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    losses = F.cross_entropy(logits.float().flatten(0, -2), safe.flatten(), reduction="none")
    return (losses * mask.flatten()).sum(), right, total


def _finite(value: float | None) -> float | None:
    """None for NaN/Infinity: the metadata and the job record are strict JSON."""
    return value if value is not None and math.isfinite(value) else None


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


class Validator:
    """Evaluates, keeps the best evaluation's LoRA weights, and says when to stop early."""

    def __init__(
        self,
        rows,
        collator,
        *,
        batch_size: int,
        scratch: Path,
        patience: int | None = None,
        threshold: float | None = None,
    ) -> None:
        self.rows = rows
        self.collator = collator
        self.batch_size = batch_size
        self.scratch = Path(scratch)
        self.patience = patience
        self.threshold = threshold or 0.0
        self.history: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_loss: float | None = None
        self.best_weights: dict[str, Any] | None = None
        self.bad_evaluations = 0
        self.stopped_early_at: int | None = None
        self._checkpointed_best: int | None = None

    # -- the pass over the validation rows

    def measure(self, model, device) -> dict[str, float]:
        """`valid_loss` and `valid_mean_token_accuracy` of `model` on the validation rows."""
        import torch

        from sllm.finetune.packing import pop_counts

        was_training = model.training
        model.eval()
        sums = None
        try:
            with torch.no_grad():
                for start in range(0, len(self.rows), self.batch_size):
                    end = min(start + self.batch_size, len(self.rows))
                    batch = self.collator([self.rows[i] for i in range(start, end)])
                    pop_counts(batch)
                    labels = batch.pop("labels")
                    logits = model(**_to_device(batch, device), use_cache=False).logits
                    parts = _token_counts(logits, labels)
                    if sums is not None:
                        parts = [a + b for a, b in zip(sums, parts, strict=True)]
                    sums = parts
        finally:
            model.train(was_training)
        loss_sum, right, total = sums if sums is not None else (None, None, None)
        count = int(total) if total is not None else 0
        if count == 0:
            return {VALID_LOSS: math.nan, VALID_ACCURACY: math.nan}
        return {VALID_LOSS: float(loss_sum) / count, VALID_ACCURACY: int(right) / count}

    # -- bookkeeping of one evaluation

    def record(self, step: int, metrics: dict[str, float], model) -> bool:
        """Note the evaluation at `step`; returns True when training should stop early."""
        loss = metrics[VALID_LOSS]
        self.history.append({"step": step, **{k: _finite(v) for k, v in metrics.items()}})
        if self._update(step, loss):
            self.best_weights = trainable_state(model)
            self._persist_best(step)
        return self._should_stop(step)

    def _update(self, step: int, loss: float) -> bool:
        """Best and patience bookkeeping (as transformers' EarlyStoppingCallback counts): an
        evaluation improves on the best when lower; it resets the patience count only when
        lower by more than the threshold."""
        if not math.isfinite(loss):
            self.bad_evaluations += 1
            return False
        previous = self.best_loss
        if previous is None or loss < previous - self.threshold:
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if previous is None or loss < previous:
            self.best_step, self.best_loss = step, loss
            return True
        return False

    def _should_stop(self, step: int) -> bool:
        if self.patience is not None and self.bad_evaluations >= self.patience:
            self.stopped_early_at = step
            return True
        return False

    # -- the best weights on disk, for a resumed attempt

    def _persist_best(self, step: int) -> None:
        import os

        from safetensors.torch import save_file

        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f".best-{step}.tmp"
        save_file(self.best_weights, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, self.scratch / f"best-{step}.safetensors")
        self._prune(keep={step, self._checkpointed_best})

    def _prune(self, keep: set[int | None]) -> None:
        for path in self.scratch.glob("best-*.safetensors"):
            m = _BEST_FILE.match(path.name)
            if m and int(m.group(1)) not in keep:
                path.unlink(missing_ok=True)

    def checkpoint_saved(self) -> None:
        """A checkpoint is complete: a resumed attempt starts from it and needs only the best
        as of now."""
        self._checkpointed_best = self.best_step
        self._prune(keep={self.best_step})

    def restore(self, checkpoint: Path | None) -> str | None:
        """Replay the evaluations recorded in `checkpoint` (None: a fresh start, which drops
        any best weights left behind). Returns a warning when the best weights are missing."""
        if checkpoint is None:
            self._prune(keep=set())
            return None
        from sllm.finetune.checkpoints import read_state

        state = read_state(checkpoint) or {}
        for entry in state.get("log_history", []):
            if isinstance(entry, dict) and VALID_LOSS in entry and "step" in entry:
                step, value = int(entry["step"]), entry[VALID_LOSS]
                loss = float(value) if isinstance(value, (int, float)) else math.nan
                accuracy = entry.get(VALID_ACCURACY)
                self.history.append(
                    {"step": step, VALID_LOSS: _finite(loss), VALID_ACCURACY: _finite(accuracy)}
                )
                self._update(step, loss)
        self._checkpointed_best = self.best_step
        if self.best_step is None:
            return None
        path = self.scratch / f"best-{self.best_step}.safetensors"
        try:
            from safetensors.torch import load_file

            self.best_weights = load_file(str(path))
        except OSError:
            lost = self.best_step
            self.best_step = self.best_loss = None
            return (
                f"The weights of the best evaluation so far (step {lost}) were not found; the "
                "best adapter is chosen among the evaluations from here on."
            )
        self._prune(keep={self.best_step})
        return None

    def apply_best(self, model) -> None:
        """Load the best evaluation's LoRA weights into `model` (the one that gets saved)."""
        if self.best_weights is None:
            return
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.best_weights:
                    param.copy_(self.best_weights[name].to(param.device, param.dtype))

    def describe(self) -> dict[str, Any]:
        """The validation part of `training_metadata.json`."""
        return {
            "num_rows": len(self.rows),
            "history": self.history,
            "best_step": self.best_step,
            "best_valid_loss": self.best_loss,
            "early_stopping_patience": self.patience,
            "early_stopping_threshold": self.threshold if self.patience is not None else None,
            "stopped_early_at": self.stopped_early_at,
        }

    def callback(self):
        """Tells the validator when a checkpoint is complete."""
        from transformers import TrainerCallback

        validator = self

        class BestAdapterCallback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                validator.checkpoint_saved()

        return BestAdapterCallback()


def trainable_state(model) -> dict[str, Any]:
    """A CPU copy of the trainable (LoRA) weights, by parameter name."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class ValidationMixin:
    """Trainer methods: evaluation through the `Validator`, and the training batches' token
    accuracy. Mixed into the backend's Trainer (`sllm.finetune.speed.make_trainer`)."""

    validator: Validator | None = None
    _right = None
    _total = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.validator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.validator.measure(self.model, self.args.device)
        step = int(self.state.global_step)
        if self.validator.record(step, metrics, self.model):
            self.control.should_training_stop = True
        self.log(dict(metrics))
        own = {f"{metric_key_prefix}_loss": metrics[VALID_LOSS],
               f"{metric_key_prefix}_mean_token_accuracy": metrics[VALID_ACCURACY]}  # fmt: skip
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, own)
        return own

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        logits = getattr(outputs, "logits", None)
        labels = inputs.get("labels")
        if model.training and logits is not None and labels is not None:
            import torch

            with torch.no_grad():
                _, right, total = _token_counts(logits.detach(), labels, with_loss=False)
            self._right = right if self._right is None else self._right + right
            self._total = total if self._total is None else self._total + total
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._total is not None:
            total = int(self._total)
            if total:
                logs[TRAIN_ACCURACY] = int(self._right) / total
            self._right = self._total = None
        super().log(logs, start_time)
