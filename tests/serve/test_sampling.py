"""The sampler row by row: non-finite scores fail only their row; no temperature overflows."""

from __future__ import annotations

import math

import pytest

from sllm.serve.decoding import GREEDY_BELOW, RowFailure, SamplingParams, choose_tokens


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def test_each_row_is_chosen_on_its_own():
    import torch

    logits = torch.tensor(
        [
            [0.0, 3.0, 1.0, -2.0],  # greedy: 1
            [0.0, float("nan"), 1.0, 2.0],  # NaN: fails alone
            [1e4, -1e4, 9999.0, 0.0],  # huge logits, tiny temperature: still a real choice
            [float("-inf")] * 4,  # nothing usable
            [0.0, float("inf"), 0.0, 0.0],  # +Inf: fails
            [2.0, 1.0, float("-inf"), 0.0],  # -Inf marks an impossible token: fine
        ]
    )
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=GREEDY_BELOW),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    out = choose_tokens(logits, params, [_gen(i) for i in range(len(params))])
    assert out[0] == 1 and out[2] == 0 and out[5] == 0
    assert [isinstance(t, RowFailure) for t in out] == [False, True, False, True, True, False]
    assert "non-finite" in out[1]


def test_an_infinite_temperature_fails_its_row_instead_of_sampling_nan():
    import torch

    logits = torch.tensor([[0.0, float("-inf"), 1.0], [0.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=math.inf), SamplingParams(temperature=0.0)]
    out = choose_tokens(logits, params, [_gen(0), None])
    assert isinstance(out[0], RowFailure) and "temperature inf" in out[0] and out[1] == 1


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 0.0, -0.0, math.nan, 1e-6])
def test_degenerate_temperatures_decode_greedily(temperature):
    import torch

    p = SamplingParams(temperature=temperature)
    assert p.greedy
    logits = torch.tensor([[0.5, 0.25, 4.0, 3.999]])
    assert choose_tokens(logits, [p], [None]) == [2]


def test_sampling_just_above_the_greedy_bound_is_finite_and_seeded():
    import torch

    p = SamplingParams(temperature=GREEDY_BELOW * 1.5, seed=1)
    row = torch.randn(64, generator=_gen(0)) * 1e3  # scaled by 1/t: up to ~1e8, no overflow
    out = choose_tokens(torch.stack([row, row]), [p, p], [_gen(1), _gen(1)])
    assert all(isinstance(t, int) and not isinstance(t, RowFailure) for t in out)
    assert out[0] == out[1]  # the same generator state picks the same token
