"""Benchmark: what the DDP wrapper costs at world size 1 (target: under 3%).

Trains the same short run as a plain process and as one process under torchrun (so wrapped in
DistributedDataParallel), in alternating runs, and compares training tokens/s from metrics.jsonl
(evaluation and checkpoints excluded). Meant for a GPU (`--device cuda --preset gpt2`); on a CPU it
measures the same wrapper against gloo.

    python bench/ddp.py --corpus data/shakespeare/train [--device cuda --preset gpt2 --steps 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from rich.console import Console
from rich.table import Table


def tokens_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return median(r["tokens_per_s"] for r in records[1:])  # the first interval includes warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare/train"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/tokenizer.json"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    common = [str(args.corpus), "--preset", args.preset, "--device", args.device, "--max-steps", str(args.steps),
              "--log-every", "10", "--eval-every", str(args.steps), "--sample-tokens", "0", "--force"]
    if args.tokenizer.is_file():
        common += ["--tokenizer", str(args.tokenizer)]
    lm = [str(Path(sys.executable).parent / "lm"), "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "lm",
                "train"]
    results: dict[str, list[float]] = {"plain process": [], "torchrun, 1 process (DDP)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, command in (("plain process", lm), ("torchrun, 1 process (DDP)", torchrun)):
                run = Path(tmp) / "run"
                subprocess.run([*command, *common, "--out", str(run)], check=True, capture_output=True)
                results[name].append(tokens_per_s(run))
    table = Table(title=f"DDP at world size 1: {args.preset} preset, {args.steps} steps on {args.device}, "
                        f"median of {args.rounds} alternating runs")
    table.add_column("")
    table.add_column("tokens/s", justify="right")
    for name, values in results.items():
        table.add_row(name, f"{median(values):,.0f}")
    console = Console(width=120)
    console.print(table)
    plain, wrapped = (median(v) for v in results.values())
    overhead = 1 - wrapped / plain
    console.print(f"overhead: {overhead:.1%} (target < 3%: {'[green]met[/]' if overhead < 0.03 else '[red]missed[/]'})")


if __name__ == "__main__":
    main()
