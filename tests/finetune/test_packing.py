"""Padding-free batching pieces: the collators, token-budget packs, and the per-model probe."""

from __future__ import annotations

import random

import pytest

from sllm.finetune import packing


def test_flat_collator_concatenates_with_per_sequence_positions_and_labels():
    collate = packing.FlatCollator(pad_token_id=2)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 2, 9, 10]}, {"input_ids": []}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    # the first token of each sequence is never a target; pad-token targets are dropped, as the
    # padded baseline (`DataCollatorForLanguageModeling`) drops them
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 9, 10]]
    assert batch[packing.SEQ_LENS] == [3, 4]
    assert batch[packing.NUM_TOKENS] == 7
    assert packing.CU_SEQLENS not in batch and "attention_mask" not in batch


def test_flat_collator_varlen_kernel_gets_cumulative_lengths():
    batch = packing.FlatCollator(0, packing.KERNEL_VARLEN)(
        [{"input_ids": [1] * 5}, {"rows": [[3] * 70]}]
    )
    assert batch[packing.CU_SEQLENS].tolist() == [0, 5, 75]
    assert batch[packing.MAX_SEQLEN] == 128  # rounded up to a multiple of 64
    assert packing.SEQ_LENS not in batch


def test_flat_collator_for_a_compiled_model_passes_one_max_length_for_every_batch():
    collate = packing.FlatCollator(0, packing.KERNEL_VARLEN, max_seqlen=512)
    for rows in ([[1] * 5], [[1] * 70, [2] * 300]):
        assert collate([{"input_ids": r} for r in rows])[packing.MAX_SEQLEN] == 512
    # a bound that would be wrong is not used
    assert collate([{"input_ids": [1] * 600}])[packing.MAX_SEQLEN] == 640


def test_flat_collator_mask_kernel_gets_boundaries_as_a_tensor():
    batch = packing.FlatCollator(0, packing.KERNEL_MASK)(
        [{"input_ids": [1] * 5}, {"input_ids": [2]}]
    )
    assert batch[packing.CU_SEQLENS].tolist() == [0, 5, 6]
    assert batch[packing.KERNEL] == packing.KERNEL_MASK and packing.SEQ_LENS not in batch


def test_padded_collator_counts_real_tokens(tiny_tokenizer):
    batch = packing.PaddedCollator(tiny_tokenizer)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8], "attention_mask": [1]},
        ]
    )
    assert batch["input_ids"].shape == (2, 3) and batch[packing.NUM_TOKENS] == 4
    packs = packing.PaddedCollator(tiny_tokenizer)([{"rows": [[5, 6], [7, 8, 9]]}])
    assert packs["input_ids"].shape == (2, 3) and packs[packing.NUM_TOKENS] == 5


# rows as `sllm.finetune.formats` makes them: labels -100 where no loss (prompts, weight-0 turns)
MASKED_ROWS = [
    {"input_ids": [5, 9, 11, 40, 7], "labels": [-100, -100, -100, 40, 7]},
    {"input_ids": [3, 3, 8, 100, 6, 6, 42, 17], "labels": [3, -100, -100, 100, 6, -100, 42, 17]},
    {"input_ids": [12, 13], "labels": [-100, 13]},
]


def test_flat_collator_keeps_the_rows_labels_and_masks_every_sequence_start():
    """A row's own labels are used as they are (a pad-id token in an answer, such as an end of
    turn that doubles as pad, keeps its loss); the first token of every sequence is never a
    target, so no label crosses a sequence boundary."""
    rows = [{"input_ids": [5, 2, 7], "labels": [5, 2, 7]}, *MASKED_ROWS[1:]]
    batch = packing.FlatCollator(pad_token_id=2)(rows)
    assert batch["labels"].tolist() == [
        [-100, 2, 7, -100, -100, -100, 100, 6, -100, 42, 17, -100, 13]
    ]
    assert batch[packing.LOSS_TOKENS] == 7 and batch[packing.NUM_TOKENS] == 13
    packed = packing.FlatCollator(2)([{"rows": [r["input_ids"] for r in rows],
                                       "labels": [r["labels"] for r in rows]}])  # fmt: skip
    assert packed["labels"].tolist() == batch["labels"].tolist()


