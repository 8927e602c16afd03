"""Benchmark: how fast `lm` answers when it has no heavy work to do (target: `lm --help` under 0.5 s).

Commands that do not need torch must not import it (about 1.7 s on a 2-core laptop-class CPU).

    python bench/startup.py      (or: make bench)
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import median

from _measure import alternate
from rich.console import Console
from rich.table import Table

LM = str(Path(sys.executable).parent / "lm")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    commands = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "lm --help": [LM, "--help"],
        "lm train-tokenizer --help": [LM, "train-tokenizer", "--help"],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }
    results = alternate(commands, rounds)
    table = Table(title=f"Start-up, median of {rounds} alternating runs")
    table.add_column("command")
    table.add_column("seconds", justify="right")
    table.add_column("peak RSS MB", justify="right")
    for name, runs in results.items():
        table.add_row(name, f"{median(r.seconds for r in runs):.3f}", f"{median(r.peak_rss_mb for r in runs):.0f}")
    console = Console(width=120)
    console.print(table)
    help_seconds = median(r.seconds for r in results["lm --help"])
    met = "[green]met[/]" if help_seconds < 0.5 else "[red]missed[/]"
    console.print(f"lm --help: {help_seconds:.3f} s (target < 0.5 s: {met})")


if __name__ == "__main__":
    main()
