"""The batching engine in-process, on a tiny llama with random-weight adapters made by peft.

These check the engine's own promises quickly; tests/serve/test_server.py repeats the key ones
through the real server with adapters from real fine-tuning jobs.
"""

from __future__ import annotations

import time

import pytest
from serve_helpers import Collector, make_random_adapter, nan_copy

from sllm.errors import InvalidRequestError, NotFoundError
from sllm.serve.decoding import SamplingParams
from sllm.serve.engine import Engine
from sllm.serve.prompts import encode_prompt

PROMPTS = [
    "Hello, how are you?",
    "The quick brown fox jumps over the lazy dog. Write a short poem",
    "Act",
    "Translate the following sentence into French",
    "You are a helpful assistant.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sllm.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("engine")
    base = make_tiny_model_dir(root / "base")
    a = make_random_adapter(base, root / "a", seed=1)
    b = make_random_adapter(base, root / "b", seed=2, targets=("q_proj", "v_proj", "o_proj"))
    c = make_random_adapter(base, root / "c", seed=3)
    other = make_tiny_model_dir(root / "other", hidden_size=32)
    wrong = make_random_adapter(other, root / "wrong", seed=4)
    return {"base": base, "a": a, "b": b, "c": c, "wrong": wrong}


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tok


@pytest.fixture
def engine(tiny):
    model, tok = load(tiny["base"])
    eng = Engine(model, tok, max_batch_size=8).start()
    eng.load_adapter("a", str(tiny["a"]))
    eng.load_adapter("b", str(tiny["b"]))
    yield eng
    eng.close()


def greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def run(eng, prompt, adapter=None, params=None):
    c = Collector()
    eng.submit(encode_prompt(eng.tokenizer, prompt), params or greedy(), c, adapter)
    return c.wait()


def run_many(eng, jobs):
    """Submit all at once (one batch), then wait for all."""
    collectors = []
    for prompt, adapter, params in jobs:
        c = Collector()
        eng.submit(encode_prompt(eng.tokenizer, prompt), params or greedy(), c, adapter)
        collectors.append(c)
    return [c.wait() for c in collectors]


def reference(tiny, prompt, adapter_dir, n=12):
    """What peft's PeftModel.generate gives for one prompt (greedy)."""
    from peft import PeftModel

    model, tok = load(tiny["base"])
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def test_mixed_batch_equals_one_by_one_and_peft(tiny, engine):
    jobs = [(p, ad, None) for p, ad in zip(PROMPTS, ["a", None, "b", "a", None], strict=True)]
    alone = [run(engine, p, ad).text for p, ad, _ in jobs]
    before = dict(engine.stats)
    together = run_many(engine, jobs)
    assert [c.text for c in together] == alone
    assert engine.stats["max_rows"] >= 5 and engine.stats["mixed_steps"] > before["mixed_steps"]
    for (prompt, adapter, _), text in zip(jobs[:3], alone, strict=False):
        path = {"a": tiny["a"], "b": tiny["b"], None: None}[adapter]
        assert text == reference(tiny, prompt, path)
    assert alone[0] != alone[1] and alone[1] != alone[2]  # adapters change the answers


def test_rows_joining_a_running_batch_match_alone(engine):
    alone_long = run(engine, PROMPTS[1], "a", greedy(40)).text
    alone = [run(engine, p, ad).text for p, ad in [(PROMPTS[0], "b"), (PROMPTS[2], None)]]
    first = Collector()
    steps, joins = engine.stats["steps"], engine.stats["joins"]
    engine.submit(encode_prompt(engine.tokenizer, PROMPTS[1]), greedy(40), first, "a")
    while engine.stats["steps"] < steps + 3:  # it is decoding now
        time.sleep(0.0005)
    late = run_many(engine, [(PROMPTS[0], "b", None), (PROMPTS[2], None, None)])
    assert first.wait().text == alone_long
    assert [c.text for c in late] == alone
    assert engine.stats["joins"] > joins


def test_finish_reasons_usage_and_stop_strings(engine):
    plain = run(engine, PROMPTS[0], None, greedy(20))
    assert plain.done["finish_reason"] == "length"
    assert plain.done["completion_tokens"] == 20
    assert plain.done["prompt_tokens"] == len(encode_prompt(engine.tokenizer, PROMPTS[0]))
    stop = plain.text[3:6]
    cut = run(engine, PROMPTS[0], None, greedy(20, stop=[stop]))
    assert cut.done["finish_reason"] == "stop"
    assert cut.text == plain.text[: plain.text.index(stop)]
    assert stop not in "".join(cut.chunks)


def test_seeded_sampling_is_reproducible_in_a_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    alone = run(engine, PROMPTS[3], "b", params).text
    others = [(p, "a", SamplingParams(max_tokens=16, temperature=1.0)) for p in PROMPTS[:3]]
    results = run_many(engine, [*others, (PROMPTS[3], "b", params)])
    assert results[-1].text == alone


def test_replace_keeps_running_requests_on_their_version(tiny, engine):
    old_text = run(engine, PROMPTS[0], "a", greedy(40)).text
    running = Collector()
    engine.submit(encode_prompt(engine.tokenizer, PROMPTS[0]), greedy(40), running, "a")
    info = engine.load_adapter("a", str(tiny["c"]))
    assert info["status"] == "replaced"
    after = run(engine, PROMPTS[0], "a").text
    assert running.wait().text == old_text
    c_alone = Engine(*load(tiny["base"]), max_batch_size=1).start()
    try:
        c_alone.load_adapter("c", str(tiny["c"]))
        new_text = run(c_alone, PROMPTS[0], "c").text
    finally:
        c_alone.close()
    assert after == new_text != old_text
    time.sleep(0.2)
    assert len(engine.peft.peft_config) == 2  # the old version was deleted from the model


def test_unload_and_errors(tiny, engine):
    engine.unload_adapter("b")
    with pytest.raises(NotFoundError):
        run(engine, PROMPTS[0], "b")
    with pytest.raises(NotFoundError):
        engine.unload_adapter("b")
    with pytest.raises(InvalidRequestError, match="does not fit"):
        engine.load_adapter("w", str(tiny["wrong"]))
    with pytest.raises(InvalidRequestError, match="adapter_config.json"):
        engine.load_adapter("x", str(tiny["base"]))
    nan = nan_copy(tiny["c"], tiny["c"].parent / "c-nan")
    with pytest.raises(InvalidRequestError, match="non-finite weights"):
        engine.load_adapter("n", str(nan))
    assert "n" not in engine.adapters.names()
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(list(range(5)) * 200, greedy(), Collector())
    engine.unload_adapter("a")  # the last one stays loaded (peft needs one), but unnamed
    assert run(engine, PROMPTS[0], None).done["finish_reason"] == "length"


def test_opt_model_batches_too(tmp_path):
    from sllm.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "opt", arch="opt")
    adapter = make_random_adapter(base, tmp_path / "opt-a", seed=5)
    eng = Engine(*load(base), max_batch_size=4).start()
    try:
        eng.load_adapter("x", str(adapter))
        jobs = [(p, ad, None) for p, ad in zip(PROMPTS[:4], ["x", None, "x", None], strict=True)]
        alone = [run(eng, p, ad).text for p, ad, _ in jobs]
        assert [c.text for c in run_many(eng, jobs)] == alone
        assert alone[0] != run(eng, PROMPTS[0], None).text
    finally:
        eng.close()