def test_padded_collator_keeps_the_rows_labels(tiny_tokenizer):
    batch = packing.PaddedCollator(tiny_tokenizer)(MASKED_ROWS)
    pad = tiny_tokenizer.pad_token_id
    assert batch["input_ids"].tolist()[2] == [12, 13] + [pad] * 6
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 40, 7, -100, -100, -100],
        [-100, -100, -100, 100, 6, -100, 42, 17],
        [-100, 13, -100, -100, -100, -100, -100, -100],
    ]
    assert batch["attention_mask"].sum().item() == batch[packing.NUM_TOKENS] == 15
    assert (
        batch[packing.LOSS_TOKENS] == 7 == packing.FlatCollator(2)(MASKED_ROWS)[packing.LOSS_TOKENS]
    )


def test_pack_dataset_carries_labels():
    import datasets

    rows = datasets.Dataset.from_list(MASKED_ROWS)
    item = packing.PackDataset(rows, [[2, 0]])[0]
    assert item == {
        "rows": [[12, 13], [5, 9, 11, 40, 7]],
        "labels": [[-100, 13], [-100, -100, -100, 40, 7]],
    }


@pytest.mark.parametrize("padded", [False, True])
def test_packs_respect_the_budget_and_use_every_row_once(padded):
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(300)] + [900]
    packs = packing.build_packs(lengths, 1024, seed=1, padded=padded)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for pack in packs:
        cost = (
            len(pack) * max(lengths[i] for i in pack) if padded else sum(lengths[i] for i in pack)
        )
        assert cost <= 1024 or len(pack) == 1
    assert [p for p in packs if 300 in p] == [[300]] or not padded  # the long row, alone if padded
    # nearly full: the waste is at most one row per pack
    used = sum(lengths) / (len(packs) * 1024)
    assert used > (0.75 if padded else 0.85)
    assert packs == packing.build_packs(lengths, 1024, seed=1, padded=padded)  # deterministic
    assert packs != packing.build_packs(lengths, 1024, seed=2, padded=padded)


def test_pack_dataset_reads_rows_lazily():
    ds = packing.PackDataset([[1, 2], [3], [4, 5, 6]], [[2, 0], [1]])
    assert len(ds) == 2
    assert ds[0] == {"rows": [[4, 5, 6], [1, 2]]} and ds[1] == {"rows": [[3]]}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from sllm.testing import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def _model(arch: str, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from sllm.testing import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp(arch) / "m", arch=arch)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("kernel", [packing.KERNEL_LOOP, packing.KERNEL_MASK])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_packed_forward_matches_separate_forwards_with_sllm_attention(
    arch, kernel, tmp_path_factory
):
    """Per-sequence logits of a packed row equal those of each sequence run alone, with the
    per-sequence loop and with the one masked call (what a compiled model uses on CPU)."""
    import torch

    model = _model(arch, tmp_path_factory)
    model.set_attn_implementation(packing.register_attention())
    model.eval()
    rows = [[5, 9, 11, 40, 7], [3, 3, 8, 100, 6, 6, 42, 17], [12, 13]]
    batch = packing.FlatCollator(2, kernel)([{"input_ids": r} for r in rows])
    packing.pop_counts(batch)
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[0] for r in rows])
    assert (packed - alone).abs().max().item() < 1e-4
    result = packing.probe(model, packing.FlatCollator(2, kernel), device="cpu")
    assert result.ok and result.max_error < 1e-4, result


@pytest.mark.parametrize("kernel", [packing.KERNEL_LOOP, packing.KERNEL_MASK])
def test_packed_loss_with_masks_equals_the_padded_reference(kernel, tmp_path_factory):
    """With prompt/answer masks, the loss and the gradients of one packed row equal those of
    the padded batch of the same rows: the same targets, averaged over the same tokens."""
    import torch

    from sllm.testing import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    model = _model("llama", tmp_path_factory)
    model.set_attn_implementation(packing.register_attention())
    model.eval()
    results = []
    for collate in (packing.PaddedCollator(tok), packing.FlatCollator(2, kernel)):
        batch = collate(MASKED_ROWS)
        packing.pop_counts(batch)
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.loss.item(), grads))
    (padded_loss, padded_grads), (flat_loss, flat_grads) = results
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert (flat_grads - padded_grads).abs().max().item() < 1e-5
    # the masks matter: the same rows trained on every token give another loss
    unmasked = packing.FlatCollator(2, kernel)([{"input_ids": r["input_ids"]} for r in MASKED_ROWS])
    packing.pop_counts(unmasked)
    with torch.no_grad():
        assert model(**unmasked, use_cache=False).loss.item() != pytest.approx(flat_loss)


