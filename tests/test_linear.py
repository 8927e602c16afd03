"""lm.linear: oneDNN's products give nn.Linear's values and gradients, only where they should run, and
the faster of the two kernels is measured once per machine and layer shape (or forced by LM_CPU_MATMUL).

The suite runs with LM_CPU_MATMUL=onednn (tests/conftest.py), so no test depends on which kernel wins here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lm.linear
from lm.config import ModelConfig
from lm.errors import UsageError
from lm.linear import _use_onednn, chosen_kernels, forget_decisions, kernel_for, linear, onednn_available
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
    monkeypatch.setenv("LM_CPU_MATMUL", "default")
    without = losses()
    assert with_onednn[-1] < with_onednn[0]
    assert with_onednn == pytest.approx(without, abs=1e-5)


def test_the_availability_probe_leaves_the_random_state_alone() -> None:
    onednn_available.cache_clear()
    state = torch.random.get_rng_state()
    onednn_available()
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded runs stay the same whenever it first runs


@pytest.fixture
def measuring(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """LM_CPU_MATMUL=auto, with an empty cache folder and nothing decided yet in this process."""
    monkeypatch.setenv("LM_CPU_MATMUL", "auto")
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    forget_decisions()
    yield
    forget_decisions()


@needs_onednn
def test_the_variable_forces_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x = nn.Linear(16, 8), torch.randn(4, 16)
    monkeypatch.setenv("LM_CPU_MATMUL", "default")
    assert not _use_onednn(layer, x)
    monkeypatch.setenv("LM_CPU_MATMUL", "oneDNN")
    assert _use_onednn(layer, x)
    monkeypatch.setenv("LM_CPU_MATMUL", "mkl")
    with pytest.raises(UsageError, match="LM_CPU_MATMUL='mkl' is not one of auto, onednn, default"):
        linear(layer, x)


@needs_onednn
def test_each_shape_is_measured_once_per_machine_and_remembered(measuring, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path) -> None:
    probed: list[tuple[int, int, int, bool]] = []
    real_probe = lm.linear.probe

    def counting_probe(*args):
        probed.append(args)
        return real_probe(*args)

    monkeypatch.setattr(lm.linear, "probe", counting_probe)
    layer = nn.Linear(32, 96)
    x = torch.randn(2, 24, 32, requires_grad=True)
    for _ in range(3):
        linear(layer, x).sum().backward()
    with torch.no_grad():
        linear(layer, x)
    assert probed == [(48, 32, 96, True), (48, 32, 96, False)]  # training and inference, once each
    assert set(chosen_kernels()) == {"train 64x32x96", "infer 64x32x96"}
    assert set(chosen_kernels().values()) <= {"onednn", "default"}

    # A new process on the same machine reads the answers instead of measuring again...
    forget_decisions()
    monkeypatch.setattr(lm.linear, "probe", lambda *args: pytest.fail("measured again"))
    assert kernel_for(40, 32, 96, True) == chosen_kernels()["train 64x32x96"]
    stored = json.loads((tmp_path / "cpu-matmul.json").read_text())
    assert list(stored) == [lm.linear.machine_key()]
    # ...and another machine (or torch version) measures for itself.
    forget_decisions()
    monkeypatch.setattr(lm.linear, "machine_key", lambda: "another CPU; torch 9.9; 2 threads")
    monkeypatch.setattr(lm.linear, "probe", lambda *args: "default")
    assert kernel_for(40, 32, 96, True) == "default"
    assert len(json.loads((tmp_path / "cpu-matmul.json").read_text())) == 2


@needs_onednn
def test_the_probe_is_cheap_even_for_a_wide_output_head(randn_shapes: list[tuple[int, ...]]) -> None:
    assert lm.linear.probe(4096, 256, 8192, training=True) in ("onednn", "default")
    assert randn_shapes[0] == (128, 256)  # 4096 rows cut to the FLOP budget: 2 x 128 x 256 x 8192 = 2^29


def test_a_broken_cache_file_is_measured_again(measuring, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "cpu-matmul.json").write_text("{not json")
    monkeypatch.setattr(lm.linear, "onednn_available", lambda: True)
    monkeypatch.setattr(lm.linear, "probe", lambda *args: "onednn")
    assert kernel_for(10, 8, 8, False) == "onednn"
    assert json.loads((tmp_path / "cpu-matmul.json").read_text())[lm.linear.machine_key()] == {"infer 16x8x8": "onednn"}
