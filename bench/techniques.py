"""Benchmark: the training step of a preset with each of the speedrun's techniques on, against it without.

    python bench/techniques.py [--preset tiny] [--rounds 8] [--steps 3] [--threads N] [--only NAME ...]

A step is what `lm train` does per step (lm/train.py): forward with the fused loss, backward, gradient
clipping, the optimizers' steps and, where on, the weights' average, with lm train's malloc setting
(lm.device.keep_freed_memory); on random token ids of the
preset's batch and context (what the arithmetic costs does not depend on the text). Each technique
is one recipe of bench/sweep.py's sweep 15 (the same options). Blocks of `--steps` steps run in turn,
every recipe once per round, each round starting one recipe later, so a machine whose speed drifts
hits all alike; each recipe's time is the median of its blocks, its ratio the median of its per-round
ratios to the preset's block of the same round. The preset is timed twice: the second row's ratio
shows how far apart two identical steps time on this machine now.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from statistics import median

import torch
from rich.console import Console
from rich.table import Table

from lm.config import check_together, preset, with_overrides
from lm.device import keep_freed_memory
from lm.model import GPT
from lm.optim import WeightAverage, make_optimizers, muon_weight_decay_at, set_lr, set_muon_weight_decay

# name -> (model options, training options), as lm train takes them (fields of ModelConfig, TrainConfig).
TECHNIQUES: dict[str, tuple[dict, dict]] = {
    "defaults (the preset)": ({}, {}),
    "defaults again (the noise floor)": ({}, {}),  # the same step: how far apart two identical ones time here
    "residual scalars": ({"residual_scalars": True}, {}),
    "logit softcap 15": ({"logit_softcap": 15.0}, {}),
    "value embeddings": ({"value_embeddings": True}, {}),
    "smear": ({"smear": True}, {}),
    "bigram table 8192": ({"bigram_buckets": 8192}, {}),
    "untied head, embedding lr x5, head lr x0.5": ({"tie_embeddings": False},
                                                   {"embed_lr_scale": 5.0, "head_lr_scale": 0.5}),
    "untied head, tiny head init": ({"tie_embeddings": False, "head_init_std": 0.001}, {}),
    "zero-init projections": ({"zero_init_projections": True}, {}),
    "adam eps 1e-10": ({}, {"adam_eps": 1e-10}),
    "muon cautious weight decay": ({}, {"muon_cautious_wd": True}),
    "1-sqrt warmdown": ({}, {"warmdown_shape": "1-sqrt"}),
    "weight average 0.99": ({}, {"ema_decay": 0.99}),
    "qk gain 1.2": ({"qk_gain": 1.2}, {}),
    "muon polar express": ({}, {"muon_polar_express": True}),
    "normuon 0.9": ({}, {"normuon_beta2": 0.9}),
    "muon polar express, normuon 0.9": ({}, {"muon_polar_express": True, "normuon_beta2": 0.9}),
    "every technique": ({"residual_scalars": True, "logit_softcap": 15.0, "value_embeddings": True, "smear": True,
                         "bigram_buckets": 8192, "qk_gain": 1.2},
                        {"muon_cautious_wd": True, "warmdown_shape": "1-sqrt", "ema_decay": 0.99}),
}


def training_step(preset_name: str, model_options: dict, train_options: dict) -> Callable[[], None]:
    """One training step of the preset with these options, as lm/train.py's Trainer takes it (on the CPU)."""
    chosen = preset(preset_name)
    model_config = with_overrides(chosen.model, model_options).validate()
    train = with_overrides(chosen.train, train_options).validate()
    check_together(model_config, train)
    torch.manual_seed(0)
    model = GPT(model_config).train()
    optimizers = make_optimizers(model, train, torch.device("cpu"))
    average = WeightAverage(model, train.ema_decay) if train.ema_decay else None
    generator = torch.Generator().manual_seed(1)
    shape = (train.batch_size, model_config.context_length)
    ids = torch.randint(0, model_config.vocab_size, shape, generator=generator)
    targets = torch.randint(0, model_config.vocab_size, shape, generator=generator)
    step = 0

    def run() -> None:
        nonlocal step
        set_lr(optimizers, train.lr)
        if train.muon_cautious_wd:
            set_muon_weight_decay(optimizers, muon_weight_decay_at(step, train))
        _, loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if average is not None:
            average.update(step)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="techniques to time (the preset always runs)")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's; 1 is steadier on a busy "
                                                    "machine, where threads wait for each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as lm train does: every recipe in this process alike
    names = ["defaults (the preset)", *[n for n in (args.only or TECHNIQUES) if n != "defaults (the preset)"]]
    steps = {name: training_step(args.preset, *TECHNIQUES[name]) for name in names}
    for run in steps.values():  # first steps pay for measurements (lm/linear.py, lm/optim.py) and allocation
        for _ in range(3):
            run()
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        # Each round starts one recipe later: no recipe keeps the place after (or before) any other.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            run = steps[name]
            started = time.perf_counter()
            for _ in range(args.steps):
                run()
            blocks[name].append((time.perf_counter() - started) / args.steps)
    base = blocks[names[0]]
    table = Table(title=f"Training step, preset {args.preset}, {torch.get_num_threads()} threads, "
                        f"{args.rounds} rounds x {args.steps} steps", title_justify="left")
    for column in ("technique", "ms per step", "vs the preset"):
        table.add_column(column, justify="left" if column == "technique" else "right")
    for name, times in blocks.items():
        ratio = median(t / b for t, b in zip(times, base, strict=True))
        table.add_row(name, f"{1000 * median(times):.1f}", f"{ratio:.3f}x")
    Console(width=100).print(table)


if __name__ == "__main__":
    sys.exit(main())
