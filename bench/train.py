"""Benchmark: tokens/s of lm's training step against Hugging Face transformers' GPT2LMHeadModel.

Same shape (default 4 layers x 128 wide, 4 heads, vocab 8192), same batch and context (12 x 64), same
precision (float32 on a CPU), same optimiser (torch AdamW, fused, lr 1e-3, weight decay 0.1, betas
0.9/0.95) and the same gradient clipping. Each timed block is `--steps` full steps (forward, loss,
backward, clip, optimiser step); blocks of the models alternate so a drifting machine hits all alike.
With `--compile`, torch.compile'd versions of both run too. Target: lm >= 1.2x.

On an x86 CPU lm computes each linear layer with whichever float32 kernel, oneDNN or PyTorch's default
(MKL), it measured as faster for that shape on this machine (lm/linear.py); the bench measures afresh
(in a temporary cache folder), says what was chosen, and also times lm with each kernel forced
(LM_CPU_MATMUL), so "lm" can be checked to be at least as fast as the better of the two. Efficiency is
the CPU's counterpart of MFU: the model's training FLOPs per token x tokens/s, against this machine's
float32 rate on a 2048 x 2048 matrix product (the faster of the two kernels), timed between the
blocks. The malloc setting `lm train` makes on Linux (lm.device.keep_freed_memory) is left out here:
it is process-wide, so in this one process it would speed up both models.

    python bench/train.py --compile  (or: make bench)
    python bench/train.py --device cuda --dtype bfloat16 --layers 12 --width 768 --heads 12 \\
        --context 1024 --batch 8      (GPT-2 small's shape on a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from _measure import write_summary
from rich.console import Console
from rich.table import Table

import lm.linear
from lm.config import ModelConfig
from lm.device import cpu_name
from lm.model import GPT
from lm.train import flops_per_token


def hf_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def lm_model(args: argparse.Namespace) -> torch.nn.Module:
    return GPT(ModelConfig(vocab_size=args.vocab, context_length=args.context, n_layer=args.layers,
                           n_head=args.heads, d_model=args.width))


def make_step(model: torch.nn.Module, args: argparse.Namespace, is_hf: bool, compile: bool) -> Callable[[], float]:
    device = torch.device(args.device)
    model.to(device).train()
    if compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type in ("cpu", "cuda"))
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)

    def autocast() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def step() -> float:
        windows = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=generator).to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        with autocast():
            # transformers shifts the labels itself (predicting token t+1 at t), so it gets the inputs.
            loss = model(inputs, labels=inputs).loss if is_hf else model(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def with_kernel(step: Callable[[], float], kernel: str) -> Callable[[], float]:
    """The step with lm's CPU linear layers forced to one kernel ('onednn' or 'default')."""
    def run() -> float:
        os.environ[lm.linear.KERNEL_ENV] = kernel
        try:
            return step()
        finally:
            os.environ[lm.linear.KERNEL_ENV] = "auto"
    return run


