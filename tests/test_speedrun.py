"""The speedrun's techniques (issue 27): what each computes, in training, in the cached decode paths and on export."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SAMPLE,
    assert_decodings_agree,
    assert_one_line_error,
    random_weights,
    record_draws,
    run_lm,
    write_run,
)

from lm import cpu_kernels, rundir
from lm.checkpoint import load_run
from lm.config import ModelConfig, TrainConfig, check_resume_keeps, check_together
from lm.cpu_decode import CpuDecoder, cpu_decoder_for
from lm.errors import UsageError
from lm.generate import CompiledDecoder, generate_tokens, prepare_for_generation
from lm.gguf import gguf_tensors
from lm.hf import UNEXPORTABLE, family, fold_qk_gain
from lm.loss import head_cross_entropy, soft_cap
from lm.model import GPT, NO_TOKEN, KVCache, bigram_buckets, has_value_embedding
from lm.optim import (
    NS_COEFFICIENTS,
    BatchedMuon,
    WeightAverage,
    lr_at,
    make_optimizers,
    muon_weight_decay_at,
    newton_schulz,
    normalize_neurons,
    set_lr,
)
from lm.sampling import SamplingConfig

QWEN3 = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True}
EVERY_TECHNIQUE = {"residual_scalars": True, "logit_softcap": 15.0, "value_embeddings": True, "smear": True,
                   "bigram_buckets": 37, "qk_gain": 1.2}
LOGITS_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # two float32 code paths (cached and not): rounding apart


def config(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 61, "context_length": 24, "n_layer": 3, "n_head": 4, "d_model": 32,
                          **changes})


def varied(model: GPT, seed: int = 0) -> GPT:
    """Every parameter random: gates open, lambdas off their start, tables filled (a trained model's state)."""
    random_weights(model, seed, scale=0.3)
    return model.eval()


# residual scalars ------------------------------------------------------------------------------


@pytest.mark.parametrize("design", [{}, QWEN3], ids=["gpt2", "qwen3"])
def test_residual_scalars_at_their_start_are_the_plain_model_bit_for_bit(design: dict) -> None:
    torch.manual_seed(0)
    plain = GPT(config(**design))
    torch.manual_seed(0)
    scaled = GPT(config(**design, residual_scalars=True))
    assert scaled.residual_lambdas.tolist() == [1.0] * 3 and scaled.x0_lambdas.tolist() == [0.0] * 3
    ids, targets = torch.randint(0, 61, (2, 2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain(ids)[0], scaled(ids)[0])  # 1·x + 0·x0 is x, exactly
    assert torch.equal(plain(ids, targets)[1], scaled(ids, targets)[1])
    plain_cache, scaled_cache = KVCache(plain.config, 2), KVCache(scaled.config, 2)
    with torch.no_grad():
        plain(ids[:, :5], cache=plain_cache), scaled(ids[:, :5], cache=scaled_cache)
        assert torch.equal(plain.decode_step(ids[:, 5:6], plain_cache), scaled.decode_step(ids[:, 5:6], scaled_cache))
    scaled(ids, targets)[1].backward()
    assert scaled.x0_lambdas.grad.abs().min() > 0  # the shortcut learns from the first step


def test_residual_scalars_feed_each_block_the_mix_of_stream_and_embedding() -> None:
    model = varied(GPT(config(residual_scalars=True)))
    ids = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(2))
    seen = []
    hooks = [block.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for block in model.blocks]
    trace = model.trace(ids)
    for hook in hooks:
        hook.remove()
    x0 = trace.hidden[0]
    for layer in range(3):
        expected = model.residual_lambdas[layer] * trace.hidden[layer] + model.x0_lambdas[layer] * x0
        torch.testing.assert_close(seen[layer], expected)


# logit soft cap --------------------------------------------------------------------------------


def test_soft_capped_loss_and_gradients_are_autograd_s_through_tanh() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator) * 4  # logits up to ~50: the cap bends them
    weight, targets = torch.randn(53, 16, generator=generator), torch.randint(0, 53, (37,), generator=generator)

    def loss_and_grads(loss_of) -> tuple[torch.Tensor, ...]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_of(h, w)
        (loss * 3.0).backward()  # an upstream gradient other than 1 must scale both gradients
        return loss.detach(), h.grad, w.grad

    def autograd_s(h, w):
        return F.cross_entropy(15.0 * torch.tanh(F.linear(h, w) / 15.0), targets)

    expected = loss_and_grads(autograd_s)
    for got, wanted in zip(loss_and_grads(lambda h, w: head_cross_entropy(h, w, targets, softcap=15.0)), expected,
                           strict=True):  # the fused path: gradients computed in its forward pass
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the plain formula (no gradients asked for)
        torch.testing.assert_close(head_cross_entropy(hidden, weight, targets, softcap=15.0), expected[0])
        assert abs(expected[0] - head_cross_entropy(hidden, weight, targets)) > 1.0  # the cap changed the loss


