"""Benchmark: `lm inspect-attention` on a 256-token text with the tiny preset, start-up included.

Target: under 3 seconds for the whole command on a 2-core CPU. The table splits the time: Python's
own start, importing torch, and then lm's work (loading the run, the forward pass, drawing).

    python bench/inspect_attention.py --run runs/demo      (or: make bench)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

from _measure import run_measured
from rich.console import Console
from rich.table import Table

LM = str(Path(sys.executable).parent / "lm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (args.run / "config.json").is_file():
        sys.exit(f"no run at {args.run}; run `make demo` (or pass --run)")

    from lm.checkpoint import load_run
    from lm.inspect import encode_for_inspection

    model, tokenizer, _ = load_run(args.run)
    words = Path(__file__).resolve().parents[1].joinpath("data", "sample.txt").read_text().split()
    text = " ".join(words)
    # Cut the text to 256 tokens, as the issue asks (a tiny model keeps the last window of its context).
    ids = tokenizer.encode(text)[:256]
    text = tokenizer.decode(ids)
    kept, dropped = encode_for_inspection(model, tokenizer, text)

    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "lm inspect-attention (heat table)": [LM, "inspect-attention", str(args.run), "--text", text],
        "lm inspect-attention --heads-summary": [LM, "inspect-attention", str(args.run), "--text", text,
                                                 "--heads-summary"],
    }
    seconds = {name: median(run_measured(argv).seconds for _ in range(args.rounds)) for name, argv in commands.items()}

    started = time.perf_counter()
    load_run(args.run)
    load_s = time.perf_counter() - started
    table = Table(title=f"lm inspect-attention on {len(ids)} tokens ({len(kept)} fit the context; {dropped} "
                        f"dropped), median of {args.rounds}")
    table.add_column("")
    table.add_column("seconds", justify="right")
    for name, value in seconds.items():
        table.add_row(name, f"{value:.2f}")
    table.add_row("  of which: loading the run (in-process)", f"{load_s:.2f}")
    console = Console(width=120)
    console.print(table)
    worst = max(seconds["lm inspect-attention (heat table)"], seconds["lm inspect-attention --heads-summary"])
    console.print(f"slowest view: {worst:.2f} s (target < 3 s: {'[green]met[/]' if worst < 3 else '[red]missed[/]'})")


if __name__ == "__main__":
    main()
