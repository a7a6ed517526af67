"""The `peft_lora` fine-tuning backend: LoRA adapters for stored causal LMs via PEFT + HF Trainer.

`validate` runs in the API server and imports `transformers`/`peft` lazily (a few seconds the first
time, milliseconds after). `run` runs in the job's worker process: it loads the stored base model,
tokenizes the dataset, trains with `transformers.Trainer`, reports progress through the
`Reporter`, and saves the adapter atomically to `$STORAGE_PATH/transformers/<output_dir>`.

Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sllm.errors import ConflictError, InvalidRequestError
from sllm.finetune import epochs
from sllm.finetune.base import (
    JobSpec,
    Reporter,
    TrainingDivergedError,
    TrainResult,
    ValidationContext,
)
from sllm.finetune.batching import plan_batching
from sllm.finetune.checkpoints import (
    earlier_losses,
    graceful_stop,
    periodic_checkpoint_callback,
    read_state,
    resumable_checkpoint,
    run_fingerprint,
)
from sllm.finetune.config import (
    DEFAULT_MAX_SEQ_LENGTH,
    BackendConfig,
    P,
    build_lora_config,
    build_training_arguments,
    check_batching,
    check_dataset_extras,
    check_finite,
    check_lora_rank,
    check_training_config,
    check_training_keys,
    default_output_dir,
    lora_config_with_defaults,
    parse_backend_config,
    token_budget,
)
from sllm.finetune.data import check_dataset_config, describe_dataset
from sllm.finetune.evaluation import (
    TRAIN_ACCURACY,
    VALID_ACCURACY,
    VALID_LOSS,
    Validator,
    check_split_fits,
    check_validation_config,
    eval_overrides,
    renamed_errors,
    split_rows,
)
from sllm.finetune.formats import (
    model_has_chat_template,
    no_template_message,
    prepare_dataset,
    report_dataset,
    submit_note,
)
from sllm.finetune.init_adapter import (
    adapter_digest,
    adapter_lora_config,
    load_trainable,
    resolve_init_adapter,
)
from sllm.finetune.speed import (
    choose_precision,
    compile_layers,
    compile_unavailable,
    compiled_graphs,
    configure_threads,
    lora_inputs_follow_autocast,
    loss_tokens_seen,
    make_trainer,
    repeated_layers,
    training_overrides,
)
from sllm.paths import backend_root, jobs_dir, model_dir, resolve_inside

METADATA_NAME = "training_metadata.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
METADATA_FORMAT_VERSION = 1


class PeftLoraBackend:
    """LoRA fine-tuning with PEFT. See `sllm.finetune.base.Backend` for the contract."""

    name = "peft_lora"

    # ------------------------------------------------------------------ validate (API server)

    def validate(self, backend_config: dict[str, Any], ctx: ValidationContext) -> dict[str, Any]:
        """Check everything the run would reject; return the config with defaults filled in.

        Returned keys: output_dir (relative to `$STORAGE_PATH/transformers`), dataset_config
        (local paths made absolute, extension normalised), lora_config (defaults merged),
        training_config (as given), max_seq_length (None means: decided from the model),
        batching, tokens_per_batch (None means: the device's default, see `token_budget`),
        checkpoint_minutes, compile.
        """
        check_finite(backend_config)
        cfg = parse_backend_config(backend_config)
        storage = Path(ctx.storage_path)
        output_rel = cfg.output_dir if cfg.output_dir is not None else default_output_dir(ctx.model)
        target = resolve_inside(backend_root(storage), output_rel, param=f"{P}.output_dir")
        check_output_target(target, storage, ctx.model)

        check_batching(cfg)
        has_validation = check_validation_config(cfg)
        init_path = None
        if cfg.init_adapter is not None:
            init_path = resolve_init_adapter(storage, cfg.init_adapter, ctx.model, target)
            lora = adapter_lora_config(init_path, cfg.lora_config)
        else:
            lora = lora_config_with_defaults(cfg.lora_config)
            build_lora_config(lora)  # a bad LoRA config is a 400 naming the field
        check_training_config(
            cfg.training_config,
            cuda_available=_cuda_available(),
            num_cpus=ctx.num_cpus,
            validation=has_validation,
        )
        # The data last: it is the one check that reads more than a few bytes.
        seen: dict[str, Any] = {}
        dataset = check_dataset_config(
            cfg.dataset_config,
            list(ctx.data_roots),
            storage=storage,
            num_cpus=ctx.num_cpus,
            summary=seen,
        )
        if seen.get("format", cfg.dataset_config.format) == "chat" and not model_has_chat_template(
            model_dir(storage, ctx.model)
        ):
            raise InvalidRequestError(no_template_message(), param=f"{P}.dataset_config.format")
        ctx.created_note = submit_note(seen, cfg.training_config)
        check_split_fits(
            seen.get("rows") if seen.get("complete") else None,
            cfg.dataset_config.validation_split,
        )
        extra: dict[str, Any] = {}
        if cfg.validation_dataset_config is not None:
            extra["validation_dataset_config"] = renamed_errors(
                check_dataset_config,
                cfg.validation_dataset_config,
                list(ctx.data_roots),
                storage=storage,
                num_cpus=ctx.num_cpus,
            )
        for key in ("early_stopping_patience", "early_stopping_threshold", "init_adapter"):
            if getattr(cfg, key) is not None:
                extra[key] = getattr(cfg, key)

        model_config = _read_model_config(storage, ctx.model)
        if model_config is not None:
            limit = _max_positions(model_config)
            if cfg.max_seq_length is not None and limit and cfg.max_seq_length > limit:
                raise InvalidRequestError(
                    f"`{P}.max_seq_length`={cfg.max_seq_length} exceeds the model's "
                    f"max_position_embeddings ({limit}); use at most {limit}.",
                    param=f"{P}.max_seq_length",
                )
            if init_path is None:  # an init adapter's config was trained on this model
                check_lora_rank(lora, model_config, ctx.model)
                _check_lora_targets(storage, ctx.model, lora)

        return {
            "output_dir": output_rel,
            "dataset_config": dataset,
            "lora_config": dict(cfg.lora_config) if init_path is not None else lora,
            "training_config": dict(cfg.training_config),
            "max_seq_length": cfg.max_seq_length,
            "batching": cfg.batching,
            "tokens_per_batch": cfg.tokens_per_batch,
            "checkpoint_minutes": cfg.checkpoint_minutes,
            "compile": cfg.compile,
            **extra,
        }

    def warm_up(self) -> None:
        """What the first `validate` would otherwise pay (~0.2-0.4 s on top of the imports): PEFT
        on a model skeleton builds transformers' weight-conversion tables (regexes, once per
        process), and `TrainingArguments` imports accelerate."""
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=16,
        )  # fmt: skip
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(AutoModelForCausalLM.from_config(config), build_lora_config({}))
        check_training_config({}, cuda_available=_cuda_available())
        check_dataset_extras({"keep_in_memory": False}, local=True, extension="json")

    # ------------------------------------------------------------------ run (worker process)

    def run(self, spec: JobSpec, reporter: Reporter) -> TrainResult:
        started = time.monotonic()
        import torch

        cfg = parse_backend_config(spec.backend_config)
        storage = Path(spec.storage_path)
        output_rel = (
            cfg.output_dir if cfg.output_dir is not None else default_output_dir(spec.model)
        )
        adapter_dir = resolve_inside(backend_root(storage), output_rel, param=f"{P}.output_dir")
        check_output_target(adapter_dir, storage, spec.model)
        init_path = None
        if cfg.init_adapter is not None:
            init_path = resolve_init_adapter(storage, cfg.init_adapter, spec.model, adapter_dir)
            lora = adapter_lora_config(init_path, cfg.lora_config)
        else:
            lora = lora_config_with_defaults(cfg.lora_config)
            lora_obj = build_lora_config(lora)
        has_validation = check_validation_config(cfg)
        check_training_keys(cfg.training_config, validation=has_validation)

        check_batching(cfg)
        threads = configure_threads(spec.num_cpus)
        use_cuda = spec.num_gpus > 0 and torch.cuda.is_available()
        device = "cuda" if use_cuda else "cpu"
        if spec.num_gpus > 0 and not use_cuda:
            reporter.event("warning", "GPUs were requested but CUDA is not available; using CPU.")
        precision = choose_precision(cfg.training_config, use_cuda=use_cuda)

        scratch = jobs_dir(storage) / spec.job_id / "trainer"
        scratch.mkdir(parents=True, exist_ok=True)
        overrides = {
            **training_overrides(cfg.training_config, use_cuda=use_cuda),
            **precision.overrides,
            **eval_overrides(cfg.training_config, has_validation),
        }
        args = build_training_arguments(cfg.training_config, scratch, **overrides)

        reporter.event("info", f"Loading base model {spec.model!r} on {device}.")
        from sllm.store.loader import load_model, read_manifest

        model, tokenizer = load_model(
            storage, spec.model, device=device, dtype=precision.load_dtype
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        saved_padding_side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        max_len = resolve_max_seq_length(cfg.max_seq_length, model.config, reporter)
        budget = token_budget(cfg, device=device, max_seq_length=max_len)
        if budget is not None and max_len > budget:
            reporter.event("warning", f"Rows are truncated to tokens_per_batch ({budget}).")
            max_len = budget

        _quiet_datasets()
        ds_cfg = cfg.dataset_config
        seed = args.data_seed if args.data_seed is not None else args.seed
        data_stats, train_set, valid_set = load_datasets(
            cfg, tokenizer, max_len, spec.num_cpus, seed
        )
        report_dataset(reporter, data_stats, max_len)
        if valid_set is not None:
            reporter.event(
                "info",
                f"Validation data: {len(valid_set)} rows; {len(train_set)} rows to train on.",
                {"num_train_rows": len(train_set), "num_valid_rows": len(valid_set)},
            )

        from peft import get_peft_model

        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        from transformers import set_seed

        set_seed(args.seed)  # LoRA's random init follows the job's seed, like the rest
        if init_path is not None:
            peft_model = load_trainable(model, init_path)
            reporter.event("info", f"Starting from the adapter at {cfg.init_adapter}.")
        else:
            peft_model = get_peft_model(model, lora_obj)
        trainable, total = peft_model.get_nb_trainable_parameters()
        uncast = lora_inputs_follow_autocast(peft_model) if precision.autocast_dtype else 0

        layers = None
        if cfg.compile:
            layers = repeated_layers(peft_model)
            why_not = "no stack of identical decoder layers" if layers is None else None
            why_not = why_not or compile_unavailable(torch.device(device).type)
            if why_not:
                layers = None
                reporter.event("warning", f"`compile` is off for this job: {why_not}.")
        plan = plan_batching(
            cfg.batching,
            peft_model,
            tokenizer,
            train_set,
            cfg.training_config,
            device=torch.device(device),
            autocast_dtype=precision.autocast_dtype,
            tokens_per_batch=budget,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            compiled=layers is not None,
            max_seq_length=max_len,
        )
        if plan.overrides:
            overrides.update(plan.overrides)
            args = build_training_arguments(cfg.training_config, scratch, **overrides)
        speed = {
            **plan.describe(),
            "compiled_layers": compile_layers(layers) if layers is not None else 0,
            "precision": precision.name,
            "lora_layers_without_input_cast": uncast,
            "cpu_threads": None if use_cuda else threads,
        }
        reporter.event("info", plan.summary(), speed)

        tracker = TrainingTracker(reporter)
        guard = DivergenceGuard(peft_model)
        callbacks = [guard.callback(), make_progress_callback(tracker), graceful_stop.callback()]
        validator = None
        if valid_set is not None:
            validator = Validator(
                valid_set,
                plan.collator,
                batch_size=args.per_device_eval_batch_size,
                scratch=scratch,
                patience=cfg.early_stopping_patience,
                threshold=cfg.early_stopping_threshold,
            )
            callbacks.insert(0, validator.callback())  # its on_save before graceful stop's
        if cfg.checkpoint_minutes > 0:
            callbacks.append(periodic_checkpoint_callback(cfg.checkpoint_minutes * 60))
        epochs_root = jobs_dir(storage) / spec.job_id / epochs.SCRATCH_NAME
        callbacks.append(epochs.epoch_callback(epochs_root))
        manifest = read_manifest(storage, spec.model) or {}
        versions = library_versions()
        fingerprint = run_fingerprint(  # what decides the batches and the steps
            config=cfg.model_dump(exclude={"checkpoint_minutes"}),
            base_model=manifest.get("checksum"),
            data=getattr(train_set, "_fingerprint", None) or len(train_set),
            validation=getattr(valid_set, "_fingerprint", None) if valid_set is not None else None,
            init_adapter=adapter_digest(init_path) if init_path is not None else None,
            max_seq_length=max_len,
            device=device,  # the token budget's default and the precision follow it
            precision=precision.name,
            tokens_per_batch=budget,
            attention_kernel=plan.kernel,  # packed or not
            batches=len(plan.train_dataset),
            versions=versions,
        )
        resume, dropped = resumable_checkpoint(scratch, fingerprint)
        if dropped:
            reporter.event("warning", dropped)
        resumed_from = None
        if resume is not None:
            resumed_from = {"checkpoint": resume.name, "step": read_state(resume)["global_step"]}
            tracker.loss_history = earlier_losses(resume)
            reporter.event(
                "info",
                f"Resuming from {resume.name}, written by an earlier attempt of this job (step "
                f"{resumed_from['step']}).",
                resumed_from,
            )
        if validator is not None:
            lost = validator.restore(resume)
            if lost:
                reporter.event("warning", lost)
            tracker.resume_validation(validator.history)
        trainer = make_trainer(
            validator=validator,
            model=peft_model,
            args=args,
            train_dataset=plan.train_dataset,
            eval_dataset=valid_set,
            data_collator=plan.collator,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        reporter.event(
            "info",
            f"Training {trainable:,} LoRA parameters ({100 * trainable / max(total, 1):.2f}% of "
            f"{total:,}).",
            {"trainable_params": trainable, "total_params": total},
        )
        train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if layers is not None:
            speed["compiled_graphs"] = compiled_graphs()
            if not speed["compiled_graphs"]:
                reporter.event("warning", "torch.compile produced no graph: the job ran eagerly.")
        state = trainer.state
        guard.raise_if_diverged(int(state.global_step), cfg.training_config)
        epochs.save_final(peft_model, epochs_root, state)
        validation = None
        if validator is not None:
            if not validator.history or validator.history[-1]["step"] != state.global_step:
                trainer.evaluate()  # the end of the run, when the schedule did not end there
            validator.apply_best(peft_model)
            validation = finish_validation(validator, cfg, reporter)

        tokenizer.padding_side = saved_padding_side
        final_loss = tracker.loss_history[-1]["loss"] if tracker.loss_history else None
        if final_loss is None and train_output.training_loss is not None:
            final_loss = float(train_output.training_loss)
        runtime_s = round(time.monotonic() - started, 3)
        metadata = {
            "format_version": METADATA_FORMAT_VERSION,
            "backend": self.name,
            "job_id": spec.job_id,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "base_model": {"name": spec.model, "checksum": manifest.get("checksum")},
            "output_dir": output_rel,
            "dataset": {
                **describe_dataset(ds_cfg),
                **data_stats,
                "num_train_rows": len(train_set),  # after any validation split
                "num_valid_rows": len(valid_set) if valid_set is not None else None,
            },
            "max_seq_length": max_len,
            "lora_config": lora,
            "training_config": dict(cfg.training_config),
            "training_overrides": overrides,
            "speed": speed,
            "resumed_from": resumed_from,
            "dataset_config": ds_cfg.model_dump(),
            "loss_history": tracker.loss_history,
            "validation": validation,
            "best_step": validation["best_step"] if validation else None,
            "best_valid_loss": validation["best_valid_loss"] if validation else None,
            "init_adapter": cfg.init_adapter,
            "final_loss": final_loss,
            "train_loss": _float_or_none(train_output.training_loss),
            "trained_tokens": loss_tokens_seen(state),  # tokens that carried loss
            "processed_tokens": int(state.num_input_tokens_seen or 0),  # all, prompts included
            "steps": int(state.global_step),
            "epochs": _float_or_none(state.epoch),
            "trainable_params": trainable,
            "runtime_s": runtime_s,
            "train_runtime_s": _float_or_none(train_output.metrics.get("train_runtime")),
            "device": device,
            "versions": versions,
        }
        replaced = save_adapter_atomically(
            peft_model, tokenizer, adapter_dir, metadata, spec.model, storage, epochs_root
        )
        if replaced is not None:
            made_by = (
                f"job {replaced['job_id']}, created {replaced['created_at']}"
                if replaced["job_id"]
                else f"not written by an sllm job, last modified {replaced['modified_at']}"
            )
            reporter.event(
                "info",
                f"Replaced the previous adapter at {output_rel} ({made_by}).",
                {"replaced": replaced},
            )
        return TrainResult(
            adapter_path=adapter_dir,
            metrics={
                "final_loss": final_loss,
                "trained_tokens": metadata["trained_tokens"],
                "runtime_s": runtime_s,
                "steps": metadata["steps"],
                **(
                    {
                        "best_step": validation["best_step"],
                        "best_valid_loss": validation["best_valid_loss"],
                    }
                    if validation
                    else {}
                ),
            },
        )


# ------------------------------------------------------------------------------------- helpers


def load_rows(ds_cfg, tokenizer, max_len: int, num_proc: int):
    """(data stats, the tokenized rows with their labels) of one dataset config: the training
    data and the validation data come through here alike."""
    rows, stats = prepare_dataset(ds_cfg, tokenizer, max_len, num_proc=num_proc)
    return stats, rows


def load_datasets(cfg: BackendConfig, tokenizer, max_len: int, num_proc: int, seed: int):
    """(training data stats, training rows, validation rows or None)."""
    stats, train_set = load_rows(cfg.dataset_config, tokenizer, max_len, num_proc)
    split = cfg.dataset_config.validation_split
    if split is not None:
        return (stats, *split_rows(train_set, split, seed))
    if cfg.validation_dataset_config is not None:
        _, valid_set = renamed_errors(
            load_rows, cfg.validation_dataset_config, tokenizer, max_len, num_proc
        )
        return stats, train_set, valid_set
    return stats, train_set, None


def finish_validation(validator: Validator, cfg: BackendConfig, reporter: Reporter) -> dict:
    """The validation summary for the metadata, and the event saying which adapter is saved."""
    out = validator.describe()
    if cfg.validation_dataset_config is not None:
        out["source"] = describe_dataset(cfg.validation_dataset_config)
    else:
        out["source"] = {"validation_split": cfg.dataset_config.validation_split}
    if validator.stopped_early_at is not None:
        reporter.event(
            "info",
            f"Early stopping at step {validator.stopped_early_at}: {validator.patience} "
            "evaluation(s) without improvement.",
            {"step": validator.stopped_early_at},
        )
    if validator.best_step is not None:
        reporter.event(
            "info",
            f"Saving the adapter of the best evaluation: step {validator.best_step}, "
            f"valid_loss {validator.best_loss:.4f}.",
            {"best_step": validator.best_step, "best_valid_loss": validator.best_loss},
        )
    return out


class TrainingTracker:
    """Turns trainer callbacks into `Reporter` calls and keeps the loss history."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.loss_history: list[dict[str, Any]] = []
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.last_metrics: dict[str, float | None] = {}  # token accuracy, validation
        self._t0: float | None = None
        self._first_step = 0
        self._first_tokens = 0
        self._first_trained = 0

    def train_begin(self, state) -> None:
        self._t0 = time.monotonic()
        self._first_step = int(state.global_step or 0)  # > 0 when resuming from a checkpoint
        self._first_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._first_trained = loss_tokens_seen(state)  # what a resumed checkpoint already counted

    def report(self, state) -> None:
        step = int(state.global_step or 0)
        total = int(state.max_steps or 0) or None
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        trained = loss_tokens_seen(state)
        elapsed = time.monotonic() - self._t0 if self._t0 is not None else None
        done_tokens = tokens - self._first_tokens  # this attempt's, as `elapsed` is
        tps = done_tokens / elapsed if elapsed and elapsed > 0 else None
        eta = None
        done = step - self._first_step
        if elapsed and done > 0 and total:
            eta = max(0.0, elapsed / done * (total - step))
        self.reporter.progress(
            step=step,
            total_steps=total,
            epoch=_round(state.epoch, 4),
            loss=self.last_loss,
            learning_rate=self.last_lr,
            trained_tokens=trained,
            start_trained_tokens=self._first_trained,  # for the monotonic total, not shown
            processed_tokens=tokens,
            tokens_per_second=_round(tps, 2),
            eta_seconds=_round(eta, 2),
            **self.last_metrics,
        )

    def resume_validation(self, history: list[dict[str, Any]]) -> None:
        """The last evaluation of an earlier attempt, shown until the next one."""
        if history:
            last = history[-1]
            self.last_metrics.update({k: last.get(k) for k in (VALID_LOSS, VALID_ACCURACY)})

    def log(self, state, logs: dict[str, Any]) -> None:
        if "learning_rate" in logs:
            self.last_lr = _float_or_none(logs["learning_rate"])
        step = int(state.global_step or 0)
        total = int(state.max_steps or 0)
        if "loss" in logs:
            loss = _float_or_none(logs["loss"])
            self.last_loss = loss
            point: dict[str, Any] = {"step": step, "loss": loss}
            if self.last_lr is not None:
                point["learning_rate"] = self.last_lr  # the console charts it by step
            if TRAIN_ACCURACY in logs:
                point[TRAIN_ACCURACY] = self.last_metrics[TRAIN_ACCURACY] = _round(
                    logs[TRAIN_ACCURACY], 6
                )
            self.loss_history.append(point)
            self.reporter.event(
                "loss",
                f"step {step}/{total}: loss {loss:.4f}" if loss is not None else f"step {step}",
                point,
            )
        if VALID_LOSS in logs:
            valid = {k: _finite_or_none(logs.get(k)) for k in (VALID_LOSS, VALID_ACCURACY)}
            self.last_metrics.update(valid)
            loss, accuracy = valid[VALID_LOSS], valid[VALID_ACCURACY]
            self.reporter.event(
                "metric",
                f"step {step}/{total}: valid_loss {loss:.4f}, valid_mean_token_accuracy "
                f"{accuracy:.4f}"
                if loss is not None and accuracy is not None
                else f"step {step}: validation",
                {"step": step, **valid},
            )
        self.report(state)