def test_a_capped_model_never_gives_logits_beyond_the_cap_and_trains_through_it() -> None:
    model = varied(GPT(config(logit_softcap=2.0, tie_embeddings=False)))
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    ids, targets = torch.randint(0, 61, (2, 2, 24), generator=torch.Generator().manual_seed(3))
    trace = model.trace(ids)
    uncapped = model.lm_head(model.norm(trace.hidden[-1]))
    assert uncapped.abs().max() > 4.0  # the head alone goes well past the cap
    torch.testing.assert_close(model(ids)[0], 2.0 * torch.tanh(uncapped / 2.0))
    assert torch.equal(trace.logits, model(ids)[0]) and trace.logits.abs().max() <= 2.0
    model.train()
    _, fused = model(ids, targets)
    fused.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(ids)[0].flatten(0, 1), targets.flatten())
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# value embeddings ------------------------------------------------------------------------------


def test_value_embeddings_sit_on_alternating_layers_ending_with_the_last() -> None:
    assert [has_value_embedding(layer, 4) for layer in range(4)] == [False, True, False, True]
    assert [has_value_embedding(layer, 3) for layer in range(3)] == [True, False, True]
    model = GPT(config(n_layer=4, value_embeddings=True))
    assert [block.attn.value_emb is not None for block in model.blocks] == [False, True, False, True]
    assert all(block.attn.value_gate.weight.abs().sum() == 0 for block in model.blocks[1::2])  # gate 1 at start


def test_value_embeddings_add_each_head_s_gated_table_row_to_its_values() -> None:
    model = varied(GPT(config(value_embeddings=True, **QWEN3)))
    attn = model.blocks[2].attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    got, _ = attn(x, model._rope(slice(0, 9)), ids=ids)
    q, k, v = (t.view(2, 9, 4, 8).transpose(1, 2) for t in attn.qkv(x).split(32, dim=2))
    gate = 2 * torch.sigmoid(x[..., :12] @ attn.value_gate.weight.t())  # (batch, time, heads)
    v = v + (gate[..., None] * attn.value_emb.weight[ids].view(2, 9, 4, 8)).transpose(1, 2)
    q, k = attn.queries_and_keys(q, k, model._rope(slice(0, 9)))
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(got, expected)


# smear and the bigram table ----------------------------------------------------------------------


def test_smear_adds_a_gated_share_of_the_previous_token_s_embedding() -> None:
    model = varied(GPT(config(smear=True)))
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(6))
    got = model.embed(ids, slice(0, 7), model._previous_ids(ids, None))
    e = model.tok_emb.weight[ids]
    gate = model.smear_lambda * torch.sigmoid(e[..., :24] @ model.smear_gate.weight.t())
    expected = e + model.pos_emb.weight[:7]
    expected[:, 1:] += gate[:, 1:] * e[:, :-1]  # the first token has no previous one
    torch.testing.assert_close(got, expected)
    assert GPT(config(smear=True)).smear_lambda.item() == 0.0  # off until training opens it


