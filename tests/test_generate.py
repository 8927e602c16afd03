from __future__ import annotations

import pytest
import torch
from conftest import assert_decodings_agree, record_draws

from lm import generate as gen
from lm.config import ModelConfig
from lm.generate import (
    CompiledDecoder,
    GenerationStats,
    Step,
    StopScanner,
    generate_tokens,
    stream_completions,
    window_keep,
)
from lm.model import GPT, KVCache
from lm.sampling import SamplingConfig
from lm.textfiles import find_text_files
from lm.tokenizer import TokenizerConfig, TokenTextDecoder, train_tokenizer

GREEDY = SamplingConfig(temperature=0.0)
# Cached, uncached, static and compiled decoding are different float32 code paths: they round otherwise,
# by ~1e-6 on these logits (magnitudes up to ~3). Their logits agree to this; their tokens until a near tie.
LOGITS_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def random_model(pos_encoding: str, context_length: int = 32) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, context_length=context_length, n_layer=2, n_head=2, d_model=32,
                         pos_encoding=pos_encoding)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than a fresh init, so greedy decoding does not repeat one token
        for param in model.parameters():
            param.normal_(std=0.3)
    return model


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("prompt_length", [10, 45])  # a prompt longer than the context starts slid
def test_cached_and_uncached_agree_at_every_step_across_the_context_boundary(pos_encoding: str,
                                                                             prompt_length: int) -> None:
    model = random_model(pos_encoding)
    prompt = torch.randint(0, 61, (prompt_length,), generator=torch.Generator().manual_seed(1)).tolist()
    cached_stats, plain_stats = GenerationStats(), GenerationStats()
    cached = list(generate_tokens(model, prompt, 100, GREEDY, stats=cached_stats))
    plain = list(generate_tokens(model, prompt, 100, GREEDY, use_cache=False, stats=plain_stats))
    assert len(cached) == len(plain) == 100
    assert_decodings_agree(plain, cached, **LOGITS_TOLERANCE)
    assert cached_stats.window_slides == plain_stats.window_slides >= 3  # 100 tokens through a 32-token window


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_sampled_generation_is_the_same_with_and_without_the_cache(pos_encoding: str, monkeypatch) -> None:
    model = random_model(pos_encoding)
    sampling = SamplingConfig(temperature=1.0, top_k=0)
    draws = record_draws(monkeypatch)
    plain = list(generate_tokens(model, [3, 4], 80, sampling, num_samples=2, seed=5, use_cache=False))
    cached = list(generate_tokens(model, [3, 4], 80, sampling, num_samples=2, seed=5))
    assert_decodings_agree(plain, cached, **LOGITS_TOLERANCE, sampling=sampling, draws=draws[:80])
    assert len({t for s in cached for t in s.ids.tolist()}) > 20


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_the_static_cache_path_agrees_with_the_default_one(pos_encoding: str) -> None:
    model = random_model(pos_encoding)
    default = list(generate_tokens(model, [1, 2, 3], 80, GREEDY))
    static = list(generate_tokens(model, [1, 2, 3], 80, GREEDY, decoder=CompiledDecoder(model, compile=False)))
    assert_decodings_agree(default, static, **LOGITS_TOLERANCE)


def test_the_compiled_decode_step_agrees_and_is_reused(monkeypatch) -> None:
    model = random_model("rope")
    decoder = CompiledDecoder(model, batch_size=2)
    sampling = SamplingConfig(temperature=1.0, top_k=0)
    draws = record_draws(monkeypatch)
    plain = list(generate_tokens(model, [4, 5], 70, sampling, num_samples=2, seed=3))
    compiled = list(generate_tokens(model, [4, 5], 70, sampling, num_samples=2, seed=3, decoder=decoder))
    # 70 tokens through a 32-token window: slides included
    assert_decodings_agree(plain, compiled, **LOGITS_TOLERANCE, sampling=sampling, draws=draws[:70])
    torch._dynamo.utils.counters.clear()
    list(generate_tokens(model, [9], 40, GREEDY, num_samples=2, decoder=decoder))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing recompiled


def test_a_decode_step_sees_every_cached_token() -> None:
    # The trap: is_causal=True with one query and many keys lets the query see only the first key.
    model = random_model("rope")
    ids = torch.randint(0, 61, (1, 12))
    full, _ = model(ids)
    cache = KVCache(model.config, 1)
    model(ids[:, :11], cache=cache)
    last, _ = model(ids[:, 11:], cache=cache)
    assert torch.allclose(last[0, -1], full[0, -1], atol=1e-5)
    # Several new tokens after cached ones (bottom-right aligned mask) agree too.
    cache = KVCache(model.config, 1)
    model(ids[:, :5], cache=cache)
    rest, _ = model(ids[:, 5:], cache=cache)
    assert torch.allclose(rest, full[:, 5:], atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("family", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
                                    {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                                     "qk_norm": True}])