class DivergenceGuard:
    """Stops training at the first non-finite loss or LoRA weight, and refuses to save such an
    adapter: it would load and serve, answering NaN.

    The weights are checked after every optimizer step (one max-abs reduction over the
    trainable tensors), because the Trainer's default `logging_nan_inf_filter` hides a NaN step
    loss from the logs; the logged loss is checked too. On CPU the check is read at once; on a
    GPU the per-step results are combined on the device and read at each logging step, so the
    guard adds no host sync beyond the ones logging already makes.
    """

    def __init__(self, model) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.diverged_at: int | None = None
        self.what = ""
        self._pending = None  # device-side "all finite so far" since the last logging step

    def _finite_flag(self):
        import torch

        with torch.no_grad():
            peaks = torch._foreach_norm([p.detach() for p in self.params], float("inf"))
            device = peaks[0].device  # (a model split over devices: gather the peaks on one)
            return torch.stack([t.float().to(device) for t in peaks]).isfinite().all()

    def weights_finite(self) -> bool:
        return not self.params or bool(self._finite_flag())

    def _stop(self, step: int, what: str, control) -> None:
        if self.diverged_at is None:
            self.diverged_at, self.what = step, what
        control.should_training_stop = True

    def callback(self):
        from transformers import TrainerCallback

        guard = self

        class DivergenceCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if not guard.params:
                    return
                ok = guard._finite_flag()
                if ok.device.type == "cpu":
                    if not bool(ok):
                        guard._stop(int(state.global_step), "LoRA weights", control)
                else:
                    guard._pending = ok if guard._pending is None else guard._pending & ok

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    guard._stop(int(state.global_step), "loss", control)
                pending, guard._pending = guard._pending, None
                if pending is not None and not bool(pending):
                    guard._stop(int(state.global_step), "LoRA weights", control)

        return DivergenceCallback()

    def raise_if_diverged(self, step: int, training_config: dict[str, Any]) -> None:
        """Raise `TrainingDivergedError` if training stopped on divergence or the final weights
        are not finite (checked once more right before saving)."""
        if self.diverged_at is None and self.weights_finite():
            return
        at = self.diverged_at if self.diverged_at is not None else step
        what = self.what or "LoRA weights"
        lr = training_config.get("learning_rate")
        this = f" (this job's: {lr})" if lr is not None else ""
        raise TrainingDivergedError(
            f"Training diverged at step {at}: the {what} became NaN or infinite, so no adapter "
            f"was saved. Try a lower `learning_rate`{this}, gradient clipping (`max_grad_norm`) "
            "or full precision."
        )