def test_the_bigram_table_adds_the_row_of_each_hashed_pair() -> None:
    previous = torch.tensor([[NO_TOKEN, 5, 9, 5]])
    ids = torch.tensor([[5, 9, 5, 9]])
    rows = bigram_buckets(previous, ids, 37)
    assert rows[0, 0] == 36  # no previous token: the last row, kept for it
    assert rows[0, 1] == rows[0, 3] != rows[0, 2]  # the same pair, the same row; (9, 5) is another pair
    pairs = torch.cartesian_prod(torch.arange(61), torch.arange(61))
    spread = bigram_buckets(pairs[:, 0], pairs[:, 1], 37)
    assert spread.max() < 36 and len(spread.unique()) == 36  # every other row used by some pair
    model = GPT(config(bigram_buckets=37))
    assert model.bigram_emb.weight.abs().sum() == 0  # zero at the start: no change to the embedding
    varied(model)
    got = model.embed(ids, slice(0, 4), previous)
    expected = model.tok_emb.weight[ids] + model.bigram_emb.weight[rows] + model.pos_emb.weight[:4]
    torch.testing.assert_close(got, expected)


# sharper attention -----------------------------------------------------------------------------


def test_qk_gain_is_the_qk_norm_gains_times_the_factor() -> None:
    sharp = varied(GPT(config(qk_gain=1.5, **QWEN3)))
    folded = GPT(config(**QWEN3)).eval()
    folded.load_state_dict(fold_qk_gain(sharp.state_dict(), sharp.config))
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sharp(ids)[0], folded(ids)[0], **LOGITS_TOLERANCE)
    plain = GPT(config(**QWEN3)).eval()
    plain.load_state_dict(sharp.state_dict())
    assert not torch.allclose(sharp(ids)[0], plain(ids)[0], atol=1e-3)


# decoding with every technique -----------------------------------------------------------------


@pytest.mark.parametrize("design", [{}, QWEN3, {"mlp": "none"}], ids=["gpt2", "qwen3", "attention-only"])
def test_cached_decoding_with_every_technique_computes_the_full_forward(design: dict) -> None:
    changes = {**EVERY_TECHNIQUE, **({} if design.get("qk_norm") else {"qk_gain": 1.0})}  # the gain needs QK-norm
    model = varied(GPT(config(**design, **changes)))
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids)[0]
        cache = KVCache(model.config, 2)
        steps = [model(ids[:, :5], cache=cache)[0]]  # a prefill, then one token at a time
        steps += [model.decode_step(ids[:, t:t + 1], cache)[:, None] for t in range(5, 24)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **LOGITS_TOLERANCE)
        static = KVCache(model.config, 2, static=True)
        static.positions = torch.arange(9)
        torch.testing.assert_close(model(ids[:, :9], cache=static)[0], full[:, :9], **LOGITS_TOLERANCE)
        per_row = static.view(slice(0, 2), 24)  # lm serve's layout: each row at its own position
        per_row.positions = torch.tensor([[9], [9]])
        torch.testing.assert_close(model(ids[:, 9:10], cache=per_row)[0][:, 0], full[:, 9], **LOGITS_TOLERANCE)
    prompt = ids[0, :6].tolist()
    greedy = SamplingConfig(temperature=0.0)
    cached = list(generate_tokens(model, prompt, 40, greedy))  # 46 tokens through a 24-token window: it slides
    plain = list(generate_tokens(model, prompt, 40, greedy, use_cache=False))
    assert_decodings_agree(plain, cached, **LOGITS_TOLERANCE)


def test_sampled_and_compiled_decoding_agree_with_every_technique(monkeypatch) -> None:
    model = varied(GPT(config(**QWEN3, **EVERY_TECHNIQUE)))
    sampling = SamplingConfig(temperature=1.0, top_k=0)
    draws = record_draws(monkeypatch)
    plain = list(generate_tokens(model, [3, 4], 16, sampling, num_samples=2, seed=5, use_cache=False))
    cached = list(generate_tokens(model, [3, 4], 16, sampling, num_samples=2, seed=5))
    assert_decodings_agree(plain, cached, **LOGITS_TOLERANCE, sampling=sampling, draws=draws)
    static = list(generate_tokens(model, [3, 4], 16, sampling, num_samples=2, seed=5,
                                  decoder=CompiledDecoder(model, 2, compile=False)))
    assert_decodings_agree(cached, static, **LOGITS_TOLERANCE, sampling=sampling, draws=draws)


