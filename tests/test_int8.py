"""lm's int8 layers (lm/int8.py over lm/cpu_kernels.c): the integer arithmetic it promises, exactly."""

import shutil

import pytest
import torch
from torch import nn

from lm import cpu_kernels, int8
from lm.model import GPT
from tests.test_model import tiny

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: lm falls back to torch.ao's int8 layers")


def reference(layer: int8.Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in PyTorch: activations quantized per row, int32 sums, both scales."""
    rows = x.reshape(-1, layer.in_features)
    row_scale = rows.abs().amax(dim=1) / 127.0
    quantized = torch.round(rows * (1.0 / row_scale)[:, None])
    weights = layer.weight[:, :layer.in_features].to(torch.int64)
    sums = (quantized.to(torch.int64) @ weights.t()).float()
    out = sums * row_scale[:, None] * layer.scale[None, :]
    if layer.bias is not None:
        out = out + layer.bias
    return out.view(*x.shape[:-1], layer.out_features)


@needs_compiler
@pytest.mark.parametrize("in_features", [64, 40, 200])  # a multiple of the kernel's 64 bytes, and not
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(1,), (5,), (2, 3)])  # one decoding row, a prompt, a batch of them
def test_the_kernel_computes_the_quantized_product_exactly(in_features: int, bias: bool, leading: tuple) -> None:
    generator = torch.Generator().manual_seed(in_features)
    dense = nn.Linear(in_features, 33, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(33, in_features, generator=generator))
        dense.weight[3] = 0.0  # a row of zeros has scale 0 and must give 0 (plus its bias), not NaN
    layer = int8.Int8Linear(dense)
    x = torch.randn(*leading, in_features, generator=generator) * 3
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, reference(layer, x), rtol=1e-5, atol=1e-5)
    # and it is a good approximation of the float32 layer: int8 keeps ~2 significant digits
    with torch.no_grad():
        exact = dense(x)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


@needs_compiler
def test_a_zero_activation_row_gives_the_bias() -> None:
    dense = nn.Linear(64, 8)
    layer = int8.Int8Linear(dense)
    with torch.inference_mode():
        torch.testing.assert_close(layer(torch.zeros(1, 64)), dense.bias.detach()[None])


@needs_compiler
def test_quantize_int8_uses_lm_s_kernel_here() -> None:
    model = int8.quantize_int8(GPT(tiny()))
    assert int8.kernel_name().startswith("lm ")
    assert isinstance(model.blocks[0].attn.qkv, int8.Int8Linear)
    assert isinstance(model.lm_head, int8.Int8Linear)
    assert model.tok_emb.weight.dtype == torch.float32  # the embedding (tied to the head) stays float32


def test_without_the_kernel_torch_ao_s_layers_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    model = int8.quantize_int8(GPT(tiny()))
    assert int8.kernel_name() == "torch.ao"
    assert "quantized.dynamic" in type(model.blocks[0].attn.qkv).__module__
    ids = torch.randint(0, 97, (1, 8))
    with torch.inference_mode():
        assert model(ids)[0].shape == (1, 8, 97)


def test_a_failed_build_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    cpu_kernels.forget_builds()
    try:
        with pytest.warns(UserWarning, match="did not build"):
            assert cpu_kernels.load() is None
    finally:
        cpu_kernels.forget_builds()
