"""Sweep: train candidate recipes and score each on held-out text, one table.

    python bench/sweep.py --tinyshakespeare PATH/input.txt --time-budget 61 [--only NAME ...]
    python bench/sweep.py --tinyshakespeare PATH/input.txt --max-steps 400      (quality per step)

nanoGPT's protocol: the first 90% of the characters to train on (the tokenizer included), the last
10% scored by `lm eval` (sliding windows, every byte once). With --time-budget each recipe trains for
that many seconds, evaluation and saving included (`lm train --time-budget`), so faster steps count;
with --max-steps they compare per step (a machine under load makes wall-clock budgets unfair, steps
are not). The recipes run one after the other, in the order given, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality import LM, NANOGPT, split_like_nanogpt
from rich.console import Console
from rich.table import Table

RECIPES: dict[str, list[str]] = {
    "tiny (learned, AdamW)": [],
    "rope": ["--pos-encoding", "rope"],
    "rope, muon": ["--pos-encoding", "rope", "--optimizer", "muon"],
    "llama block": ["--pos-encoding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias"],
    "llama block, muon": ["--pos-encoding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias",
                          "--optimizer", "muon"],
    "qwen3 block (qk-norm), muon": ["--pos-encoding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias",
                                    "--qk-norm", "--optimizer", "muon"],
    "gpt2 block, relu2, muon": ["--mlp", "relu2", "--optimizer", "muon"],
    "rope, muon, vocab 4096": ["--pos-encoding", "rope", "--optimizer", "muon", "--vocab-size", "4096"],
    "rope, muon, vocab 2048": ["--pos-encoding", "rope", "--optimizer", "muon", "--vocab-size", "2048"],
    "rope, muon, lr 4e-3": ["--pos-encoding", "rope", "--optimizer", "muon", "--lr", "4e-3"],
    "rope, muon, warmdown 0.4": ["--pos-encoding", "rope", "--optimizer", "muon", "--warmdown", "0.4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tinyshakespeare", type=Path, required=True, metavar="INPUT_TXT")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--time-budget", type=float, metavar="SECONDS")
    length.add_argument("--max-steps", type=int)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="recipes to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, common = parser.parse_known_args()
    recipes = {name: RECIPES[name] for name in (args.only or RECIPES)}
    budget = ["--time-budget", f"{args.time_budget:g}"] if args.time_budget else ["--max-steps", str(args.max_steps)]
    console = Console(width=130)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train, val = split_like_nanogpt(args.tinyshakespeare, Path(tmp))
        for name, extra in recipes.items():
            run = Path(tmp) / "run"
            started = time.perf_counter()
            trained = subprocess.run([LM, "train", str(train), "--val", str(val), "--out", str(run), "--force",
                                      "--preset", args.preset, *budget, "--sample-tokens", "0", *common, *extra],
                                     capture_output=True, text=True)
            if trained.returncode != 0:
                console.print(f"[red]{name}: {trained.stderr.strip().splitlines()[-1]}[/]")
                continue
            wall = time.perf_counter() - started
            scored = subprocess.run([LM, "eval", str(run), "--text", str(val), "--format", "json"], check=True,
                                    capture_output=True, text=True)
            total = json.loads(scored.stdout)["runs"][0]["total"]
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = metrics[-1]
            speed = sorted(m["tokens_per_s"] for m in metrics)[len(metrics) // 2]
            results.append({"recipe": name, "args": extra, "steps": last["step"], "seconds": last["time_s"],
                            "wall_s": wall, "tokens_per_s": speed, "bits_per_byte": total["bits_per_byte"]})
            console.print(f"{name}: {total['bits_per_byte']:.4f} bits/byte, {last['step']} steps, "
                          f"{last['time_s']:.0f} s")
    table = Table(title=f"Recipes on tinyshakespeare (first 90% to train, last 10% scored), "
                        f"{' '.join(budget)}, preset {args.preset}; best first", title_justify="left")
    for column in ("recipe", "steps", "train s", "tokens/s", "held-out bits/byte", "vs nanoGPT's 2.703"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for r in sorted(results, key=lambda r: r["bits_per_byte"]):
        table.add_row(r["recipe"], f"{r['steps']:,}", f"{r['seconds']:.0f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['bits_per_byte']:.4f}", f"{r['bits_per_byte'] / NANOGPT['bits_per_byte']:.3f}x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