@pytest.mark.skipif(cpu_kernels.load() is None, reason="lm's CPU kernels did not build here (no cc)")
def test_the_c_decoder_caps_logits_and_declines_the_other_techniques() -> None:
    for flag, changes in (("--residual-scalars", {"residual_scalars": True}), ("--smear", {"smear": True}),
                          ("--value-embeddings", {"value_embeddings": True}),
                          ("--bigram-buckets", {"bigram_buckets": 9}), ("--qk-gain", {"qk_gain": 1.2})):
        model = prepare_for_generation(GPT(config(**QWEN3, **changes)))
        assert model.config.techniques() == [flag] and not CpuDecoder.supports(model), flag
    model = prepare_for_generation(varied(GPT(config(**QWEN3, logit_softcap=3.0))))
    decoder = cpu_decoder_for(model)
    assert decoder is not None
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(9))
    general, native = KVCache(model.config, 2), KVCache(model.config, 2)
    with torch.inference_mode():
        model(ids[:, :3], cache=general), model(ids[:, :3], cache=native)
        for position in range(3, 12):
            expected = model(ids[:, position:position + 1], cache=general)[0][:, -1]
            got = decoder.step(ids[:, position:position + 1], native)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            assert got.abs().max() < 3.0


# initialisation --------------------------------------------------------------------------------


def test_tiny_head_and_zero_projections_at_initialisation() -> None:
    torch.manual_seed(0)
    model = GPT(config(tie_embeddings=False, head_init_std=1e-3, zero_init_projections=True))
    assert model.lm_head.weight.std().item() == pytest.approx(1e-3, rel=0.05)
    assert all(b.attn.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0 for b in model.blocks)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    ids = torch.randint(0, 61, (1, 24))
    assert model(ids)[0].abs().max() < 0.05  # tiny head: every token nearly equally likely at the start
    attention_only = GPT(config(mlp="none", zero_init_projections=True))
    assert all(b.attn.proj.weight.abs().sum() == 0 and b.mlp is None for b in attention_only.blocks)
    with pytest.raises(UsageError, match=r"--head-init-std 0.001 needs its own output head.*--no-tie-embeddings"):
        config(head_init_std=1e-3).validate()


# optimizer options -----------------------------------------------------------------------------


def test_embedding_head_and_scalar_learning_rates_and_adam_eps_and_beta2() -> None:
    model = GPT(config(tie_embeddings=False, residual_scalars=True, smear=True, value_embeddings=True,
                       bigram_buckets=11))
    train = TrainConfig(optimizer="muon", lr=0.01, embed_lr_scale=20, head_lr_scale=0.5, scalar_lr_scale=3,
                        adam_eps=1e-10, beta2=0.97)
    muon, adamw = make_optimizers(model, train, torch.device("cpu"))
    assert adamw.defaults["betas"] == (0.9, train.beta2) and adamw.defaults["eps"] == 1e-10
    set_lr([muon, adamw], 0.004)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in adamw.param_groups for p in g["params"]}
    tables = ["tok_emb.weight", "pos_emb.weight", "bigram_emb.weight", "blocks.0.attn.value_emb.weight",
              "blocks.2.attn.value_emb.weight"]
    assert all(lrs[name] == (pytest.approx(0.08), 0.0) for name in tables)
    assert lrs["lm_head.weight"] == (pytest.approx(0.002), train.weight_decay)
    scalars = ["residual_lambdas", "x0_lambdas", "smear_lambda", "smear_gate.weight", "blocks.0.attn.value_gate.weight"]
    assert all(lrs[name] == (pytest.approx(0.012), 0.0) for name in scalars)
    assert lrs["norm.weight"] == (pytest.approx(0.004), 0.0)
    in_muon = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert "blocks.0.attn.qkv.weight" in in_muon and not in_muon & set(lrs)  # tables and gates stay on AdamW
    assert all(g["eps"] == 1e-10 for g in adamw.param_groups)
    check_together(model.config, train)
    with pytest.raises(UsageError, match="--head-lr-scale needs its own output head"):
        check_together(config(), TrainConfig(head_lr_scale=0.5))
    with pytest.raises(UsageError, match=r"--scalar-lr-scale .* which this model lacks"):
        check_together(config(), TrainConfig(scalar_lr_scale=2))
    with pytest.raises(UsageError, match="--resume keeps --embed-lr-scale"):
        check_resume_keeps(TrainConfig(), TrainConfig(embed_lr_scale=2))