def test_probe_catches_opt_attending_across_sequences(tmp_path_factory):
    """OPT's own attention ignores the sequence boundaries of a packed row: not supported."""
    model = _model("opt", tmp_path_factory)
    assert model.config._attn_implementation == "sdpa"
    result = packing.probe(model, packing.FlatCollator(2), device="cpu")
    assert not result.ok
    assert result.max_error > 100 * result.tolerance
    assert "differ" in result.reason


def test_llama_stock_attention_is_exact_too(tmp_path_factory):
    """transformers detects packed rows from position ids for llama: the probe says so."""
    result = packing.probe(_model("llama", tmp_path_factory), packing.FlatCollator(2), device="cpu")
    assert result.ok, result


def test_probe_reports_a_crash_instead_of_raising(tmp_path_factory):
    model = _model("llama", tmp_path_factory)
    model.set_attn_implementation(packing.register_attention())
    model.train()

    class Broken(packing.FlatCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batch[packing.SEQ_LENS] = [1]  # lengths that do not add up to the row
            return batch

    result = packing.probe(model, Broken(2), device="cpu")
    assert not result.ok and result.max_error is None and result.reason
    assert model.training is True  # mode restored


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cuda_varlen_kernel_matches_the_per_sequence_loop(arch, tmp_path_factory):
    """Device check (skipped without CUDA): FlashAttention varlen gives the loop's logits and
    gradients in bf16, and the probe accepts it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not packing.varlen_kernel_available("cuda"):
        pytest.skip(f"torch {torch.__version__} has no varlen attention")
    model = _model(arch, tmp_path_factory).to("cuda", torch.bfloat16)
    model.set_attn_implementation(packing.register_attention())
    model.eval()
    rows = [[5, 9, 11, 40, 7] * 7, [3, 3, 8, 100, 6, 6, 42, 17] * 9, [12, 13] * 3]
    out = {}
    for kernel in (packing.KERNEL_LOOP, packing.KERNEL_VARLEN):
        batch = packing.FlatCollator(2, kernel)([{"input_ids": r} for r in rows])
        packing.pop_counts(batch)
        batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items()}
        model.zero_grad()
        result = model(**batch, use_cache=False)
        result.loss.backward()
        grads = [p.grad.float().norm().item() for p in model.parameters() if p.grad is not None]
        out[kernel] = (result.logits.float(), result.loss.item(), grads)
    loop, varlen = out[packing.KERNEL_LOOP], out[packing.KERNEL_VARLEN]
    scale = loop[0].abs().max().item()
    assert (loop[0] - varlen[0]).abs().max().item() < 0.05 * scale
    assert varlen[1] == pytest.approx(loop[1], rel=2e-2)
    assert varlen[2] == pytest.approx(loop[2], rel=5e-2)
    probe = packing.probe(model, packing.FlatCollator(2, packing.KERNEL_VARLEN), device="cuda")
    assert probe.ok, probe


def test_mask_kernel_keeps_attention_dropout_and_never_loops(monkeypatch):
    """A model with attention dropout (GPT-2's attn_pdrop) must stay on the one masked call in
    training, or a compiled graph would break and recompile per batch."""
    import torch

    def loop(*args, **kwargs):
        raise AssertionError("fell back to the per-sequence loop")

    monkeypatch.setattr(packing, "_sdpa_per_sequence", loop)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 8) for _ in range(3))
    kwargs = {
        packing.CU_SEQLENS: torch.tensor([0, 4, 9], dtype=torch.int32),
        packing.KERNEL: packing.KERNEL_MASK,
    }
    module = torch.nn.Module()
    plain, _ = packing.varlen_attention(module, q, k, v, None, dropout=0.0, **kwargs)
    dropped, _ = packing.varlen_attention(module, q, k, v, None, dropout=0.5, **kwargs)
    assert plain.shape == dropped.shape == (1, 9, 4, 8)
    assert not torch.allclose(plain, dropped)  # dropout was applied
    # without dropout: each sequence attends only to itself, causally
    for start, end in ((0, 4), (4, 9)):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True
        ).transpose(1, 2)
        assert torch.allclose(plain[:, start:end], alone, atol=1e-6)
