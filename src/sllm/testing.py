"""Tiny random-weight models with a real tokenizer, built offline, for tests and benchmarks.

Nothing here touches the hub: the tokenizer is a byte-level BPE trained on a few sentences and the
model comes from a `transformers` config with random weights.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "Act as a pirate and answer every question with arr.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "You are a helpful assistant. Answer briefly and clearly.",
    "Translate the following sentence into French, please.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
]


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(
    path: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    with_chat_template: bool = True,
) -> Path:
    """Write a random-weight causal LM (llama or opt shape) and its tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    path = Path(path)
    tokenizer = make_tokenizer()
    if not with_chat_template:
        tokenizer.chat_template = None
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            ffn_dim=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.bos_token_id,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`sllm start` in a subprocess on a free loopback port, for tests, benchmarks and the demo.

    `stop()` (or leaving the `with` block) ends it; its workers and instances die with it.
    """

    def __init__(
        self,
        storage: str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        port: int | None = None,
        start_timeout: float = 90.0,
        api_key: str | None = None,
    ) -> None:
        import os

        import httpx

        self.storage = Path(storage)
        self.args = (*args, "--api-key", api_key) if api_key else args
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
        if api_key:  # what `cli()` sends (the server gets the same key twice: fine)
            self.env["SLLM_API_KEY"] = api_key
        self.cwd = cwd
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.storage / f"server-{self.port}.log"
        self.start_timeout = start_timeout
        self.proc = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def start(self) -> LocalServer:
        import subprocess
        import sys
        import time

        import httpx

        cmd = [sys.executable, "-m", "sllm.cli.main", "start", "--port", str(self.port)]
        cmd += ["--storage-path", str(self.storage), "--log-level", "warning", *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up in {self.start_timeout:.0f} s")

    def kill(self, sig: int | None = None) -> None:
        """Send `sig` (default SIGKILL) and wait for the server to exit."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if sig is None else sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        import signal

        self.kill(signal.SIGTERM)
        self.client.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cli(self, *args: str, check: bool = True):
        """Run `sllm <args>` against this server; returns the CompletedProcess."""
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-m", "sllm.cli.main", *args],
            capture_output=True,
            text=True,
            env={**self.env, "LLM_SERVER_URL": self.url},
            timeout=300,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"sllm {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
        """Poll a fine-tuning job until its status is one of `statuses`."""
        import time

        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            body = self.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if body["status"]["status"] in statuses:
                return body
            time.sleep(0.1)
        raise AssertionError(f"{job_id} never reached {statuses}: {body}")