def test_cautious_weight_decay_decays_only_where_the_update_agrees_and_falls_to_zero() -> None:
    generator = torch.Generator().manual_seed(10)
    start = [torch.randn(16, 24, generator=generator), torch.randn(24, 16, generator=generator)]
    grads = [torch.randn(p.shape, generator=generator) for p in start]

    def one_step(weight_decay: float, cautious: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        BatchedMuon(params, lr=0.05, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                    cautious_weight_decay=cautious).step()
        return [p.detach() for p in params]

    undecayed, cautious = one_step(0.0, False), one_step(0.5, True)
    for before, moved, got in zip(start, undecayed, cautious, strict=True):
        step = before - moved  # lr x the update
        agree = (step * before) >= 0
        expected = before - 0.05 * 0.5 * before * agree - step
        torch.testing.assert_close(got, expected)
        assert 0.2 < agree.float().mean() < 0.8  # both cases occur
    config_ = TrainConfig(optimizer="muon", muon_cautious_wd=True, weight_decay=0.2, max_steps=100)
    assert [muon_weight_decay_at(s, config_) for s in (0, 50, 100)] == pytest.approx([0.2, 0.1, 0.0])
    assert muon_weight_decay_at(50, dataclasses.replace(config_, muon_cautious_wd=False)) == 0.2
    with pytest.raises(UsageError, match="--muon-cautious-wd is an option of Muon's; add --optimizer muon"):
        TrainConfig(muon_cautious_wd=True).validate()


def test_polar_express_orthogonalises_more_exactly_in_the_same_five_iterations() -> None:
    generator = torch.Generator().manual_seed(3)
    # Singular values spread over three decades, as a gradient's are; one matrix tall, one wide.
    updates = [torch.randn(48, 16, generator=generator) @ torch.diag(torch.logspace(-3, 0, 16)),
               torch.diag(torch.logspace(0, -3, 24)) @ torch.randn(24, 64, generator=generator)]
    in_float32 = lambda *stack: torch.float32  # noqa: E731
    fixed = newton_schulz(updates, NS_COEFFICIENTS, 5, 1e-7, in_float32)
    polar = newton_schulz(updates, NS_COEFFICIENTS, 5, 1e-7, in_float32, polar_express=True)
    for update, ours, theirs in zip(updates, polar, fixed, strict=True):
        assert ours.shape == update.shape
        # The same left and right singular vectors: X = U S V^T becomes U p(S) V^T, p acting on each value.
        u, _, vh = torch.linalg.svd(update.double(), full_matrices=False)
        for result in (ours, theirs):
            core = u.mT @ result.double() @ vh.mT
            assert (core - torch.diag_embed(core.diagonal())).abs().max() < 1e-3
        polar_values, fixed_values = (torch.linalg.svdvals(r) for r in (ours, theirs))
        # Every value ends nearer 1 (the fixed quintic leaves them between ~0.3 and 1.2 here).
        assert fixed_values.min() < polar_values.min() and polar_values.max() < fixed_values.max() < 1.2
        assert (polar_values - 1).abs().mean() < 0.7 * (fixed_values - 1).abs().mean()
    # Past the fifth iteration its last quintic repeats, which brings them all to within 0.1 of 1.
    seventh = newton_schulz(updates, NS_COEFFICIENTS, 7, 1e-7, in_float32, polar_express=True)
    assert all((torch.linalg.svdvals(r) - 1).abs().max() < 0.1 for r in seventh)


def test_normuon_evens_out_each_neurons_update_and_keeps_the_matrix_norm() -> None:
    generator = torch.Generator().manual_seed(4)
    tall, wide = torch.randn(12, 4, generator=generator), torch.randn(4, 12, generator=generator)
    tall[0] *= 10  # one neuron's update ten times the others'
    for update, neurons in ((tall, 0), (wide, 1)):  # a tall matrix's neurons are its rows, a wide one's its columns
        state: dict = {}
        first = normalize_neurons(update, state, beta2=0.9)
        assert torch.linalg.matrix_norm(first) == pytest.approx(torch.linalg.matrix_norm(update).item(), rel=1e-5)
        root_mean_square = first.square().mean(dim=1 - neurons).sqrt()
        torch.testing.assert_close(root_mean_square, root_mean_square.mean().expand_as(root_mean_square))
        second_moment = state["normuon_second_moment"]
        torch.testing.assert_close(second_moment.flatten(), 0.1 * update.square().mean(dim=1 - neurons))
        # A second update is divided by the root of the running mean of both, then brought back to its norm.
        again = torch.randn(update.shape, generator=generator)
        expected_moment = 0.9 * second_moment + 0.1 * again.square().mean(dim=1 - neurons, keepdim=True)
        evened = again / expected_moment.sqrt()
        expected = evened * torch.linalg.matrix_norm(again) / torch.linalg.matrix_norm(evened)
        torch.testing.assert_close(normalize_neurons(again, state, beta2=0.9), expected)
    # An update orthogonalised in bfloat16 (the precision is measured per process) joins a float32 running mean.
    lowered = normalize_neurons(tall.bfloat16(), state := {"normuon_second_moment": torch.ones(12, 1)}, beta2=0.9)
    assert lowered.dtype == state["normuon_second_moment"].dtype == torch.float32


def test_muon_with_polar_express_and_normuon_saves_its_state_and_resumes_exactly() -> None:
    """The running means are part of Muon's state: a resumed run steps exactly as an unbroken one."""
    torch.manual_seed(0)
    model = GPT(config(n_layer=2))
    train = TrainConfig(optimizer="muon", muon_polar_express=True, normuon_beta2=0.9, muon_momentum=0.9).validate()
    models = [model, copy.deepcopy(model)]
    unbroken, resumed = (make_optimizers(m, train, torch.device("cpu"))[0] for m in models)
    assert isinstance(unbroken, BatchedMuon) and unbroken.polar_express and unbroken.normuon_beta2 == 0.9
    assert unbroken.param_groups[0]["momentum"] == 0.9
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        if step == 2:
            resumed.load_state_dict(copy.deepcopy(resumed.state_dict()))
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        unbroken.step()
        resumed.step()
    assert all("normuon_second_moment" in state for state in resumed.state_dict()["state"].values())
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_1_sqrt_warmdown_holds_longer_then_falls_to_the_same_floor() -> None:
    linear = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, warmdown=0.4)
    sqrt = dataclasses.replace(linear, warmdown_shape="1-sqrt")
    # progress 0.7: a quarter into the warmdown (t = 0.25), 1 - t = 0.75 against 1 - sqrt(t) = 0.5
    assert lr_at(80, linear) == pytest.approx(0.75) and lr_at(80, sqrt) == pytest.approx(0.5)
    assert lr_at(50, sqrt) == lr_at(50, linear) == 1.0 and lr_at(110, sqrt) == pytest.approx(0.0)
    assert all(lr_at(s, sqrt) <= lr_at(s, linear) + 1e-12 for s in range(110))
    with pytest.raises(UsageError, match="--warmdown-shape 1-sqrt shapes the warmdown; give --warmdown"):
        TrainConfig(warmdown_shape="1-sqrt").validate()


