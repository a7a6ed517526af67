"""The fast load path gives exactly the model `from_pretrained` gives: same state dict (stored
and tied tensors, non-persistent buffers such as RoPE's `inv_freq`), same dtypes, same logits,
single-file and sharded checkpoints; it falls back where it cannot go."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sllm.store import fastload
from sllm.store.loader import load_model

CHUNK = 1000  # not a multiple of any element size: tensors straddle chunks at odd offsets


def _storage_with(tmp: Path, arch: str, *, shard: bool = False, stored: str = "float32") -> Path:
    """A store holding one tiny model as `m`: saved in `stored` dtype, sharded if asked."""
    from transformers import AutoModelForCausalLM

    from sllm.testing import make_tiny_model_dir

    src = make_tiny_model_dir(tmp / "src", arch=arch)
    dest = tmp / "storage" / "transformers" / "m"
    if not shard and stored == "float32":
        shutil.copytree(src, dest)
        return tmp / "storage"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, stored))
    model.save_pretrained(dest, max_shard_size="40KB" if shard else "5GB")
    for f in src.iterdir():
        if not (dest / f.name).exists() and "safetensors" not in f.name:
            shutil.copy(f, dest / f.name)
    return tmp / "storage"


def _reference(storage: Path, dtype, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    path = storage / "transformers" / "m"
    if device == "cpu":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})


def _assert_same_model(got, want, device: str = "cpu") -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert list(got_sd) == list(want_sd)
    for name, tensor in want_sd.items():
        assert got_sd[name].dtype == tensor.dtype, name
        assert got_sd[name].device.type == torch.device(device).type, name
        assert torch.equal(got_sd[name].cpu(), tensor.cpu()), name
    got_buf, want_buf = dict(got.named_buffers()), dict(want.named_buffers())
    assert list(got_buf) == list(want_buf)
    for name, buf in want_buf.items():
        assert got_buf[name].dtype == buf.dtype, name
        assert torch.equal(got_buf[name].cpu(), buf.cpu()), name
    got_ties = got.get_output_embeddings().weight is got.get_input_embeddings().weight
    want_ties = want.get_output_embeddings().weight is want.get_input_embeddings().weight
    assert got_ties == want_ties
    assert not got.training and not want.training
    assert got.generation_config.to_dict() == want.generation_config.to_dict()
    ids = torch.tensor([[1, 5, 9, 12, 40, 7], [3, 3, 8, 2, 1, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    with torch.inference_mode():
        out_got = got(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out_want = want(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    assert torch.equal(out_got.cpu(), out_want.cpu())


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [False, True])
def test_fast_load_equals_from_pretrained(tmp_path, arch, dtype, shard):
    storage = _storage_with(tmp_path, arch, shard=shard)
    path = storage / "transformers" / "m"
    model, stats = fastload.fast_load(path, "cpu", dtype, chunk_bytes=CHUNK)
    _assert_same_model(model, _reference(storage, dtype))
    files = fastload.checkpoint_files(path)
    assert (len(files) > 1) == shard
    data = sum(s.end - s.start for f in files for s in fastload.read_header(f))
    assert stats.path == "fast" and stats.bytes == data and stats.files == len(files)
    assert stats.read_s > 0 and stats.gb_per_s > 0


def test_stored_bf16_loads_auto_and_upcast(tmp_path):
    storage = _storage_with(tmp_path, "llama", stored="bfloat16")
    path = storage / "transformers" / "m"
    for dtype, want in ((None, "auto"), (torch.float32, torch.float32)):
        model, _ = fastload.fast_load(path, "cpu", dtype, chunk_bytes=CHUNK)
        _assert_same_model(model, _reference(storage, want))
    assert next(model.parameters()).dtype == torch.float32


def test_load_model_fast_records_stats(tmp_path):
    storage = _storage_with(tmp_path, "llama", shard=True)
    stats: dict = {}
    model, tok = load_model(storage, "m", "cpu", "bfloat16", fast=True, stats=stats)
    assert stats["path"] == "fast" and stats["fallback"] is None
    assert stats["bytes"] > 0 and stats["gb_per_s"] > 0 and stats["pinned"] is False
    assert tok.pad_token is not None
    _assert_same_model(model, _reference(storage, torch.bfloat16))
    stats = {}
    load_model(storage, "m", "cpu", "bfloat16", stats=stats)  # CPU default: from_pretrained
    assert stats["path"] == "from_pretrained" and stats["fallback"] is None


def test_fallback_on_a_checkpoint_it_cannot_read(tmp_path):
    """A `.bin` checkpoint (no safetensors): `from_pretrained` loads it, and says why."""
    from safetensors.torch import load_file

    storage = _storage_with(tmp_path, "opt")
    path = storage / "transformers" / "m"
    state = load_file(path / fastload.SINGLE_FILE)
    torch.save(state, path / "pytorch_model.bin")
    (path / fastload.SINGLE_FILE).unlink()
    with pytest.raises(fastload.Unsupported, match="no safetensors"):
        fastload.fast_load(path, "cpu")
    stats: dict = {}
    model, _ = load_model(storage, "m", "cpu", "float32", fast=True, stats=stats)
    assert stats["path"] == "from_pretrained" and "no safetensors" in stats["fallback"]
    _assert_same_model(model, _reference(storage, torch.float32))


def test_index_naming_a_file_outside_the_model_is_refused(tmp_path):
    storage = _storage_with(tmp_path, "llama", shard=True)
    path = storage / "transformers" / "m"
    index = json.loads((path / fastload.INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (path / fastload.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(fastload.Unsupported, match="not a safetensors file beside it"):
        fastload.checkpoint_files(path)


def test_header_with_an_unknown_dtype_is_unsupported(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    raw = len(header).to_bytes(8, "little") + header.encode() + b"\0\0"
    (tmp_path / "x.safetensors").write_bytes(raw)
    with pytest.raises(fastload.Unsupported, match="F8_E4M3"):
        fastload.read_header(tmp_path / "x.safetensors")


def test_copy_bandwidth_on_cpu():
    gbps = fastload.copy_bandwidth("cpu", nbytes=8 * 2**20, repeats=2)
    assert gbps > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_fast_load_on_cuda_equals_from_pretrained(tmp_path, arch):
    storage = _storage_with(tmp_path, arch, shard=True)
    path = storage / "transformers" / "m"
    model, stats = fastload.fast_load(path, "cuda", torch.bfloat16, chunk_bytes=CHUNK)
    assert stats.pinned and stats.path == "fast"
    _assert_same_model(model, _reference(storage, torch.bfloat16, "cuda"), device="cuda")
    assert fastload.copy_bandwidth("cuda") > 1.0


@pytest.mark.parametrize("chunk,buffers", [(509, 2), (4096, 3), (2**20, 1)])
def test_read_state_dict_equals_safetensors(tmp_path, chunk, buffers):
    """Every byte lands where it belongs whatever the chunk size and the reads in flight."""
    from safetensors.torch import load_file

    storage = _storage_with(tmp_path, "opt", shard=True)
    files = fastload.checkpoint_files(storage / "transformers" / "m")
    state, stats = fastload.read_state_dict(files, "cpu", chunk_bytes=chunk, buffers=buffers)
    want = {k: v for f in files for k, v in load_file(f).items()}
    assert sorted(state) == sorted(want)
    for name, tensor in want.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
