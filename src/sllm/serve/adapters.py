"""Named LoRA adapters inside one engine: load, replace and unload without stopping decoding.

A public name (what clients ask for) maps to a version: an adapter loaded under an internal
peft name (`v1`, `v2`, ...). Replacing loads the new files under a fresh internal name, then
swaps the mapping in one step, so a request that starts after the swap never sees the old
weights and one already admitted keeps the version it started with. A retired version is
deleted from the model once no admitted request holds it.

Adapters loaded on demand (fine-tuned models named in a request, see `sllm.serve.finetuned`) are
kept in an LRU of `max_loras` per instance: loading one more evicts (retires) the least recently
used one that no admitted request holds. One held by a request is pinned until the request ends,
so when all are held the cap is exceeded for a moment and trimmed as soon as one is free.
Adapters loaded explicitly (deployments' `lora_adapters`) are pinned and do not count.

peft cannot delete a model's last adapter (its forward then fails), so when that happens the
version stays loaded, unnamed, until another adapter arrives.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError, NotFoundError


@dataclass
class AdapterVersion:
    name: str
    internal: str
    path: str
    fingerprint: str
    load_seconds: float
    refs: int = 0
    retired: bool = False
    on_demand: bool = False
    last_used: float = 0.0


class AdapterSet:
    """The mapping and reference counts; the model itself is changed by `Engine` under its lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}
        self._retired: list[AdapterVersion] = []
        self._counter = 0

    def next_internal(self) -> str:
        with self._lock:
            self._counter += 1
            return f"v{self._counter}"

    def get(self, name: str) -> AdapterVersion | None:
        with self._lock:
            return self._current.get(name)

    def names(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                n: {
                    "path": v.path,
                    "fingerprint": v.fingerprint,
                    "internal": v.internal,
                    "load_seconds": round(v.load_seconds, 4),
                    "on_demand": v.on_demand,
                }
                for n, v in self._current.items()
            }

    def acquire(self, name: str) -> AdapterVersion:
        """The current version of `name`, with a reference held for one request."""
        with self._lock:
            version = self._current.get(name)
            if version is None:
                known = ", ".join(sorted(self._current)) or "none"
                raise NotFoundError(
                    f"The adapter {name!r} is not loaded (loaded: {known}).",
                    param="lora_adapter_name",
                )
            version.refs += 1
            version.last_used = time.monotonic()
            return version

    def release(self, version: AdapterVersion) -> None:
        with self._lock:
            version.refs -= 1

    def install(self, version: AdapterVersion) -> None:
        """Make `version` the one new requests get; the previous one (if any) retires."""
        with self._lock:
            old = self._current.get(version.name)
            self._current[version.name] = version
            if old is not None:
                old.retired = True
                self._retired.append(old)

    def remove(self, name: str) -> AdapterVersion:
        with self._lock:
            version = self._current.pop(name, None)
            if version is None:
                raise NotFoundError(f"The adapter {name!r} is not loaded.", param="name")
            version.retired = True
            self._retired.append(version)
            return version

    def evict_lru(self, limit: int) -> list[AdapterVersion]:
        """Retire the least recently used on-demand versions no request holds, until at most
        `limit` on-demand ones stay current (fewer evicted when the rest are held)."""
        with self._lock:
            on_demand = [v for v in self._current.values() if v.on_demand]
            excess = len(on_demand) - max(0, limit)
            if excess <= 0:
                return []
            free = sorted((v for v in on_demand if v.refs <= 0), key=lambda v: v.last_used)
            victims = free[:excess]
            for v in victims:
                del self._current[v.name]
                v.retired = True
                self._retired.append(v)
            return victims

    def on_demand_names(self) -> list[str]:
        with self._lock:
            versions = [v for v in self._current.values() if v.on_demand]
            return [v.name for v in sorted(versions, key=lambda v: v.last_used)]

    def collectable(self, loaded: int) -> list[AdapterVersion]:
        """Retired versions nobody holds, leaving at least one adapter in a model of `loaded`."""
        with self._lock:
            free = [v for v in self._retired if v.refs <= 0]
            if free and len(free) >= loaded:
                free = free[: loaded - 1]
            for v in free:
                self._retired.remove(v)
            return free


def check_adapter_dir(path: str | Path) -> dict[str, Any]:
    """The adapter's config, or a 400 that says what is missing (before the model is touched)."""
    p = Path(path)
    config_file = p / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidRequestError(
            f"{p} is not a peft adapter directory (no adapter_config.json).", param="path"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"{config_file} is not valid JSON: {exc}", param="path") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidRequestError(
            f"{p} holds a {config.get('peft_type')!r} adapter; only LORA adapters are served.",
            param="path",
        )
    weights = [p / "adapter_model.safetensors", p / "adapter_model.bin"]
    if not any(w.is_file() for w in weights):
        raise InvalidRequestError(f"{p} has no adapter_model.safetensors.", param="path")
    return config


def check_shapes(model: Any, path: str | Path) -> None:
    """Refuse an adapter made for another base model: every LoRA matrix must fit its module."""
    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            problem = _shape_problem(modules, key, f.get_slice(key).get_shape())
            if problem:
                raise InvalidRequestError(
                    f"The adapter at {path} does not fit this base model: {problem}.",
                    param="path",
                )