def test_the_weight_average_is_the_exponential_moving_average_and_lends_itself() -> None:
    model = GPT(config())
    average = WeightAverage(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dict(start)
    for count, decay in ((1, 2 / 11), (2, 3 / 12), (100, 0.9), (101, 0.9)):  # ramped up to the decay asked for
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(count)
        expected = {n: decay * expected[n] + (1 - decay) * p.detach() for n, p in model.named_parameters()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.swapped_in():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name])
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


# export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", sorted(UNEXPORTABLE))
def test_export_refuses_each_technique_it_cannot_express_by_name(flag: str) -> None:
    field = {"--residual-scalars": "residual_scalars", "--logit-softcap": "logit_softcap",
             "--value-embeddings": "value_embeddings", "--smear": "smear", "--bigram-buckets": "bigram_buckets"}[flag]
    value = {"logit_softcap": 15.0, "bigram_buckets": 64}.get(field, True)
    for target in ("transformers", "llama.cpp"):
        with pytest.raises(UsageError, match=f"cannot export to {target}: this run uses .*\\({flag}\\)"):
            family(config(**QWEN3, **{field: value}), target)


def test_lm_export_refuses_soft_capped_logits_in_one_line(sample_tokenizer, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", sample_tokenizer, config(vocab_size=sample_tokenizer.vocab_size,
                                                               logit_softcap=15.0, **QWEN3))
    assert_one_line_error(run_lm("export", run, "--out", tmp_path / "hf"), "soft-capped logits", "no logit cap",
                          "--logit-softcap")
    assert not (tmp_path / "hf").exists()


