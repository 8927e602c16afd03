"""Benchmark: what Muon costs per training step against AdamW, at the `tiny` preset's size, on this machine.

    python bench/optimizer.py [--preset tiny] [--steps 20] [--rounds 5] [lm train model options...]

Both optimizers come from lm.optim.make_optimizers (what `lm train --optimizer adamw|muon` builds),
on the same model, batch and context; a step is what `lm train` does each step: forward, loss,
backward, gradient clipping, the optimizers' steps. Blocks of `--steps` steps alternate between the two,
so a machine that drifts in speed hits both alike; the median block is reported, and the optimizer
step alone is timed as well. Target: Muon's full step at most 10% over AdamW's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from statistics import median

import torch
from rich.console import Console
from rich.table import Table
from train import timed_block

from lm.config import preset
from lm.device import cpu_name
from lm.model import GPT
from lm.optim import make_optimizers


def step_timer(optimizer_name: str, args: argparse.Namespace) -> tuple[Callable[[], float], Callable[[], float]]:
    chosen = preset(args.preset)
    model_config = dataclasses.replace(chosen.model, **args.model_changes)
    config = dataclasses.replace(chosen.train, optimizer=optimizer_name)
    torch.manual_seed(0)
    model = GPT(model_config)
    optimizers = make_optimizers(model, config, torch.device("cpu"))
    ids = torch.randint(0, model_config.vocab_size, (config.batch_size, model_config.context_length + 1))
    optimizer_seconds = []

    def step() -> None:
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        started = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        optimizer_seconds.append(time.perf_counter() - started)

    return lambda: timed_block(step, args.steps, "cpu") / args.steps, lambda: median(optimizer_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-block", action="store_true", help="rope, RMSNorm, SwiGLU, no biases")
    args = parser.parse_args()
    args.model_changes = ({"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "d_ff": 0}
                          if args.llama_block else {})
    timers = {name: step_timer(name, args) for name in ("adamw", "muon")}
    for block, _ in timers.values():  # warm up: allocations, kernel choices
        block()
    blocks: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, (block, _) in timers.items():
            blocks[name].append(block())
    chosen = preset(args.preset)
    table = Table(title=f"Training step, preset {args.preset}{' (Llama block)' if args.llama_block else ''}, "
                        f"batch {chosen.train.batch_size} x {chosen.model.context_length}, {cpu_name()}, "
                        f"{torch.get_num_threads()} threads; median of {args.rounds} blocks of {args.steps} steps",
                  title_justify="left")
    for column in ("optimizer", "step ms", "optimizer step ms", "step vs AdamW"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    base = median(blocks["adamw"])
    for name, (_, optimizer_median) in timers.items():
        step = median(blocks[name])
        table.add_row(name, f"{step * 1e3:.1f}", f"{optimizer_median() * 1e3:.1f}", f"{step / base:.3f}x")
    Console(width=120).print(table)
    print("target: Muon's step <= 1.10x AdamW's")


if __name__ == "__main__":
    main()
