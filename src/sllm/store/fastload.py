"""Fast load of a stored safetensors model onto an accelerator.

`from_pretrained` with a device map reads each tensor through a memory map and copies it to the
device on its own, from pageable memory, one after the other. Here each file is read in large
sequential chunks (several reads in flight, `os.preadv` releases the GIL) into a few reusable
host buffers (pinned on CUDA), and each chunk goes to the device with an asynchronous copy on a
side stream while the next chunks are read: the disk (or page cache) and the copy engine work
at the same time. The tensors arrive on the device in their stored dtype; the model is then
assembled by transformers itself (`from_pretrained(None, state_dict=...)`: meta-device build,
key mapping, the cast to the target dtype on the device, tied weights, non-persistent buffers
such as RoPE's `inv_freq`, eval mode), so the result is the one `from_pretrained` gives, and the
device tensors are kept as they are, not copied again.

The same code runs on CPU (plain buffers, synchronous copies), which is how it is tested.
Anything it does not handle raises `Unsupported`, and `load_model` falls back to
`from_pretrained`.
"""

from __future__ import annotations

import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 32 * 2**20  # large enough for full-speed reads and copies, small enough to pin fast
BUFFERS = 4  # reads in flight, and host buffers the copies drain from

_DTYPES = {  # safetensors dtype -> torch attribute
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class Unsupported(Exception):
    """The checkpoint or the model needs something the fast path does not do (the message says
    what); the caller loads with `from_pretrained` instead."""


@dataclass(frozen=True)
class Span:
    """One tensor of a safetensors file: absolute byte range [start, end) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class LoadStats:
    """What a load moved and how fast: `read_s` covers reading and copying the files to the
    device (synchronised), `total_s` also the model's assembly."""

    path: str  # "fast" | "from_pretrained"
    bytes: int = 0
    read_s: float = 0.0
    total_s: float = 0.0
    files: int = 0
    pinned: bool = False
    fallback: str | None = None  # why the fast path was not taken
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        """Bytes of the files over the time to get them onto the device (GB = 1e9 bytes)."""
        seconds = self.read_s or self.total_s
        return self.bytes / seconds / 1e9 if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "bytes": self.bytes,
            "read_s": round(self.read_s, 4),
            "total_s": round(self.total_s, 4),
            "gb_per_s": round(self.gb_per_s, 3),
            "files": self.files,
            "pinned": self.pinned,
            "fallback": self.fallback,
        }
        return {**out, **self.extra}


def read_header(path: Path) -> list[Span]:
    """The tensors of a safetensors file in file order (the header: a little-endian u64 length,
    then JSON mapping each name to its dtype, shape and offsets past the header)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise Unsupported(f"tensor `{name}` of {path.name} has dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        spans.append(Span(name, info["dtype"], tuple(info["shape"]), base + lo, base + hi))
    return sorted(spans, key=lambda s: s.start)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files `from_pretrained` would read: the single file, or every file the
    index names (each must exist and hold distinct tensors)."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if not (path / INDEX_FILE).is_file():
        raise Unsupported("no safetensors checkpoint (model.safetensors or its index)")
    weight_map = json.loads((path / INDEX_FILE).read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise Unsupported(f"{INDEX_FILE} has no weight_map")
    files = []
    for name in sorted(set(weight_map.values())):
        file = path / name
        if Path(name).name != name or not name.endswith(".safetensors") or not file.is_file():
            raise Unsupported(f"{INDEX_FILE} names {name!r}, not a safetensors file beside it")
        files.append(file)
    return files


def model_class(config: Any) -> Any:
    """The causal-LM class transformers maps `config` to; none for remote code or quantized
    checkpoints (their loading needs transformers' own file handling)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "quantization_config", None) is not None:
        raise Unsupported("quantized checkpoint")
    if getattr(config, "auto_map", None):
        raise Unsupported("model with remote code (auto_map)")
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise Unsupported(f"no causal-LM class for {type(config).__name__}") from None


class ChunkReader:
    """Reads files in `chunk_bytes` pieces into `buffers` host buffers and copies each piece to
    the device; on CUDA the buffers are pinned, the copies asynchronous on a side stream, and a
    buffer is refilled only once the copies out of it are done (its event)."""

    def __init__(self, device: Any, chunk_bytes: int = CHUNK_BYTES, buffers: int = BUFFERS):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk = chunk_bytes
        self.bufs = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda)
            for _ in range(buffers)
        ]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: list[Any] = [None] * buffers
        self.pool = ThreadPoolExecutor(buffers, thread_name_prefix="sllm-load")

    @property
    def pinned(self) -> bool:
        return all(b.is_pinned() for b in self.bufs)

    def close(self) -> None:
        self.pool.shutdown()

    def read_file(self, path: Path, spans: list[Span]) -> dict[str, Any]:
        """name -> tensor on the device, in its stored dtype and shape."""
        import torch

        if not spans:
            return {}
        raw = {s.name: torch.empty(s.end - s.start, dtype=torch.uint8, device=self.device)
               for s in spans}  # fmt: skip
        lo, hi = spans[0].start, max(s.end for s in spans)
        chunks = [(a, min(a + self.chunk, hi)) for a in range(lo, hi, self.chunk)]
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_SEQUENTIAL)
            self._pipeline(fd, chunks, spans, raw)
        finally:
            os.close(fd)
        return {s.name: _typed(raw[s.name], s) for s in spans}

    def _pipeline(self, fd: int, chunks: list[tuple[int, int]], spans: list[Span], raw) -> None:
        import torch

        n = len(self.bufs)
        if self.cuda:  # the side stream writes into tensors the default stream allocated
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        pending = {k: self._submit(fd, k, chunks[k]) for k in range(min(n, len(chunks)))}
        first = 0  # spans before it end before the current chunk
        for k, (a, b) in enumerate(chunks):
            i = k % n
            pending.pop(k).result()
            while spans[first].end <= a:
                first += 1
            ctx = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
            with ctx:
                for s in spans[first:]:
                    if s.start >= b:
                        break
                    x, y = max(s.start, a), min(s.end, b)
                    if y > x:
                        raw[s.name][x - s.start : y - s.start].copy_(
                            self.bufs[i][x - a : y - a], non_blocking=self.cuda
                        )
                if self.cuda:
                    self.events[i] = torch.cuda.Event()
                    self.events[i].record(self.stream)
            if k + n < len(chunks):
                pending[k + n] = self._submit(fd, k + n, chunks[k + n])
        if self.cuda:
            self.stream.synchronize()

    def _submit(self, fd: int, k: int, chunk: tuple[int, int]):
        i = k % len(self.bufs)
        return self.pool.submit(_fill, fd, self.views[i], chunk, self.events[i])


