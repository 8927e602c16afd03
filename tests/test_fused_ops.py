import pytest
import torch
import torch.nn.functional as F

from lm import fused_ops
from lm.config import ModelConfig
from lm.model import GPT, RMSNorm, apply_rope, rope_tables


def value_and_grads(fn, *inputs: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def qkv_heads(qkv: torch.Tensor) -> torch.Tensor:
    """The model's query view: strided, (batch, heads, time, d_head), of a fused q/k/v product."""
    batch, time, _ = qkv.shape
    return qkv[..., :32].view(batch, time, 4, 8).transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rms_norm_matches_pytorch_forward_and_backward(layout: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(8, generator=generator) + 0.5
    if layout == "contiguous":
        x = torch.randn(3, 5, 8, generator=generator) * 3.0
        pick = lambda t: t  # noqa: E731
    else:  # QK-norm's input: a transposed view of the q/k/v product, normalised over each head
        x = torch.randn(2, 6, 96, generator=generator)
        pick = qkv_heads
    upstream = torch.randn(pick(x).shape, generator=generator)
    ours = value_and_grads(lambda a, w: fused_ops.rms_norm(pick(a), w, 1e-5), x, weight, upstream=upstream)
    theirs = value_and_grads(lambda a, w: F.rms_norm(pick(a), (8,), w, 1e-5), x, weight, upstream=upstream)
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_matches_the_textbook_rotation_forward_and_backward() -> None:
    generator = torch.Generator().manual_seed(1)
    cos, sin = rope_tables(ModelConfig(n_head=4, d_model=32, context_length=6, pos_encoding="rope"))
    x = torch.randn(2, 6, 96, generator=generator)
    upstream = torch.randn(2, 4, 6, 8, generator=generator)
    ours = value_and_grads(lambda a: fused_ops.rope(qkv_heads(a), cos, sin), x, upstream=upstream)
    theirs = value_and_grads(lambda a: apply_rope(qkv_heads(a), cos, sin), x, upstream=upstream)
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_fused_passes_stand_in_only_while_training_in_float32() -> None:
    x = torch.randn(4, 8)
    assert fused_ops.applies(x)
    with torch.no_grad():
        assert not fused_ops.applies(x)  # inference: PyTorch's own, as before
    assert not fused_ops.applies(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_ops.applies(x)


def test_a_qwen3_model_trains_to_the_same_gradients_with_and_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole block (norms, QK-norm, rotary positions) through the fused passes against PyTorch's."""
    config = ModelConfig(vocab_size=61, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=48,
                         pos_encoding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)
    torch.manual_seed(0)
    model = GPT(config)
    assert isinstance(model.blocks[0].norm1, RMSNorm)
    ids, targets = torch.randint(0, 61, (2, 3, 16))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(ids, targets)[1].backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    calls = []
    for name in ("rms_norm", "rope"):
        original = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    fused = gradients()
    assert calls.count("rms_norm") == 2 * 4 + 1 and calls.count("rope") == 2 * 2  # every norm, q and k
    monkeypatch.setattr(fused_ops, "applies", lambda x: False)
    plain = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
