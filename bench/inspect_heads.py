"""Benchmark: `lm inspect-heads` on a GPT-2-sized model (12 layers x 12 heads, d_model 768) and 256 tokens.

The issue's figure: the whole ablation table (every one of the 144 heads mean-ablated in turn, the loss
of all 256 tokens each time) in seconds on a 2-core CPU. The table splits the command's time into its
parts, each timed in-process (median of --rounds): the ablation table, the head detectors, direct
logit attribution, and the whole command (`lm inspect-heads RUN --text TEXT`, start-up included).
The model is bench/llama_cpp.py's random one (lm's initialisation, vocabulary 8192 from the Shakespeare
tokenizer); speed does not depend on the weights. Threads: PyTorch's default (OMP_NUM_THREADS to change).

    python bench/inspect_heads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from _measure import run_measured
from llama_cpp import random_run, tokenizer_and_corpus
from rich.console import Console
from rich.table import Table

from lm.cache import cache_dir
from lm.checkpoint import load_run
from lm.heads import ablate_heads, attribute_logit, detect_heads

LM = str(Path(sys.executable).parent / "lm")
TOKENS = 256


def timed(work: Callable[[], object], rounds: int) -> float:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = cache_dir() / "bench-llama-cpp"
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer_file = tokenizer_and_corpus(work)
    run = random_run(work, "gpt2", tokenizer_file, "gpt2")
    model, tokenizer, _ = load_run(run)
    config = model.config
    macbeth = (corpus.parent / "heldout" / "macbeth_gut.txt").read_text()  # held out: a text none of it saw
    text = tokenizer.decode(tokenizer.encode(macbeth[5000:20000])[:TOKENS])

    parts = {
        f"ablation table ({config.n_layer * config.n_head} heads, mean)": lambda: ablate_heads(model, tokenizer, text),
        "head detectors": lambda: detect_heads(model, tokenizer, text),
        "direct logit attribution (last position)": lambda: attribute_logit(model, tokenizer, text),
    }
    seconds = {name: timed(part, args.rounds) for name, part in parts.items()}
    command = median(run_measured([LM, "inspect-heads", str(run), "--text", text, "--format", "json"]).seconds
                     for _ in range(args.rounds))
    table = Table(title=f"lm inspect-heads, {config.n_layer} x {config.n_head} heads, d_model {config.d_model}, "
                        f"vocabulary {config.vocab_size}, {len(tokenizer.encode(text))} tokens; "
                        f"{torch.get_num_threads()} threads on {os.cpu_count()} cores; median of {args.rounds}",
                  title_justify="left")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    for name, value in seconds.items():
        table.add_row(name, f"{value:.1f}")
    table.add_row("the whole command (start-up, all of the above, JSON out)", f"{command:.1f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