def _poison(engine, name):
    """Make a loaded adapter's LoRA weights NaN in place (as a diverged job's would be)."""
    import torch

    internal = engine.adapters.get(name).internal
    with torch.no_grad():
        for key, param in engine.peft.named_parameters():
            if f".{internal}." in key:
                param.fill_(float("nan"))


def test_a_degenerate_row_fails_alone_in_its_batch(tiny, engine):
    engine.load_adapter("nan", str(tiny["c"]))
    _poison(engine, "nan")
    tiny_t = SamplingParams(max_tokens=12, temperature=1e-300)  # decodes greedily
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=3)
    jobs = [
        (PROMPTS[0], None, None),
        (PROMPTS[1], "a", None),
        (PROMPTS[2], "nan", None),
        (PROMPTS[3], None, tiny_t),
        (PROMPTS[4], "nan", seeded),
        (PROMPTS[4], "b", seeded),
    ]
    alone = {i: run(engine, *jobs[i]).text for i in (0, 1, 5)}
    prefills, failures = engine.stats["prefills"], engine.stats["row_failures"]
    collectors = []
    with engine._cond:  # the engine thread waits: every row is admitted into ONE prefill
        for prompt, adapter, params in jobs:
            c = Collector()
            engine.submit(encode_prompt(engine.tokenizer, prompt), params or greedy(), c, adapter)
            collectors.append(c)
    results = [c.wait() for c in collectors]
    assert engine.stats["prefills"] == prefills + 1  # one forward pass held them all
    assert engine.stats["row_failures"] == failures + 2
    for i in (0, 1, 5):  # greedy and seeded rows beside the failing ones are unchanged
        assert results[i].done["type"] == "done" and results[i].text == alone[i]
    for i in (2, 4):
        assert results[i].done["type"] == "error" and results[i].done["kind"] == "row"
        assert "non-finite" in results[i].done["message"] and "'nan'" in results[i].done["message"]
    assert results[3].done["type"] == "done"
    assert results[3].text == run(engine, PROMPTS[3], None).text  # tiny temperature: greedy
    assert engine.in_flight() == 0
    assert run(engine, PROMPTS[0], None).text == alone[0]  # the engine keeps serving