def test_sharper_attention_exports_to_qwen3_with_the_same_logits(sample_tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    shape = config(vocab_size=sample_tokenizer.vocab_size, qk_gain=1.3, n_layer=2, **QWEN3)
    run = write_run(tmp_path / "run", sample_tokenizer, shape)
    result = run_lm("export", run, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = load_run(run)[0]
    ids = torch.randint(0, sample_tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    state = model.state_dict()
    tensors = gguf_tensors(state, model.config)
    torch.testing.assert_close(tensors["blk.1.attn_k_norm.weight"], state["blocks.1.attn.k_norm.weight"] * 1.3)


def test_config_errors_name_the_option() -> None:
    for changes, message in (({"logit_softcap": -1.0}, "--logit-softcap must be 0"),
                             ({"bigram_buckets": 1}, "--bigram-buckets must be 0"),
                             ({"qk_gain": 1.2}, "--qk-gain 1.2 scales queries and keys after QK-norm; add --qk-norm"),
                             ({"qk_gain": 0.0, "qk_norm": True}, "--qk-gain must be a positive")):
        with pytest.raises(UsageError, match=message):
            config(**changes).validate()
    for changes, message in (({"adam_eps": 0.0}, "--adam-eps"), ({"ema_decay": 1.0}, "--ema-decay must be in"),
                             ({"beta2": 1.0}, "--adam-beta2 must be at least 0 and below 1"),
                             ({"optimizer": "muon", "normuon_beta2": 1.0}, "--normuon-beta2 must be at least 0"),
                             ({"muon_momentum": 1.0}, "--muon-momentum must be at least 0 and below 1"),
                             ({"normuon_beta2": 0.9}, "--normuon-beta2 is an option of Muon's; add --optimizer muon"),
                             ({"muon_polar_express": True}, "--muon-polar-express is an option of Muon's"),
                             ({"embed_lr_scale": 0.0}, "--embed-lr-scale must be a positive"),
                             ({"warmdown_shape": "cosine"}, "--warmdown-shape 'cosine' is not one of")):
        with pytest.raises(UsageError, match=message):
            TrainConfig(**changes).validate()
    assert math.isclose(soft_cap(torch.tensor(1e6), 15.0).item(), 15.0)


# lm train, end to end --------------------------------------------------------------------------

EVERY_OPTION = ["--pos-encoding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias", "--qk-norm",
                "--no-tie-embeddings", "--residual-scalars", "--logit-softcap", "15", "--value-embeddings", "--smear",
                "--bigram-buckets", "64", "--qk-gain", "1.2", "--head-init-std", "0.001", "--zero-init-proj",
                "--optimizer", "muon", "--warmdown", "0.5", "--warmdown-shape", "1-sqrt", "--muon-cautious-wd",
                "--adam-eps", "1e-10", "--embed-lr-scale", "5", "--head-lr-scale", "0.5", "--scalar-lr-scale", "2",
                "--ema-decay", "0.9", "--adam-beta2", "0.98", "--muon-polar-express", "--normuon-beta2", "0.9",
                "--muon-momentum", "0.9"]
SMALL = ["-T", "16", "--n-layer", "2", "--n-head", "2", "--d-model", "16", "-B", "4", "--vocab-size", "300",
         "--eval-every", "6", "--log-every", "3", "--sample-tokens", "4", "--device", "cpu"]


def test_the_presets_refinements_of_muon_give_way_to_adamw_unless_asked_for(tmp_path: Path) -> None:
    """The tiny preset's Polar Express and NorMuon are Muon's: --optimizer adamw leaves them out, naming one refuses."""
    run = tmp_path / "run"
    adamw = run_lm("train", SAMPLE, "--out", run, "--max-steps", "2", *SMALL, "--optimizer", "adamw")
    assert adamw.returncode == 0, adamw.stderr
    saved = rundir.read_config(run).train
    assert (saved.optimizer, saved.muon_polar_express, saved.normuon_beta2) == ("adamw", False, 0.0)
    assert_one_line_error(run_lm("train", SAMPLE, "--out", tmp_path / "refused", "--max-steps", "2", *SMALL,
                                 "--optimizer", "adamw", "--normuon-beta2", "0.9"),
                          "--normuon-beta2 is an option of Muon's; add --optimizer muon")


def test_lm_train_with_every_option_trains_scores_what_it_saved_and_generates(tmp_path: Path) -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    cut = text.index("\n", len(text) * 9 // 10) + 1
    (tmp_path / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[cut:], encoding="utf-8")
    run = tmp_path / "run"
    result = run_lm("train", tmp_path / "train.txt", "--val", tmp_path / "val.txt", "--out", run, "--max-steps", "6",
                    *SMALL, *EVERY_OPTION)
    assert result.returncode == 0, result.stderr
    printed = " ".join((result.stdout + result.stderr).split())
    assert "5 Polar Express steps, NorMuon 0.9)" in printed and "windows read in epochs (--windows)" in printed
    saved = rundir.read_config(run)
    assert saved.model.techniques() == ["--residual-scalars", "--logit-softcap", "--value-embeddings", "--smear",
                                        "--bigram-buckets", "--qk-gain"]
    assert (saved.train.ema_decay, saved.train.warmdown_shape, saved.train.adam_eps, saved.train.beta2,
            saved.train.muon_polar_express, saved.train.normuon_beta2, saved.train.muon_momentum) == (
        0.9, "1-sqrt", 1e-10, 0.98, True, 0.9, 0.9)
    final = [r for r in rundir.read_metrics(run) if "val_loss" in r][-1]
    # The held-out text scored from the saved weights (the average) gives what the run's last evaluation did.
    scored = run_lm("eval", run, "--text", tmp_path / "val.txt", "--format", "json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["runs"][0]["total"]["loss"] == pytest.approx(final["val_loss"], abs=1e-5)
    generated = run_lm("generate", run, "--max-new-tokens", "5", "--seed", "1")
    assert generated.returncode == 0, generated.stderr
    assert_one_line_error(run_lm("export", run, "--format", "gguf", "--out", tmp_path / "m.gguf"),
                          "cannot export to llama.cpp", "residual scalars")
    assert_one_line_error(run_lm("train", "--out", run, "--resume", "--ema-decay", "0.5"),
                          "--resume keeps --ema-decay")
    assert_one_line_error(run_lm("train", SAMPLE, "--out", tmp_path / "other", "--head-lr-scale", "2"),
                          "--head-lr-scale needs its own output head")


def test_head_ablation_attribution_and_patching_refuse_a_forward_they_would_not_follow(sample_tokenizer) -> None:
    from lm.heads import ablate_heads, attribute_logit, patch_activations

    model = GPT(config(vocab_size=sample_tokenizer.vocab_size, smear=True, logit_softcap=15.0)).eval()
    for run in (lambda: ablate_heads(model, sample_tokenizer, "To be or not"),
                lambda: attribute_logit(model, sample_tokenizer, "To be or not"),
                lambda: patch_activations(model, sample_tokenizer, "To be or not", "To go or not")):
        with pytest.raises(UsageError, match="this run uses --logit-softcap, --smear, which it does not follow"):
            run()
    sharp = GPT(config(vocab_size=sample_tokenizer.vocab_size, qk_gain=1.2, **QWEN3)).eval()
    assert attribute_logit(sharp, sample_tokenizer, "To be or not").parts  # the gain lives inside attention