def make_progress_callback(tracker: TrainingTracker):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            tracker.train_begin(state)

        def on_step_end(self, args, state, control, **kwargs):
            tracker.report(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            tracker.log(state, logs or {})

    return ProgressCallback()


def resolve_max_seq_length(requested: int | None, model_config: Any, reporter: Reporter) -> int:
    limit = _max_positions(model_config)
    if requested is None:
        return min(limit, DEFAULT_MAX_SEQ_LENGTH) if limit else DEFAULT_MAX_SEQ_LENGTH
    if limit and requested > limit:
        reporter.event(
            "warning",
            f"max_seq_length {requested} exceeds the model's {limit} positions; using {limit}.",
        )
        return limit
    return requested


def check_output_target(target: Path, storage: Path, model: str) -> None:
    """The adapter dir may be new, empty or an earlier adapter; never a model or other data,
    never inside another adapter or model (replacing that one would delete it), and never under
    a name the store keeps for itself (its cleanup would delete the adapter later)."""
    from sllm.store import layout

    param = f"{P}.output_dir"
    root = backend_root(storage).resolve()
    layout.check_own_names(target.relative_to(root).as_posix(), param=param)
    for parent in target.parents:
        if parent == root or root not in parent.parents:
            break
        if (parent / ADAPTER_CONFIG_NAME).is_file() or layout.has_manifest(parent):
            what = "LoRA adapter" if (parent / ADAPTER_CONFIG_NAME).is_file() else "stored model"
            raise InvalidRequestError(
                f"`{param}`: {target} lies inside the {what} at {parent}; replacing or deleting "
                "that one would delete this adapter too. Choose a path beside it.",
                param=param,
            )
    if model:
        try:
            base = model_dir(storage, model)
        except InvalidRequestError:
            base = None
        if base is not None and (target == base or base in target.parents):
            raise InvalidRequestError(
                f"`{param}` points inside the base model's directory ({base}); choose a path "
                f"beside it, e.g. {default_output_dir(model)!r}.",
                param=param,
            )
    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_dir():
            raise InvalidRequestError(
                f"`{param}`: {target} exists and is not a directory; choose another output_dir.",
                param=param,
            )
        if any(target.iterdir()) and not (target / ADAPTER_CONFIG_NAME).is_file():
            raise InvalidRequestError(
                f"`{param}`: {target} already holds something that is not a LoRA adapter (no "
                f"{ADAPTER_CONFIG_NAME}); it will not be replaced. Choose another output_dir.",
                param=param,
            )
        previous = _adapter_base(target)
        if model and previous is not None and previous != model:
            raise ConflictError(
                f"`{param}`: the adapter there was trained for {previous!r}, not {model!r}; a "
                "deployment of that model serving it would break. Choose another output_dir, or "
                "delete the old adapter first.",
                param=param,
            )


def _adapter_base(adapter_dir: Path) -> str | None:
    """The base model an existing adapter was trained for (as its config records it)."""
    try:
        with open(adapter_dir / ADAPTER_CONFIG_NAME) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def save_adapter_atomically(
    peft_model,
    tokenizer,
    adapter_dir: Path,
    metadata: dict[str, Any],
    model: str,
    storage: Path,
    checkpoints: Path | None = None,
) -> dict[str, Any] | None:
    """Write the adapter into a scratch dir beside `adapter_dir`, then swap it into place.

    An existing adapter is exchanged with the new one in one atomic step where the platform can
    (`renameat2`), so a reader (an instance loading it, a deploy) finds the old adapter or the
    new one, never a gap or a mix; elsewhere it is moved aside first and restored if the second
    rename fails. The old one is removed afterwards. The scratch dirs follow the store's naming
    (`.tmp-<pid>-...`, `.old-<pid>-...`) and the swap holds the store's lock.

    `checkpoints` (the job's epoch checkpoints, see `sllm.finetune.epochs`) are copied into
    `checkpoints/` of the new adapter before the swap, so they appear together with it.

    Returns what was replaced (`describe_adapter` of the previous adapter), or None.
    """
    from sllm.store import layout

    parent = adapter_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    layout.clean_stale(parent)  # scratch of a worker that died mid-save here
    tmp = layout.scratch_dir(parent)
    old: Path | None = None
    replaced: dict[str, Any] | None = None
    try:
        tmp.mkdir()
        peft_model.save_pretrained(str(tmp))
        _name_base_model(tmp / ADAPTER_CONFIG_NAME, model)
        tokenizer.save_pretrained(str(tmp))
        (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        if checkpoints is not None:
            for step, src in epochs.checkpoint_dirs(checkpoints):
                shutil.copytree(src, tmp / epochs.DIR_NAME / f"step-{step}")
        layout.normalise_permissions(tmp)
        _fsync_tree(tmp)
        with layout.store_lock(backend_root(storage)):
            check_output_target(adapter_dir, storage, model)  # nothing else appeared meanwhile
            if adapter_dir.exists():
                replaced = describe_adapter(adapter_dir)
                if layout.exchange(tmp, adapter_dir):  # tmp now holds the previous adapter
                    aside = layout.scratch_dir(parent, layout.OLD_PREFIX)
                    os.rename(tmp, aside)
                    tmp = aside
                else:
                    old = layout.scratch_dir(parent, layout.OLD_PREFIX)
                    os.rename(adapter_dir, old)
                    os.rename(tmp, adapter_dir)
            else:
                os.rename(tmp, adapter_dir)
            layout.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not adapter_dir.exists():
            os.rename(old, adapter_dir)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the previous adapter, after an exchange
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return replaced


def describe_adapter(adapter_dir: Path) -> dict[str, Any]:
    """Which run wrote the adapter at `adapter_dir`: its job id and time from its metadata (empty
    fields when it was not written by sllm), plus the directory's modification time."""
    try:
        meta = json.loads((adapter_dir / METADATA_NAME).read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    try:
        mtime = datetime.fromtimestamp(adapter_dir.stat().st_mtime, timezone.utc).isoformat()
    except OSError:
        mtime = None
    return {
        "path": str(adapter_dir),
        "job_id": meta.get("job_id"),
        "created_at": meta.get("created_at"),
        "base_model": (meta.get("base_model") or {}).get("name"),
        "modified_at": mtime,
    }


def _name_base_model(adapter_config: Path, model: str) -> None:
    """Record the base model as sllm names it, not by this machine's storage path.

    Done after `save_pretrained`, which looks the base model's config up by that name (a local
    path finds it; a bare name would send PEFT to the Hub).
    """
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = model
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import sllm

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["sllm"] = sllm.__version__
    return out


def _max_positions(model_config: Any) -> int | None:
    get = (
        model_config.get
        if isinstance(model_config, dict)
        else lambda k: getattr(model_config, k, None)
    )
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _read_model_config(storage: Path, model: str) -> dict[str, Any] | None:
    if not model:
        return None
    try:
        path = model_dir(storage, model) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    except (InvalidRequestError, OSError, ValueError):
        return None


def _check_lora_targets(storage: Path, model: str, lora: dict[str, Any]) -> None:
    """Apply the LoRA config to a weightless (meta-device) copy of the model: bad
    `target_modules` (or an architecture PEFT has no defaults for) fail here, not in the job.

    The outcome is remembered per (model config as it is now, LoRA config): building the
    skeleton and injecting LoRA costs 5-100 ms depending on depth, paid by every submission
    otherwise; the same model config with the same LoRA config gives the same answer."""
    try:
        path = model_dir(storage, model) / "config.json"
        content = path.read_bytes()  # a few KB: keying on it, not on mtime, is exact
        key = json.dumps(lora, sort_keys=True, default=str)
    except (InvalidRequestError, OSError, TypeError, ValueError):
        return  # an unreadable model is the run's problem, not validation's
    digest = hashlib.sha256(content).hexdigest()
    problem = _lora_fit_problem(str(path), digest, key, model)
    if problem is not None:
        raise InvalidRequestError(problem[0], param=problem[1])


@functools.lru_cache(maxsize=256)
def _lora_fit_problem(
    config_path: str, config_digest: str, lora_json: str, model: str
) -> tuple[str, str] | None:
    """(message, param) if the LoRA config does not fit the model, else None."""
    try:
        import torch
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        lora_obj = build_lora_config(json.loads(lora_json))
        config = AutoConfig.from_pretrained(Path(config_path).parent)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an unloadable config is the run's problem, not ours
        return None
    try:  # on the meta device too: the LoRA matrices are never allocated
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(skeleton, lora_obj)
    except ValueError as exc:
        about_targets = "target" in str(exc).lower() or type(exc).__name__.startswith("NoMatching")
        param = f"{P}.lora_config" + (".target_modules" if about_targets else "")
        return f"`{P}.lora_config` does not fit {model!r}: {exc}", param
    except Exception:  # noqa: BLE001 - meta-device quirks; the run will tell
        return None
    return None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _quiet_datasets() -> None:
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite_or_none(value: Any) -> float | None:
    value = _float_or_none(value)
    return value if value is not None and math.isfinite(value) else None


def _round(value: Any, ndigits: int) -> float | None:
    value = _float_or_none(value)
    return None if value is None else round(value, ndigits)


__all__ = ["BackendConfig", "PeftLoraBackend", "save_adapter_atomically", "training_overrides"]
