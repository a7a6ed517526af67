"""Small helpers shared by the serving tests (kept out of conftest so tests can import them)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

from sllm.testing import LocalServer
from tests.conftest import seed_request


def make_random_adapter(base_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) weights, so its outputs differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=32, init_lora_weights=False, target_modules=list(targets))
    get_peft_model(model, config).save_pretrained(out)
    return out


def nan_copy(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` whose first LoRA matrix holds a NaN (as a diverged job leaves it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, weights)
    return out


class Collector:
    """An engine `emit` callback that a test can wait on."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.text = ""
        self.chunks: list[str] = []
        self.done: dict | None = None

    def __call__(self, event: dict) -> None:
        self.events.put(event)

    def wait(self, timeout: float = 60.0) -> Collector:
        deadline = time.monotonic() + timeout
        while self.done is None:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event["type"] == "text":
                self.text += event["text"]
                self.chunks.append(event["text"])
            elif event["type"] in ("done", "error"):
                self.done = event
        return self


# --- a real server, the CLI, and adapters from real fine-tuning --------------------------------

REPO = Path(__file__).resolve().parents[2]
PIRATE_DATA = REPO / "examples" / "fine_tuning" / "data" / "pirate_prompts.jsonl"
OPT = "facebook/opt-125m"  # a tiny random OPT stored under the seed's name (no chat template)
LLAMA = "tiny/llama"  # a tiny random llama with a chat template


class ServerProcess(LocalServer):
    """The shared `LocalServer`, plus a deployment lookup."""

    def deployment(self, model: str) -> dict:
        return self.client.get(f"/v1/deployments/{model}").json()


def seed_job_config(**training) -> dict:
    """The seed's fine_tuning_config.json, on a local dataset, CPU only, default output_dir."""
    cfg = seed_request(OPT, str(PIRATE_DATA), **training)
    cfg["backend_config"]["max_seq_length"] = 64
    return cfg


class _Quiet:
    def progress(self, **fields) -> None:
        pass

    def event(self, kind, message, data=None) -> None:
        pass


def write_answers(path: Path, answer: str, rows: int = 64) -> Path:
    """A dataset that teaches one fixed answer, so adapters trained on different ones differ."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    questions = ["What is the capital of France?", "Hello, how are you?", "Who are you?"]
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"Question: {questions[i % 3]} Answer: {answer}"}) + "\n")
    return path


def train_adapter(
    storage: Path, model: str, output_dir: str, data: Path, lr: float, epochs: int, seed: int
) -> Path:
    """Run the peft_lora backend directly, as a job's worker would; returns the adapter dir."""
    from sllm.finetune.base import JobSpec, ValidationContext, get_backend

    cfg = seed_job_config(num_train_epochs=epochs, learning_rate=lr, seed=seed)["backend_config"]
    cfg["output_dir"] = output_dir
    cfg["dataset_config"]["data_files"] = str(data)
    cfg["training_config"].pop("auto_find_batch_size")
    cfg["training_config"]["per_device_train_batch_size"] = 16
    backend = get_backend("peft_lora")
    ctx = ValidationContext(storage, data_roots=[storage, data.parent], model=model)
    spec = JobSpec(f"direct-{seed}", model, storage, backend.validate(cfg, ctx), num_cpus=1)
    return backend.run(spec, _Quiet()).adapter_path


def peft_generate(storage: Path, model: str, adapter_dir: Path | None, prompt: str, n: int) -> str:
    """Greedy text from the base model, or from `PeftModel` with one adapter, loaded directly."""
    import torch
    from peft import PeftModel

    from sllm.store import load_model

    lm, tok = load_model(storage, model, dtype=torch.float32)
    if adapter_dir is not None:
        lm = PeftModel.from_pretrained(lm, adapter_dir)
    lm.eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
