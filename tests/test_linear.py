"""lm.linear: oneDNN's products give nn.Linear's values and gradients, and only where they should run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lm.linear
from lm.config import ModelConfig
from lm.linear import _use_onednn, linear, onednn_available
from lm.model import GPT

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN's linear op is used on x86-64 CPUs only")


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [8, 48])  # narrow and wide layers take different weight-gradient orders
def test_onednn_linear_matches_nn_linear_values_and_gradients(shape: tuple[int, ...], bias: bool,
                                                               out_features: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, out_features, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], out_features)
    assert _use_onednn(layer, x)

    ours = linear(layer, x)
    ours.backward(upstream)
    ours_grads = [x.grad.clone(), layer.weight.grad.clone()] + ([layer.bias.grad.clone()] if bias else [])
    x.grad = None
    layer.zero_grad(set_to_none=True)
    reference = F.linear(x, layer.weight, layer.bias)
    reference.backward(upstream)
    reference_grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_gives_only_the_gradients_asked_for() -> None:
    layer = nn.Linear(16, 8)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    linear(layer, x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None


def test_falls_back_where_onednn_would_be_wrong_or_slow() -> None:
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert not _use_onednn(layer, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _use_onednn(layer, x)
        assert linear(layer, x).dtype == torch.bfloat16  # autocast still applies
    transposed = nn.Linear(16, 8)
    transposed.weight = nn.Parameter(transposed.weight.t().contiguous().t())  # the decoding layout
    assert not _use_onednn(transposed, x)
    hooked = nn.Linear(16, 8)
    hooked.register_forward_hook(lambda module, args, output: output * 0)
    assert not _use_onednn(hooked, x)
    assert torch.equal(linear(hooked, x), torch.zeros(4, 8))  # the hook ran


@needs_onednn
def test_training_steps_with_and_without_onednn_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    def losses() -> list[float]:
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, d_model=32, mlp="swiglu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
        trajectory = []
        for _ in range(5):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trajectory.append(loss.item())
        return trajectory

    with_onednn = losses()
    monkeypatch.setattr(lm.linear, "onednn_available", lambda: False)
    without = losses()
    assert with_onednn[-1] < with_onednn[0]
    assert with_onednn == pytest.approx(without, abs=1e-5)


def test_the_availability_probe_leaves_the_random_state_alone() -> None:
    onednn_available.cache_clear()
    state = torch.random.get_rng_state()
    onednn_available()
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded runs stay the same whenever it first runs
