"""Benchmark: what Muon costs per training step against AdamW, at the `tiny` preset's size, on this machine.

    python bench/optimizer.py [--preset tiny] [--steps 20] [--rounds 5] [lm train model options...]

Both optimizers come from lm.optim.make_optimizers (what `lm train --optimizer adamw|muon` builds),
on the same model, batch and context; a step is what `lm train` does each step: forward, loss,
backward, gradient clipping, the optimizers' steps. A third row steps Muon as `torch.optim.Muon` itself
does, one matrix after the other, to show what `lm.optim.BatchedMuon`'s batched Newton-Schulz (each
shape's matrices in one stack of products) saves. Blocks of `--steps` steps alternate between the rows, so a
machine that drifts in speed hits them alike; the median block is reported, with the median of each
round's ratio (a row's block against AdamW's block of the same round). Each step's two phases
(forward, backward and clipping; the optimizers' steps) are timed too, and their medians give a third
ratio, which the few slow steps this machine has do not move. Target: Muon's full step at most 10%
over AdamW's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from _measure import write_summary
from rich.console import Console
from rich.table import Table
from train import timed_block

from lm.config import preset
from lm.device import cpu_name
from lm.model import GPT
from lm.optim import make_optimizers

ROWS = {"adamw": "adamw", "muon": "muon", "muon, one matrix at a time": "muon"}


def step_timer(row: str, args: argparse.Namespace) -> tuple[Callable[[], float], dict[str, list[float]]]:
    chosen = preset(args.preset)
    model_config = dataclasses.replace(chosen.model, **args.model_changes)
    config = dataclasses.replace(chosen.train, optimizer=ROWS[row])
    if row == "muon, one matrix at a time":  # torch.optim.Muon's own arithmetic: its quintic, no NorMuon
        config = dataclasses.replace(config, muon_polar_express=False, normuon_beta2=0.0)
    torch.manual_seed(0)
    model = GPT(model_config)
    optimizers = make_optimizers(model, config, torch.device("cpu"))
    if row == "muon, one matrix at a time":
        muon = optimizers[0]
        muon.step = lambda: torch.optim.Muon.step(muon)  # type: ignore[method-assign]
    ids = torch.randint(0, model_config.vocab_size, (config.batch_size, model_config.context_length + 1))
    seconds: dict[str, list[float]] = {"forward+backward": [], "optimizer": []}

    def step() -> None:
        started = time.perf_counter()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        stepping = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds["forward+backward"].append(stepping - started)
        seconds["optimizer"].append(time.perf_counter() - stepping)

    return lambda: timed_block(step, args.steps, "cpu") / args.steps, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-block", action="store_true", help="rope, RMSNorm, SwiGLU, no biases")
    parser.add_argument("--summary", type=Path, help="also write the headline ratio here, as JSON")
    args = parser.parse_args()
    args.model_changes = ({"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "d_ff": 0}
                          if args.llama_block else {})
    timers = {row: step_timer(row, args) for row in ROWS}
    for block, seconds in timers.values():  # warm up: allocations, kernel choices
        block()
        for phase in seconds.values():
            phase.clear()
    blocks: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(args.rounds):  # every other round backwards, so a steady drift favours no row
        for name in list(timers)[::-1 if round_ % 2 else 1]:
            blocks[name].append(timers[name][0]())
    chosen = preset(args.preset)
    table = Table(title=f"Training step, preset {args.preset}{' (Llama block)' if args.llama_block else ''}, "
                        f"batch {chosen.train.batch_size} x {chosen.model.context_length}, {cpu_name()}, "
                        f"{torch.get_num_threads()} threads; median of {args.rounds} blocks of {args.steps} steps",
                  title_justify="left")
    for column in ("optimizer", "step ms (block)", "vs AdamW", "same round vs AdamW (range)",
                   "forward+backward ms", "optimizer ms", "vs AdamW (step medians)"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    base = median(blocks["adamw"])

    def typical_step(name: str) -> float:  # the median forward+backward plus the median optimizer step
        return sum(median(phase) for phase in timers[name][1].values())

    for name, (_, seconds) in timers.items():
        step = median(blocks[name])
        paired = [mine / adamw for mine, adamw in zip(blocks[name], blocks["adamw"], strict=True)]
        table.add_row(name, f"{step * 1e3:.1f}", f"{step / base:.3f}x",
                      f"{median(paired):.3f}x ({min(paired):.3f}-{max(paired):.3f})",
                      f"{median(seconds['forward+backward']) * 1e3:.1f}", f"{median(seconds['optimizer']) * 1e3:.1f}",
                      f"{typical_step(name) / typical_step('adamw'):.3f}x")
    Console(width=150).print(table)
    print("target: Muon's step <= 1.10x AdamW's")
    muon = [mine / adamw for mine, adamw in zip(blocks["muon"], blocks["adamw"], strict=True)]
    write_summary(args.summary, muon_vs_adamw=median(blocks["muon"]) / base, muon_vs_adamw_same_round=median(muon),
                  adamw_step_ms=base * 1e3, muon_optimizer_ms=median(timers["muon"][1]["optimizer"]) * 1e3)


if __name__ == "__main__":
    main()
