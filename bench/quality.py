"""Benchmark: what the `tiny` preset learns in its default 2-3 minutes on this CPU.

Trains `lm train --preset tiny` on the Shakespeare corpus (tokenizer: vocab 8192, trained first if
needed) and prints validation bits per byte against wall-clock seconds. The reference is nanoGPT's
documented CPU recipe (4 layers x 128, batch 12 x 64, 2000 iterations, about 2 minutes here):
1.88 nats per character on tiny Shakespeare, about 2.72 bits per byte. Target: lower than that.

    python bench/quality.py --corpus data/shakespeare      (or: make bench)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

LM = str(Path(sys.executable).parent / "lm")
NANOGPT_BPB = 1.88 / 0.6931471805599453  # nats per character -> bits per byte (ASCII text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/tokenizer.json"))
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    if not args.tokenizer.is_file():
        subprocess.run([LM, "train-tokenizer", str(args.corpus), "--vocab-size", "8192", "--out",
                        str(args.tokenizer)], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([LM, "train", str(args.corpus), "--tokenizer", str(args.tokenizer), "--preset", args.preset,
                        "--out", str(run)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_bpb" in r]
    table = Table(title=f"lm train --preset {args.preset} on {args.corpus}: validation bits per byte")
    for column in ("step", "seconds", "train loss", "val loss", "val bits/byte"):
        table.add_column(column, justify="right")
    for r in evaluations:
        table.add_row(f"{r['step']:,}", f"{r['time_s']:.0f}", f"{r['loss']:.3f}", f"{r['val_loss']:.3f}",
                      f"{r['val_bpb']:.3f}")
    console = Console(width=120)
    console.print(table)
    final = evaluations[-1]
    met = "[green]met[/]" if final["val_bpb"] < NANOGPT_BPB else "[red]missed[/]"
    console.print(f"{final['val_bpb']:.3f} bits/byte after {final['time_s']:.0f} s; nanoGPT's CPU recipe: "
                  f"{NANOGPT_BPB:.2f} (target: lower, {met})")


if __name__ == "__main__":
    main()
