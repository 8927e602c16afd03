from __future__ import annotations

import math

import pytest
import torch

from lm.config import ModelConfig, preset, with_overrides
from lm.errors import UsageError
from lm.model import GPT, KVCache, explicit_attention


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 97, "context_length": 24, "n_layer": 2, "n_head": 4, "d_model": 32,
                          **changes})


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_fused_and_explicit_attention_agree(pos_encoding: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos_encoding)).eval()
    ids = torch.randint(0, 97, (3, 24))
    fused, _ = model(ids)
    traced = model.trace(ids, attention_layers={0, 1})
    explicit, weights = traced.logits, traced.attention
    assert torch.allclose(fused, explicit, atol=1e-5, rtol=0)
    for layer in (0, 1):
        w = weights[layer]
        assert w.shape == (3, 4, 24, 24)
        assert torch.allclose(w.sum(-1), torch.ones(3, 4, 24), atol=1e-6)
        assert (w.triu(1) == 0).all()  # nothing above the diagonal: no peeking at the future


def test_explicit_attention_is_the_textbook_formula() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, weights = explicit_attention(q, k, v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores + torch.full((5, 5), float("-inf")).triu(1)
    expected = torch.softmax(scores, dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(out, expected @ v, atol=1e-6)
    # A query that comes after cached keys (decoding one token) sees all of them.
    last, last_weights = explicit_attention(q[:, :, -1:], k, v)
    assert torch.allclose(last, out[:, :, -1:], atol=1e-6)
    assert (last_weights > 0).all()


@pytest.mark.parametrize("changes", [
    {}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
    {"pos_encoding": "sinusoidal", "tie_embeddings": False}, {"dropout": 0.1},
])
def test_the_future_never_changes_the_past(changes: dict) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(**changes)).eval()
    ids = torch.randint(0, 97, (1, 24))
    edited = ids.clone()
    edited[0, 15:] = (edited[0, 15:] + 1) % 97
    before, after = model(ids)[0], model(edited)[0]
    assert torch.allclose(before[0, :15], after[0, :15], atol=1e-6)
    assert not torch.allclose(before[0, 15:], after[0, 15:])


def test_gpt2_preset_has_gpt2_small_parameter_count() -> None:
    config = with_overrides(preset("gpt2").model, {"vocab_size": 50257})
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() == 124_439_808  # the published count of GPT-2 small


def test_swiglu_width_and_llama_preset() -> None:
    config = preset("llama").model
    assert config.d_ff == 2048 and config.d_ff % 64 == 0
    with torch.device("meta"):
        model = GPT(with_overrides(config, {"vocab_size": 8192}))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert with_overrides(config, {"d_model": 384}).d_ff == 1024  # re-derived when the width changes


def test_initialisation_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=256, n_head=4))
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight


def test_loss_at_initialisation_is_near_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(tiny())
    ids, targets = torch.randint(0, 97, (2, 4, 24))
    _, loss = model(ids, targets)
    assert loss.item() == pytest.approx(math.log(97), abs=0.15)  # small init: no token favoured yet


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_head": 3}, "does not divide --d-model 32"),
    ({"pos_encoding": "alibi"}, "--pos-encoding 'alibi' is not one of"),
    ({"norm": "batchnorm"}, "--norm"),
    ({"context_length": 0}, "--context-length must be a positive"),
    ({"d_model": 36, "n_head": 12, "pos_encoding": "rope"}, "even head width"),
    ({"dropout": 1.0}, "--dropout"),
    ({"mlp": "none", "d_ff": 64}, "--d-ff 64 sizes an MLP, and --mlp none builds blocks without one"),
])
def test_impossible_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        tiny(**changes).validate()


def test_longer_than_context_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceed the context length 24"):
        GPT(tiny())(torch.zeros(1, 25, dtype=torch.long))


def test_unknown_preset() -> None:
    with pytest.raises(UsageError, match="unknown preset 'huge'; choose one of: tiny, small, gpt2, llama"):
        preset("huge")


def test_attention_only_blocks_have_no_mlp_and_decode_as_they_forward() -> None:
    config = tiny(mlp="none")
    assert config.d_ff == 0 and with_overrides(tiny(), {"mlp": "none"}).d_ff == 0  # 4 x d_model dropped with the MLP
    torch.manual_seed(0)
    model = GPT(config).eval()
    assert all(block.mlp is None and block.norm2 is None for block in model.blocks)
    with_mlp = GPT(tiny(mlp="gelu"))
    per_mlp = sum(p.numel() for p in with_mlp.blocks[0].mlp.parameters()) + with_mlp.blocks[0].norm2.weight.numel() * 2
    assert model.num_parameters() == with_mlp.num_parameters() - 2 * per_mlp
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full, _ = model(ids)
        # One block by hand: attention only, nothing added after it.
        x = model.embed(ids, slice(0, 10))
        for block in model.blocks:
            x = x + block.attn(block.norm1(x), None)[0]
        torch.testing.assert_close(full, model.lm_head(model.norm(x)))
        cache = KVCache(config, 2, torch.device("cpu"), torch.float32)
        model(ids[:, :9], cache=cache)
        torch.testing.assert_close(model.decode_step(ids[:, 9:], cache), full[:, -1], rtol=1e-4, atol=1e-4)
