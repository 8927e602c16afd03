"""Benchmark: lm/fused_ops.py's RMSNorm and rotary positions against PyTorch's forms, alone and in a training step.

    python bench/fused_ops.py [--preset tiny] [--vocab-size 2048] [--rounds 10] [--threads N]

Each layer is timed forward and backward at the preset's shapes (the width norm over batch x context
rows, QK-norm and the rotation over each head's queries as the model lays them out); then the preset's
whole training step (bench/techniques.py's step: forward with the fused loss, backward, clipping, the
optimizers, the weights' average) with the fused passes on and off, in alternating blocks so a machine
whose speed drifts hits both alike; the step's ratio is the median of the per-round ratios. The
default vocabulary is the 2,048 that `lm train` gives tinyshakespeare (lm.tokenizer.default_vocab_size).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from statistics import median

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from techniques import training_step

from lm import fused_ops
from lm.config import ModelConfig, preset
from lm.device import keep_freed_memory
from lm.model import apply_rope, rope_tables


def median_ms(run: Callable[[], object], repeats: int = 60) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * median(times)


def layer_rows(batch: int, context: int, width: int, heads: int) -> list[tuple[str, float, float]]:
    """(layer, PyTorch ms, fused ms) for one forward and backward of each layer at these shapes."""
    generator = torch.Generator().manual_seed(0)
    d_head = width // heads
    x = torch.randn(batch, context, width, generator=generator, requires_grad=True)
    qkv = torch.randn(batch, context, 3 * width, generator=generator, requires_grad=True)
    gain, head_gain = torch.ones(width, requires_grad=True), torch.ones(d_head, requires_grad=True)
    upstream = torch.randn(batch, context, width, generator=generator)
    head_upstream = torch.randn(batch, heads, context, d_head, generator=generator)
    cos, sin = rope_tables(ModelConfig(n_head=heads, d_model=width, context_length=context, pos_encoding="rope"))

    def queries() -> torch.Tensor:  # the model's layout: a transposed view of the q/k/v product
        return qkv[..., :width].view(batch, context, heads, d_head).transpose(1, 2)

    cases = {
        f"RMSNorm over {width}": (lambda: F.rms_norm(x, (width,), gain, 1e-5).backward(upstream),
                                  lambda: fused_ops.rms_norm(x, gain, 1e-5).backward(upstream)),
        f"QK-norm over {d_head}": (lambda: F.rms_norm(queries(), (d_head,), head_gain, 1e-5).backward(head_upstream),
                                   lambda: fused_ops.rms_norm(queries(), head_gain, 1e-5).backward(head_upstream)),
        "rotary positions": (lambda: apply_rope(queries(), cos, sin).backward(head_upstream),
                             lambda: fused_ops.rope(queries(), cos, sin).backward(head_upstream)),
    }
    return [(label, median_ms(plain), median_ms(fused)) for label, (plain, fused) in cases.items()]


def step_ratio(name: str, vocab_size: int, rounds: int, steps: int = 4) -> tuple[float, float, float]:
    """(PyTorch ms, fused ms, median per-round ratio) of the preset's training step."""
    fused_applies = fused_ops.applies
    run = training_step(name, {"vocab_size": vocab_size}, {})
    variants: dict[str, Callable[[torch.Tensor], bool]] = {"plain": lambda x: False, "fused": fused_applies}

    def call(variant: str) -> None:
        fused_ops.applies = variants[variant]
        run()

    try:
        for variant in variants:
            for _ in range(3):
                call(variant)
        blocks: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_ in range(rounds):
            for variant in (("plain", "fused") if round_ % 2 == 0 else ("fused", "plain")):
                started = time.perf_counter()
                for _ in range(steps):
                    call(variant)
                blocks[variant].append((time.perf_counter() - started) / steps)
    finally:
        fused_ops.applies = fused_applies
    ratio = median(f / p for f, p in zip(blocks["fused"], blocks["plain"], strict=True))
    return 1000 * median(blocks["plain"]), 1000 * median(blocks["fused"]), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as lm train does
    chosen = preset(args.preset)
    model, train = chosen.model, chosen.train
    table = Table(title=f"lm/fused_ops.py, preset {args.preset}, {torch.get_num_threads()} threads, "
                        f"{torch.backends.cpu.get_cpu_capability()}", title_justify="left")
    for column in ("forward + backward", "PyTorch ms", "fused ms", "fused vs PyTorch"):
        table.add_column(column, justify="left" if column == "forward + backward" else "right")
    for label, plain, fused in layer_rows(train.batch_size, model.context_length, model.d_model,
                                          model.n_head):
        table.add_row(label, f"{plain:.3f}", f"{fused:.3f}", f"{fused / plain:.2f}x")
    plain, fused, ratio = step_ratio(args.preset, args.vocab_size, args.rounds)
    table.add_row(f"the whole training step (vocab {args.vocab_size})", f"{plain:.1f}", f"{fused:.1f}", f"{ratio:.3f}x")
    Console(width=110).print(table)


if __name__ == "__main__":
    sys.exit(main())
