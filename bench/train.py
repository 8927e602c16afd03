"""Benchmark: tokens/s of lm's training step against Hugging Face transformers' GPT2LMHeadModel.

Same shape (default 4 layers x 128 wide, 4 heads, vocab 8192), same batch and context (12 x 64), same
precision (float32 on a CPU), same optimiser (torch AdamW, fused, lr 1e-3, weight decay 0.1, betas
0.9/0.95) and the same gradient clipping. Each timed block is `--steps` full steps (forward, loss,
backward, clip, optimiser step); blocks of the models alternate so a drifting machine hits all alike.
With `--compile`, torch.compile'd versions of both run too. Target: lm >= 1.2x.

On an x86 CPU lm computes its linear layers with oneDNN instead of PyTorch's default (MKL), see
lm/linear.py; the row "lm, PyTorch's default matmul" shows lm's model without that choice. The
malloc setting `lm train` makes on Linux (lm.device.keep_freed_memory) is left out here: it is
process-wide, so in this one process it would speed up both models.

    python bench/train.py --compile  (or: make bench)
    python bench/train.py --device cuda --dtype bfloat16 --layers 12 --width 768 --heads 12 \\
        --context 1024 --batch 8      (GPT-2 small's shape on a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from statistics import median

import torch
from rich.console import Console
from rich.table import Table

import lm.linear
from lm.config import ModelConfig
from lm.model import GPT


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


def with_default_matmul(step: Callable[[], float]) -> Callable[[], float]:
    """The step with lm's linear layers left to PyTorch's default kernels (what lm.linear replaces)."""
    def run() -> float:
        chosen = lm.linear.onednn_available
        lm.linear.onednn_available = lambda: False
        try:
            return step()
        finally:
            lm.linear.onednn_available = chosen
    return run


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
    args = parser.parse_args()

    torch.manual_seed(0)
    steps = {"lm": make_step(lm_model(args), args, is_hf=False, compile=False),
             "transformers GPT2LMHeadModel": make_step(hf_model(args), args, is_hf=True, compile=False)}
    if args.device == "cpu" and lm.linear.onednn_available():
        steps["lm, PyTorch's default matmul"] = with_default_matmul(
            make_step(lm_model(args), args, is_hf=False, compile=False))
    if args.compile:
        steps["lm, compiled"] = make_step(lm_model(args), args, is_hf=False, compile=True)
        steps["transformers, compiled"] = make_step(hf_model(args), args, is_hf=True, compile=True)
    for step in steps.values():  # warm up: allocator, kernels, compilation
        for _ in range(3):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed_block(step, args.steps, args.device))

    tokens = args.steps * args.batch * args.context
    table = Table(title=f"Training step, {args.layers} layers x {args.width}, vocab {args.vocab}, batch "
                        f"{args.batch} x {args.context}, {args.dtype} on {args.device}"
                        f"; median of {args.rounds} alternating blocks "
                        f"of {args.steps} steps")
    for column in ("model", "ms/step", "tokens/s", "vs transformers (eager)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    baseline = median(seconds["transformers GPT2LMHeadModel"])
    for name, runs in seconds.items():
        table.add_row(name, f"{1000 * median(runs) / args.steps:.1f}", f"{tokens / median(runs):,.0f}",
                      f"{baseline / median(runs):.2f}x")
    console = Console(width=120)
    console.print(table)
    ratio = baseline / median(seconds["lm"])
    verdict = {True: "[green]met[/]", False: "[red]missed[/]"}
    console.print(f"lm / transformers, both eager: {ratio:.2f}x (target >= 1.2x: {verdict[ratio >= 1.2]})")
    if args.compile:
        best = baseline / median(seconds["lm, compiled"])
        console.print(f"lm --compile / transformers eager: {best:.2f}x (target >= 1.2x: {verdict[best >= 1.2]})")


if __name__ == "__main__":
    main()