def _fill(fd: int, view: memoryview, chunk: tuple[int, int], event: Any) -> None:
    """Wait until the buffer's previous copies are done, then read the chunk into it."""
    if event is not None:
        event.synchronize()
    a, b = chunk
    done = 0
    while done < b - a:
        got = os.preadv(fd, [view[done : b - a]], a + done)
        if got == 0:
            raise Unsupported(f"file ends before byte {a + done}")
        done += got


def _typed(raw: Any, span: Span) -> Any:
    import torch

    dtype = getattr(torch, _DTYPES[span.dtype])
    return raw.view(dtype).view(span.shape)


def read_state_dict(
    files: list[Path], device: Any, chunk_bytes: int = CHUNK_BYTES, buffers: int = BUFFERS
) -> tuple[dict[str, Any], LoadStats]:
    """Every tensor of `files` on `device` in its stored dtype, and what reading them took."""
    t0 = time.perf_counter()
    reader = ChunkReader(device, chunk_bytes=chunk_bytes, buffers=buffers)
    stats = LoadStats("fast", files=len(files), pinned=reader.pinned)
    stats.extra["buffer_alloc_s"] = round(time.perf_counter() - t0, 4)
    state: dict[str, Any] = {}
    try:
        for file in files:
            spans = read_header(file)
            for s in spans:
                if s.name in state:
                    raise Unsupported(f"tensor `{s.name}` is in more than one file")
            state.update(reader.read_file(file, spans))
            stats.bytes += sum(s.end - s.start for s in spans)
    finally:
        reader.close()
    stats.read_s = time.perf_counter() - t0
    return state, stats


def fast_load(
    path: Path, device: Any, dtype: Any = None, chunk_bytes: int = CHUNK_BYTES
) -> tuple[Any, LoadStats]:
    """The causal LM stored at `path` on `device` in `dtype` (None: what `dtype="auto"` gives),
    as `from_pretrained(path, dtype=..., device_map={"": device})` builds it."""
    from transformers import AutoConfig, GenerationConfig

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(path)
    cls = model_class(config)
    files = checkpoint_files(path)
    state, stats = read_state_dict(files, device, chunk_bytes=chunk_bytes)
    model = cls.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=dtype if dtype is not None else "auto",
        device_map={"": device},
    )
    del state
    model.config.name_or_path = str(path)
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    _release_warmup(device)
    stats.total_s = time.perf_counter() - t0
    return model, stats


def _release_warmup(device: Any) -> None:
    """transformers reserves the model's size on the device before it loads (its allocator
    warm-up); the tensors were already there, so hand that reserve back."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: Any, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """GB/s of the best of `repeats` copies of `nbytes` from host memory to `device` (pinned
    source, synchronised): the ceiling a load onto that device can reach. On CPU, a memcpy
    between two tensors."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=cuda)  # first touch: page faults, lazy set-up
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
