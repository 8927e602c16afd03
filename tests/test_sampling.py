from __future__ import annotations

import math

import pytest
import torch

from lm.errors import UsageError
from lm.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    min_p_filter,
    sample_next,
    shape_logits,
    top_k_filter,
    top_p_filter,
)

INF = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != INF]


def test_top_k_keeps_exactly_the_k_best_and_ties_together() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]  # off
    assert kept(top_k_filter(logits, 99)) == [0, 1, 2, 3, 4]  # clamped to the vocabulary
    tied = torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0])
    assert kept(top_k_filter(tied, 2)) == [0, 2, 3]  # the k-th score is shared: all of it stays
    assert top_k_filter(logits, 2)[1] == 5.0  # kept scores are unchanged


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert kept(top_p_filter(logits, 0.5)) == [0]
    assert kept(top_p_filter(logits, 0.51)) == [0, 1]
    assert kept(top_p_filter(logits, 0.8)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p_filter(logits, 0.81)) == [0, 1, 2]
    assert kept(top_p_filter(logits, 1e-9)) == [0]  # always at least the likeliest
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]
    tied = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.2]))
    assert kept(top_p_filter(tied, 0.5)) == [0, 1, 2, 3]  # the boundary probability is shared by three


def test_min_p_is_relative_to_the_likeliest() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.2, 0.05]))
    assert kept(min_p_filter(logits, 0.49)) == [0, 1]  # 0.25 >= 0.49 x 0.5
    assert kept(min_p_filter(logits, 0.51)) == [0]
    assert kept(min_p_filter(logits, 0.39)) == [0, 1, 2]
    assert kept(min_p_filter(logits, 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_lowers_seen_tokens_either_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_order_is_penalty_temperature_top_k_top_p_min_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    config = SamplingConfig(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0)
    assert torch.allclose(shape_logits(logits, config), torch.tensor([[8.0, 6.0, 4.0, INF]]))
    # Temperature before top-p: sharper scores, fewer tokens needed to reach p.
    warm = shape_logits(logits, SamplingConfig(temperature=2.0, top_k=0, top_p=0.6))
    cold = shape_logits(logits, SamplingConfig(temperature=0.5, top_k=0, top_p=0.6))
    assert len(kept(warm[0])) > len(kept(cold[0])) == 1


def test_temperature_zero_is_exact_argmax_without_dividing() -> None:
    logits = torch.tensor([[0.1, 0.3, 0.2], [5.0, -1.0, 4.9]])
    config = SamplingConfig(temperature=0.0)
    assert sample_next(logits, config).tolist() == [1, 0]
    assert torch.isfinite(shape_logits(logits, config)).all()
    seen = torch.tensor([[False, True, False], [False, False, False]])
    penalised = sample_next(logits, SamplingConfig(temperature=0.0, repetition_penalty=10.0), seen=seen)
    assert penalised.tolist() == [2, 0]


def test_sampling_follows_the_distribution_and_the_seed() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20_000, 1)
    config = SamplingConfig(temperature=1.0, top_k=0)
    draws = sample_next(logits, config, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)
    again = sample_next(logits, config, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert math.isclose(sample_next(logits[:1], SamplingConfig(top_k=1)).item(), 0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"temperature": -0.1}, "--temperature"),
    ({"top_k": -1}, "--top-k"),
    ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"),
    ({"min_p": 1.0}, "--min-p"),
    ({"repetition_penalty": 0.0}, "--repetition-penalty"),
    ({"temperature": float("nan")}, "--temperature"),
])
def test_invalid_values(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SamplingConfig(**changes).validate()