def matmul_rates(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a float32 size x size matrix product by each CPU kernel (best of `repeats`)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    products = {"default": lambda: torch.mm(a, b)}
    if lm.linear.onednn_available():
        weight = b.t().contiguous()  # oneDNN's linear computes a @ weightᵀ
        products["onednn"] = lambda: lm.linear._onednn(a, weight)
    rates = {}
    for name, product in products.items():
        product()
        best = min(timed_block(product, 1, "cpu") for _ in range(repeats))
        rates[name] = 2 * size**3 / best
    return rates


def describe_choice(chosen: dict[str, str]) -> str:
    """'oneDNN for 3 of 5 layer shapes (train 1024x128x384, ...)' from lm.linear.chosen_kernels()."""
    training = {key: kernel for key, kernel in chosen.items() if key.startswith("train")}
    if not training:
        return "no CPU linear layer was run"
    onednn = sorted(key.removeprefix("train ") for key, kernel in training.items() if kernel == "onednn")
    default = sorted(key.removeprefix("train ") for key, kernel in training.items() if kernel == "default")
    parts = [f"oneDNN for {', '.join(onednn)}" if onednn else "",
             f"PyTorch's default for {', '.join(default)}" if default else ""]
    return "; ".join(part for part in parts if part) + " (rows x inputs x outputs)"


def timed_block(step: Callable[[], float], steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd versions of both")
    parser.add_argument("--summary", type=Path, help="also write the headline ratio here, as JSON")
    args = parser.parse_args()

    on_cpu = args.device == "cpu"
    if on_cpu:  # measure the kernel choice afresh, not whatever an earlier run stored
        os.environ["LM_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-bench-cache-")
        os.environ[lm.linear.KERNEL_ENV] = "auto"
    torch.manual_seed(0)
    steps = {"lm": make_step(lm_model(args), args, is_hf=False, compile=False),
             "transformers GPT2LMHeadModel": make_step(hf_model(args), args, is_hf=True, compile=False)}
    if on_cpu and lm.linear.onednn_available():
        steps["lm, oneDNN forced"] = with_kernel(make_step(lm_model(args), args, is_hf=False, compile=False),
                                                 "onednn")
        steps["lm, PyTorch's default forced"] = with_kernel(
            make_step(lm_model(args), args, is_hf=False, compile=False), "default")
    if args.compile:
        steps["lm, compiled"] = make_step(lm_model(args), args, is_hf=False, compile=True)
        steps["transformers, compiled"] = make_step(hf_model(args), args, is_hf=True, compile=True)
    for step in steps.values():  # warm up: allocator, kernels, compilation (and lm's kernel probe)
        for _ in range(3):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed_block(step, args.steps, args.device))
        if on_cpu:
            for kernel, rate in matmul_rates().items():
                rates.setdefault(kernel, []).append(rate)

    tokens = args.steps * args.batch * args.context
    where = f"{args.device} ({cpu_name()}, {torch.get_num_threads()} threads)" if on_cpu else args.device
    table = Table(title=f"Training step, {args.layers} layers x {args.width}, vocab {args.vocab}, batch "
                        f"{args.batch} x {args.context}, {args.dtype} on {where}"
                        f"; median of {args.rounds} alternating blocks "
                        f"of {args.steps} steps")
    columns = ["model", "ms/step", "tokens/s", "vs transformers (eager)"] + (["efficiency"] if on_cpu else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    baseline = median(seconds["transformers GPT2LMHeadModel"])
    model_flops = flops_per_token(lm_model(args))
    peak = max(median(values) for values in rates.values()) if rates else None
    for name, runs in seconds.items():
        row = [name, f"{1000 * median(runs) / args.steps:.1f}", f"{tokens / median(runs):,.0f}",
               f"{baseline / median(runs):.2f}x"]
        if peak is not None:
            row.append(f"{model_flops * tokens / median(runs) / peak:.0%}")
        table.add_row(*row)
    console = Console(width=120)
    console.print(table)
    if on_cpu:
        console.print(f"lm's kernel choice: {describe_choice(lm.linear.chosen_kernels())}")
        measured = ", ".join(f"{name} {median(values) / 1e9:.0f}" for name, values in rates.items())
        console.print(f"efficiency = {model_flops / 1e6:.1f} MFLOP per token x tokens/s / {peak / 1e9:.0f} GFLOP/s, "
                      f"the float32 2048 x 2048 product's best rate here (GFLOP/s: {measured})")
    ratio = baseline / median(seconds["lm"])
    verdict = {True: "[green]met[/]", False: "[red]missed[/]"}
    console.print(f"lm / transformers, both eager: {ratio:.2f}x (target >= 1.2x: {verdict[ratio >= 1.2]})")
    write_summary(args.summary, lm_vs_transformers=ratio, lm_ms_per_step=1000 * median(seconds["lm"]) / args.steps)
    forced = [name for name in seconds if name.endswith("forced")]
    if forced:
        better = min(median(seconds[name]) for name in forced)
        versus = better / median(seconds["lm"])
        console.print(f"lm (measured choice) / the better forced kernel: {versus:.2f}x (target >= 1.0x, "
                      f"within the noise: {verdict[versus >= 0.97]})")
    if peak is not None:
        efficiency = model_flops * tokens / median(seconds["lm"]) / peak
        console.print(f"lm's efficiency: {efficiency:.0%} (aim >= 65%: {verdict[efficiency >= 0.65]})")
    if args.compile:
        best = baseline / median(seconds["lm, compiled"])
        console.print(f"lm --compile / transformers eager: {best:.2f}x (target >= 1.2x: {verdict[best >= 1.2]})")


if __name__ == "__main__":
    main()