def test_decode_step_computes_what_forward_does(quantize: str, family: dict) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_head=2, d_model=32, **family)
    model = gen.prepare_for_generation(GPT(config), quantize=quantize)  # the decoding layout, as generate uses
    ids = torch.randint(0, 61, (2, 12))
    general, lean = KVCache(config, 2), KVCache(config, 2)
    with torch.inference_mode():
        model(ids[:, :4], cache=general)
        model(ids[:, :4], cache=lean)
        for position in range(4, 12):
            expected = model(ids[:, position:position + 1], cache=general)[0][:, -1]
            torch.testing.assert_close(model.decode_step(ids[:, position:position + 1], lean), expected,
                                       atol=1e-5, rtol=1e-5)
    assert lean.length == general.length == 12
    # Filled by two code paths (forward's batched products, decode_step's own): float32, so to rounding.
    torch.testing.assert_close(lean.keys[:, :, :, :12], general.keys[:, :, :, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.values[:, :, :, :12], general.values[:, :, :, :12], atol=1e-5, rtol=1e-5)
    lean.length = config.context_length  # full: a step past it is refused, not written out of bounds
    with pytest.raises(ValueError, match="context length"):
        model.decode_step(ids[:, :1], lean)


def test_the_window_keeps_three_quarters() -> None:
    assert window_keep(128) == 96 and window_keep(1) == 1


def test_the_same_seed_gives_the_same_samples() -> None:
    model = random_model("learned")
    sampling = SamplingConfig(temperature=1.0, top_k=20)

    def run(seed: int) -> list[list[int]]:
        return [s.ids.tolist() for s in generate_tokens(model, [1, 2, 3], 30, sampling, num_samples=3, seed=seed)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    rows = list(zip(*first, strict=True))
    assert len(set(rows)) == 3  # three different continuations in one batch


def test_repetition_penalty_discourages_repeats() -> None:
    model = random_model("learned")
    plain = [int(s.ids) for s in generate_tokens(model, [5], 60, GREEDY)]
    penalised = [int(s.ids) for s in generate_tokens(model, [5], 60, SamplingConfig(0.0, repetition_penalty=5.0))]
    assert len(set(penalised)) > len(set(plain))


def byte_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("plain ascii only\n")
    tokenizer, _ = train_tokenizer(find_text_files([text]), TokenizerConfig(vocab_size=257))
    return tokenizer  # 256 byte tokens + <|endoftext|>: every multi-byte character is split


def test_utf8_streaming_never_splits_a_character(tmp_path) -> None:
    tokenizer = byte_tokenizer(tmp_path)
    text = "日本 😀 é!"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode())
    decoder = TokenTextDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "日"]  # held back until the third byte arrives
    bad = TokenTextDecoder(tokenizer)
    assert bad.push(tokenizer.encode("日")[0]) == "" and bad.finish() == "\ufffd"  # cut short: marked


def test_stop_scanner_holds_back_possible_stops() -> None:
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.push("the E") == ("the ", False)  # "E" may begin "END"
    assert scanner.push("N") == ("", False)
    assert scanner.push("Dgame") == ("", True)  # stop reached: nothing of it or after it is shown
    scanner = StopScanner(["END"])
    assert scanner.push("the EN") == ("the ", False)
    assert scanner.push("d") == ("ENd", False)  # not a stop after all
    assert scanner.finish() == ""
    assert StopScanner([]).push("anything") == ("anything", False)
    assert StopScanner(["b", "a"]).push("xab") == ("x", True)  # the earliest stop wins


def scripted(steps: list[list[int]]):
    def fake_generate_tokens(*args, **kwargs):
        for ids in steps:
            yield Step(torch.tensor(ids), torch.zeros(len(ids), 1))
    return fake_generate_tokens


def test_stream_completions_ends_each_sample_on_its_own(tmp_path, monkeypatch) -> None:
    tokenizer = byte_tokenizer(tmp_path)
    eot = tokenizer.eot_id
    a, b = (tokenizer.encode(t) for t in ("hi STOP more", "日本語"))
    # Sample 0 spells "hi STOP more"; sample 1 spells "日本" then <|endoftext|> then junk.
    b = [*b[:6], eot, *b[6:]]
    length = max(len(a), len(b))
    steps = [[a[i] if i < len(a) else eot, b[i] if i < len(b) else eot] for i in range(length)]
    monkeypatch.setattr(gen, "generate_tokens", scripted(steps))
    pieces = list(stream_completions(None, tokenizer, [eot], 50, GREEDY, stops=["STOP"], num_samples=2))
    texts = ["".join(p.text for p in pieces if p.sample == s) for s in (0, 1)]
    assert texts == ["hi ", "日本"]
    assert all("\ufffd" not in p.text for p in pieces)