def test_a_row_that_turns_non_finite_mid_decode_leaves_alone(tiny, engine):
    engine.load_adapter("late", str(tiny["c"]))
    base_alone = run(engine, PROMPTS[1], None, greedy(40)).text
    a_alone = run(engine, PROMPTS[2], "a", greedy(40)).text
    rows = [Collector(), Collector(), Collector()]
    with engine._cond:
        for c, (prompt, adapter) in zip(
            rows, [(PROMPTS[1], None), (PROMPTS[0], "late"), (PROMPTS[2], "a")], strict=True
        ):
            engine.submit(encode_prompt(engine.tokenizer, prompt), greedy(40), c, adapter)
    steps = engine.stats["steps"]
    while engine.stats["steps"] < steps + 3:  # all three are decoding now
        time.sleep(0.0005)
    with engine._model_lock:  # between two steps, the adapter's weights go NaN
        _poison(engine, "late")
    base, late, other = (c.wait() for c in rows)
    assert late.done["type"] == "error" and "non-finite" in late.done["message"]
    assert late.text  # it had produced text before its weights went bad
    assert base.done["finish_reason"] == "length" and base.text == base_alone
    assert other.done["finish_reason"] == "length" and other.text == a_alone


def test_on_demand_lru_never_evicts_an_adapter_a_request_holds(tiny, engine):
    """max_loras 1 over two on-demand adapters: the held one stays (the cap is exceeded for a
    moment) and answers as it would alone; once released, the cap holds again. Explicit
    adapters (a, b) are pinned and do not count."""
    engine.set_max_loras(1)
    prompt = encode_prompt(engine.tokenizer, PROMPTS[1])
    alone = run(engine, PROMPTS[1], "b", greedy(30)).text  # b's files, loaded explicitly
    held, loaded = engine.acquire_on_demand("od:b", str(tiny["b"]), "1")
    assert loaded and engine.on_demand_names() == ["od:b"]
    other, loaded = engine.acquire_on_demand("od:c", str(tiny["c"]), "1")
    assert loaded and engine.on_demand_names() == ["od:b", "od:c"]  # b is held: not evicted
    running = Collector()
    engine.submit(prompt, greedy(30), running, "od:b", version=held)
    engine.adapters.release(other)
    assert running.wait().text == alone
    time.sleep(0.2)
    _, loaded = engine.acquire_on_demand("od:c", str(tiny["c"]), "1")
    assert not loaded  # still cached
    assert engine.on_demand_names() == ["od:c"]  # b was evicted once its request ended
    assert set(engine.adapters.names()) == {"a", "b", "od:c"}