def check_finite_weights(path: str | Path) -> None:
    """Refuse an adapter whose weights hold NaN or Inf (its job diverged): served, it would
    answer garbage or fail every request that names it. Reads each tensor once, on the CPU."""
    import torch

    p = Path(path)
    try:
        for key, tensor in _adapter_tensors(p):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise InvalidRequestError(
                    f"The adapter at {p} holds non-finite weights ({bad} NaN/Inf values in "
                    f"{key}), so it cannot be served; its training diverged: train it again, "
                    "e.g. with a lower learning rate.",
                    param="path",
                )
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: say so, do not crash
        raise InvalidRequestError(
            f"Cannot read the adapter weights at {p}: {type(exc).__name__}.", param="path"
        ) from None


def _adapter_tensors(path: Path):
    """(name, tensor) of the adapter's weights file, safetensors or a torch pickle."""
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        import torch

        state = torch.load(legacy, map_location="cpu", weights_only=True)
        yield from ((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))


def _shape_problem(modules: dict[str, Any], key: str, shape: list[int]) -> str | None:
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker not in key:
            continue
        target = key.split(marker)[0].removeprefix("base_model.model.")
        module = modules.get(target)
        if module is None:
            return f"the base model has no module {target!r}"
        dims = _in_out(getattr(module, "base_layer", module))
        if dims is None or len(shape) != 2:
            return None
        got, want = (shape[1], dims[0]) if kind == "lora_A" else (shape[0], dims[1])
        if got != want:
            return f"{key} has shape {list(shape)} but {target!r} maps {dims[0]} -> {dims[1]}"
    return None


def _in_out(module: Any) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2 style: [in, out]
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


# --- server side (no torch): where an adapter lives and whether it fits its base -----------------


def resolve_adapter_path(storage: Path, name: str, path: str) -> Path:
    """`path` under `$STORAGE_PATH/transformers` (absolute paths inside it are accepted too)."""
    from sllm.paths import backend_root, resolve_inside
    from sllm.serve.fields import check_store_path

    root = backend_root(Path(storage)).resolve()
    param = f"lora_adapters.{name}"
    raw = str(path).strip()
    if os.path.isabs(raw):
        try:
            raw = Path(raw).resolve().relative_to(root).as_posix()
        except ValueError:
            raise InvalidRequestError(
                f"`{param}`={path!r} is outside {root}; adapters must live in the store.",
                param=param,
            ) from None
    target = resolve_inside(root, raw, param=param)
    try:  # the path as given and where it leads (symlinks) both stay clear of store internals
        check_store_path(raw)
        check_store_path(target.relative_to(root).as_posix())
    except ValueError as exc:
        raise InvalidRequestError(f"`{param}`: {exc}.", param=param) from None
    if not target.is_dir():
        raise NotFoundError(f"`{param}`: no adapter directory at {target}.", param=param)
    return target


def adapter_fingerprint(path: Path) -> str:
    """Changes whenever the adapter's files are rewritten (size and mtime of each)."""
    parts = []
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        try:
            st = (path / name).stat()
        except OSError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_fits_base(model_dir: Path, adapter_dir: Path, config: dict[str, Any]) -> None:
    """Compare LoRA matrix shapes with the base weights, reading only safetensors headers."""
    adapter_file = adapter_dir / "adapter_model.safetensors"
    base_files = sorted(model_dir.glob("*.safetensors"))
    if not adapter_file.is_file() or not base_files:
        return
    try:
        base, lora = _tensor_shapes(base_files), _tensor_shapes([adapter_file])
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidRequestError(f"Cannot read {adapter_file}: {exc}", param="path") from None
    transposed = bool(config.get("fan_in_fan_out"))
    targets = {
        key.split(f".{kind}.")[0].removeprefix("base_model.model.")
        for key in lora
        for kind in ("lora_A", "lora_B")
        if f".{kind}." in key
    }
    if targets and not any(f"{t}.weight" in base for t in targets):
        example = sorted(targets)[0]
        raise InvalidRequestError(
            f"The adapter at {adapter_dir} was not trained on this base model: it adapts "
            f"{example!r}, which the base model does not have.",
            param="lora_adapters",
        )
    for key, shape in lora.items():
        problem = _header_shape_problem(base, key, shape, transposed)
        if problem:
            raise InvalidRequestError(
                f"The adapter at {adapter_dir} was not trained on this base model: {problem}.",
                param="lora_adapters",
            )


def _header_shape_problem(base: dict, key: str, shape: list[int], transposed: bool) -> str | None:
    for kind in ("lora_A", "lora_B"):
        if f".{kind}." not in key or len(shape) != 2:
            continue
        target = key.split(f".{kind}.")[0].removeprefix("base_model.model.")
        weight = base.get(f"{target}.weight")
        if weight is None or len(weight) != 2:
            continue
        in_f, out_f = (weight[0], weight[1]) if transposed else (weight[1], weight[0])
        got, want = (shape[1], in_f) if kind == "lora_A" else (shape[0], out_f)
        if got != want:
            return f"{key} has shape {shape}, but {target} maps {in_f} -> {out_f}"
    return None
