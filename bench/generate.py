"""Benchmark: decoding speed of `lm generate` against Hugging Face transformers' generate().

1. Batch 1, a 16-token prompt, 256 new tokens, greedy, KV cache on in both, float32, alternating runs:
   a 4 layer x 128 model with vocab 8192 (target: lm >= 2x), and GPT-2 small's shape (124M, vocab
   50257; target: lm >= 1.0x in float32, >= 1.6x with int8 linear layers). Weights are random: speed
   does not depend on them.
2. The quality cost of the reduced precisions: validation bits per byte of a trained run (the demo's,
   runs/demo) in float32, with int8 linear layers, and in bfloat16.
3. Cached against uncached decoding through 1,000 tokens of context: time per token over the first
   and the last 100 tokens (target: the cached one stays flat, within 1.5x).

    python bench/generate.py [--run runs/demo]      (or: make bench)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from statistics import mean, median

import torch
from _measure import write_summary
from rich.console import Console
from rich.table import Table

from lm.config import ModelConfig
from lm.generate import CompiledDecoder, generate_tokens, prepare_for_generation
from lm.model import GPT
from lm.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
console = Console(width=120)
VERDICT = {True: "[green]met[/]", False: "[red]missed[/]"}


def lm_tokens_per_s(model: GPT, prompt: list[int], new_tokens: int, decoder: CompiledDecoder | None = None) -> float:
    started = time.perf_counter()
    for _ in generate_tokens(model, prompt, new_tokens, GREEDY, decoder=decoder):
        pass
    return new_tokens / (time.perf_counter() - started)


def hf_model(config: ModelConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
                           n_layer=config.n_layer, n_head=config.n_head, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(hf_config).eval()


@torch.inference_mode()
def hf_tokens_per_s(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == len(prompt) + new_tokens
    return new_tokens / elapsed


def speed(config: ModelConfig, rounds: int, new_tokens: int, reduced: bool, compiled: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (16,)).tolist()
    fp32 = prepare_for_generation(GPT(config))
    contenders = {"transformers GPT2LMHeadModel.generate, float32": lambda: hf_tokens_per_s(hf, prompt, new_tokens),
                  "lm, float32": lambda: lm_tokens_per_s(fp32, prompt, new_tokens)}
    hf = hf_model(config)
    if compiled:
        decoder = CompiledDecoder(fp32)
        contenders["lm, float32, --compile"] = lambda: lm_tokens_per_s(fp32, prompt, new_tokens, decoder)
    if reduced:
        int8 = prepare_for_generation(copy.deepcopy(fp32), quantize="int8")
        bf16 = prepare_for_generation(copy.deepcopy(fp32), torch.bfloat16)
        contenders["lm, int8 linear layers"] = lambda: lm_tokens_per_s(int8, prompt, new_tokens)
        contenders["lm, bfloat16 weights"] = lambda: lm_tokens_per_s(bf16, prompt, new_tokens)
    for run in contenders.values():  # warm up
        run()
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            results[name].append(run())
    return {name: median(values) for name, values in results.items()}


def print_speed(title: str, results: dict[str, float]) -> float:
    table = Table(title=title, title_justify="left")
    for column in ("", "new tokens/s", "vs transformers"):
        table.add_column(column, justify="right" if column else "left")
    baseline = results["transformers GPT2LMHeadModel.generate, float32"]
    for name, value in results.items():
        table.add_row(name, f"{value:,.1f}", f"{value / baseline:.2f}x")
    console.print(table)
    return baseline


def quality(run: Path) -> None:
    from lm import rundir
    from lm.checkpoint import load_run
    from lm.data import token_byte_lengths, tokenize_corpus
    from lm.eval import score_tokens
    from lm.textfiles import find_text_files

    model, tokenizer, info = load_run(run)
    validation = info.extra.get("validation", {})
    if "paths" not in validation:
        console.print(f"(quality cost skipped: {run} was not trained with --val files to score on)")
        return
    sources = find_text_files(validation["paths"], exclude=[run / rundir.TOKENIZER])
    tokens = tokenize_corpus(sources, tokenizer).tokens
    lengths = token_byte_lengths(tokenizer)
    table = Table(title=f"Quality cost on {run}'s validation text (first 512 windows)", title_justify="left")
    for column in ("weights", "val loss", "val bits/byte"):
        table.add_column(column, justify="right" if column != "weights" else "left")
    variants = {"float32": model,
                "int8 linear layers": prepare_for_generation(copy.deepcopy(model), quantize="int8"),
                "bfloat16": prepare_for_generation(copy.deepcopy(model), torch.bfloat16)}
    for name, variant in variants.items():
        total = score_tokens(variant, tokens[:512 * info.model.context_length // 2], lengths,
                             info.model.context_length, eot_id=tokenizer.eot_id, batch_size=32).total
        table.add_row(name, f"{total.loss:.4f}", f"{total.bits_per_byte:.4f}")
    console.print(table)


def cache_flatness(new_tokens: int) -> None:
    config = ModelConfig(vocab_size=8192, context_length=16 + new_tokens, n_layer=4, n_head=4, d_model=128)
    torch.manual_seed(0)
    model = prepare_for_generation(GPT(config))
    prompt = torch.randint(0, 8192, (16,)).tolist()
    table = Table(title=f"Time per token through {new_tokens:,} tokens of context (4 x 128, float32)",
                  title_justify="left")
    for column in ("", "first 100 (ms)", "last 100 (ms)", "last / first"):
        table.add_column(column, justify="right" if column else "left")
    ratios = {}
    for name, cached in (("KV cache", True), ("no cache", False)):
        times = []
        started = time.perf_counter()
        for _ in generate_tokens(model, prompt, new_tokens, GREEDY, use_cache=cached):
            now = time.perf_counter()
            times.append(now - started)
            started = now
        first, last = mean(times[1:101]), mean(times[-100:])
        ratios[name] = last / first
        table.add_row(name, f"{first * 1000:.2f}", f"{last * 1000:.2f}", f"{last / first:.2f}x")
    console.print(table)
    console.print(f"cached per-token time, last 100 / first 100: {ratios['KV cache']:.2f}x "
                  f"(target <= 1.5x: {VERDICT[ratios['KV cache'] <= 1.5]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a trained run for the quality table")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 124M model")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the quality and cache tables")
    parser.add_argument("--summary", type=Path, help="also write the headline ratios here, as JSON")
    args = parser.parse_args()
    figures: dict[str, float] = {}

    small = ModelConfig(vocab_size=8192, context_length=512, n_layer=4, n_head=4, d_model=128)
    results = speed(small, args.rounds, args.new_tokens, reduced=False, compiled=True)
    baseline = print_speed(f"Decoding, 4 layers x 128, vocab 8192, batch 1, 16-token prompt, {args.new_tokens} new "
                           f"tokens, greedy, median of {args.rounds}", results)
    ratio = results["lm, float32"] / baseline
    console.print(f"lm / transformers: {ratio:.2f}x (target >= 2x: {VERDICT[ratio >= 2]})")
    figures["small_float32_vs_transformers"] = ratio

    if not args.skip_large:
        gpt2 = ModelConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768)
        rounds = max(1, args.rounds // 2)
        results = speed(gpt2, rounds, args.new_tokens, reduced=True)
        baseline = print_speed(f"Decoding, GPT-2 small's shape (124M), same settings, median of {rounds}", results)
        fp32, int8 = results["lm, float32"] / baseline, results["lm, int8 linear layers"] / baseline
        console.print(f"lm float32 / transformers: {fp32:.2f}x (target >= 1.0x: {VERDICT[fp32 >= 1.0]}); "
                      f"lm int8 / transformers: {int8:.2f}x (target >= 1.6x: {VERDICT[int8 >= 1.6]})")
        figures.update(gpt2_float32_vs_transformers=fp32, gpt2_int8_vs_transformers=int8)
    write_summary(args.summary, **figures)

    if args.skip_quality:
        return
    if (args.run / "config.json").is_file():
        quality(args.run)
    else:
        console.print(f"(no trained run at {args.run}: run `make demo` first for the quality table)")
    cache_flatness(1000)


if __name__ == "__main__":
    main()
