"""Sweep: train candidate recipes and score each on held-out text, one table.

    python bench/sweep.py --tinyshakespeare PATH/input.txt --nanogpt NANOGPT_CHECKOUT [--only NAME ...]
    python bench/sweep.py --tinyshakespeare PATH/input.txt --time-budget 61 [--only NAME ...]
    python bench/sweep.py --tinyshakespeare PATH/input.txt --max-steps 400      (quality per step)
    python bench/sweep.py ... --seeds 1 2 3      (each recipe once per seed; the table gives the median)

nanoGPT's protocol: the first 90% of the characters to train on (the tokenizer included), the last
10% scored by `lm eval` (sliding windows, every byte once). With --time-budget each recipe trains for
that many seconds, evaluation and saving included (`lm train --time-budget`), so faster steps count;
with --max-steps they compare per step (a machine under load makes wall-clock budgets unfair, steps
are not). The recipes run one after the other, in the order given, each in a fresh process.

With --nanogpt (a checkout of karpathy/nanoGPT) the peer runs first, on this machine, in this run
(bench/nanogpt.py: its CPU recipe, scored the same way), and its wall-clock is every recipe's budget:
the table's ratios are then side by side. Without it they compare with nanoGPT's 2.703 bits/byte in
61 s measured on a 2-core Intel Xeon on 2026-11-24.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from nanogpt import run_nanogpt
from quality import NANOGPT, design_flags, split_like_nanogpt, train_and_score
from rich.console import Console
from rich.table import Table

from lm.config import FAMILY_DESIGNS

# Each recipe changes the tiny preset of its day: before the sweep, GPT-2's block, AdamW, lr 2e-3. The
# preset is now the winner, so the earlier recipes spell out the old settings they assumed. "defaults, ..."
# recipes change the preset of their sweep: a cosine decay until sweep 8, warmdown 0.3 in 9, 0.5 since 10.
GPT2, LLAMA = design_flags(FAMILY_DESIGNS["gpt2"]), design_flags(FAMILY_DESIGNS["llama"])
OLD = ["--optimizer", "adamw", "--lr", "2e-3"]
RECIPES: dict[str, list[str]] = {
    "defaults (the tiny preset)": [],
    "tiny (learned, AdamW)": [*GPT2, *OLD],  # the tiny preset before the sweep
    "rope": [*GPT2, *OLD, "--pos-encoding", "rope"],
    "rope, muon": [*GPT2, "--lr", "2e-3", "--pos-encoding", "rope", "--optimizer", "muon"],
    "llama block": [*LLAMA, *OLD],
    "llama block, muon": [*LLAMA, "--lr", "2e-3", "--optimizer", "muon"],
    "qwen3 block (qk-norm), muon": [*LLAMA, "--lr", "2e-3", "--qk-norm", "--optimizer", "muon"],
    "gpt2 block, relu2, muon": [*GPT2, "--lr", "2e-3", "--mlp", "relu2", "--optimizer", "muon"],
    "rope, muon, vocab 4096": [*GPT2, "--lr", "2e-3", "--pos-encoding", "rope", "--optimizer", "muon",
                               "--vocab-size", "4096"],
    "rope, muon, vocab 2048": [*GPT2, "--lr", "2e-3", "--pos-encoding", "rope", "--optimizer", "muon",
                               "--vocab-size", "2048"],
    "rope, muon, lr 4e-3": [*GPT2, "--pos-encoding", "rope", "--optimizer", "muon", "--lr", "4e-3"],
    "rope, muon, warmdown 0.4": [*GPT2, "--lr", "2e-3", "--pos-encoding", "rope", "--optimizer", "muon",
                                 "--warmdown", "0.4"],
    "rope, lr 4e-3": [*GPT2, "--optimizer", "adamw", "--pos-encoding", "rope", "--lr", "4e-3"],
    "rope, muon, lr 8e-3": [*GPT2, "--pos-encoding", "rope", "--optimizer", "muon", "--lr", "8e-3"],
    "llama block, muon, lr 4e-3": [*LLAMA, "--optimizer", "muon", "--lr", "4e-3"],
    "llama block, muon, lr 8e-3": [*LLAMA, "--optimizer", "muon", "--lr", "8e-3"],
    "llama block, muon, lr 4e-3, muon x2": [*LLAMA, "--optimizer", "muon", "--lr", "4e-3", "--muon-lr-scale", "2"],
    "llama block, muon, lr 4e-3, warmdown 0.4": [*LLAMA, "--optimizer", "muon", "--lr", "4e-3", "--warmdown", "0.4"],
    "qwen3 block, muon, lr 4e-3": [*LLAMA, "--qk-norm", "--optimizer", "muon", "--lr", "4e-3"],
    "qwen3 block, muon, lr 6e-3": [*LLAMA, "--qk-norm", "--optimizer", "muon", "--lr", "6e-3"],
    "qwen3 block, muon, lr 4e-3, muon x2": [*LLAMA, "--qk-norm", "--optimizer", "muon", "--lr", "4e-3",
                                            "--muon-lr-scale", "2"],
    "defaults, warmup 20": ["--warmup-steps", "20"],
    "defaults, batch 8": ["--batch-size", "8"],
    "defaults, batch 8, warmup 20": ["--batch-size", "8", "--warmup-steps", "20"],
    "defaults, bfloat16 autocast": ["--dtype", "bfloat16"],
    "defaults, context 256, batch 8": ["--context-length", "256", "--batch-size", "8"],
    "defaults, d_model 192": ["--d-model", "192"],
    "defaults, untied output head": ["--no-tie-embeddings"],
    "defaults, batch 24": ["--batch-size", "24"],
    "defaults, bfloat16 autocast, float32 head": ["--dtype", "bfloat16"],
    "defaults, warmdown 0.3": ["--warmdown", "0.3"],
    "defaults, lr 5e-3": ["--lr", "5e-3"],
    "defaults, 2 heads": ["--n-head", "2"],
    "defaults, cosine decay (warmdown 0)": ["--warmdown", "0"],
    "defaults, warmdown 0.5": ["--warmdown", "0.5"],
    "defaults, warmdown 0.7": ["--warmdown", "0.7"],
    "defaults, muon 4 newton-schulz steps": ["--muon-ns-steps", "4"],
    "defaults, muon 3 newton-schulz steps": ["--muon-ns-steps", "3"],
    # Sweep 15 (issue 27): the speedrun's techniques (modded-nanogpt, nanochat), each alone on the tiny preset,
    # then the winners together. Those marked "not exportable" would go into a preset of their own.
    "defaults, residual scalars": ["--residual-scalars"],  # not exportable
    "defaults, residual scalars, scalar lr x10": ["--residual-scalars", "--scalar-lr-scale", "10"],  # not exportable
    "defaults, logit softcap 15": ["--logit-softcap", "15"],  # not exportable
    "defaults, value embeddings": ["--value-embeddings"],  # not exportable
    "defaults, smear": ["--smear"],  # not exportable
    "defaults, bigram table 8192": ["--bigram-buckets", "8192"],  # not exportable
    "defaults, untied head, embedding lr x5, head lr x0.5": ["--no-tie-embeddings", "--embed-lr-scale", "5",
                                                             "--head-lr-scale", "0.5"],
    "defaults, untied head, tiny head init": ["--no-tie-embeddings", "--head-init-std", "0.001"],
    "defaults, zero-init projections": ["--zero-init-proj"],
    "defaults, adam eps 1e-10": ["--adam-eps", "1e-10"],
    "defaults, muon cautious weight decay": ["--muon-cautious-wd"],
    "defaults, 1-sqrt warmdown": ["--warmdown-shape", "1-sqrt"],
    "defaults, weight average 0.99": ["--ema-decay", "0.99"],  # the preset's since sweep 18
    "defaults, no weight average": ["--ema-decay", "0"],  # the preset before sweep 18
    "defaults, qk gain 1.2": ["--qk-gain", "1.2"],
    # Sweeps 19-20: the preset overfits tinyshakespeare's 1 MB (after 436 steps the training text at 4.36
    # nats/token, the held-out text at 5.37): a smaller vocabulary (fewer rare tokens to learn, a cheaper
    # head), stronger weight decay, fewer layers (more steps).
    "defaults, weight decay 0.5": ["--weight-decay", "0.5"],  # the preset's since sweep 20
    "defaults, weight decay 0.1": ["--weight-decay", "0.1"],  # the preset before sweep 20
    "defaults, vocab 1024, weight decay 0.5": ["--vocab-size", "1024", "--weight-decay", "0.5"],
    "defaults, vocab 1024, weight decay 0.5, 3 layers": ["--vocab-size", "1024", "--weight-decay", "0.5",
                                                          "--n-layer", "3"],
    # Sweep 21: since then `lm train` sizes the vocabulary it trains to the text (2,048 tokens for
    # tinyshakespeare's 1 MB, lm.tokenizer.default_vocab_size), and the preset has three layers.
    "defaults before sweep 21 (8,192 tokens, 4 layers)": ["--vocab-size", "8192", "--n-layer", "4"],
    "defaults, 4 layers": ["--n-layer", "4"],
    "defaults, batch 12": ["--batch-size", "12"],
    "defaults, batch 12, 2 heads": ["--batch-size", "12", "--n-head", "2"],
    # Sweep 23: since then the preset steps Muon's matrices 1.4 times as far, decays every matrix twice as
    # hard (weight decay 1.0) and lets AdamW average its squared gradients over ~100 steps (beta2 0.99).
    "defaults before sweep 23 (Muon lr x1, weight decay 0.5, beta2 0.95)": ["--muon-lr-scale", "1", "--weight-decay",
                                                                            "0.5", "--adam-beta2", "0.95"],
    "defaults, beta2 0.95 (sweep 23's first round)": ["--adam-beta2", "0.95"],
    # Sweep 24: since then the preset orthogonalises Muon's updates with Polar Express's quintics and evens
    # them out over the neurons (NorMuon, beta2 0.9).
    "defaults before sweep 24 (PyTorch's quintic, no NorMuon)": ["--no-muon-polar-express", "--normuon-beta2", "0"],
    # Sweep 25: since then the preset reads its training windows in epochs (every token once per epoch).
    "defaults before sweep 25 (random windows)": ["--windows", "random"],
    # Sweep 26: with the text read evenly the preset overfits less, so its weight decay was tried again.
    "defaults, weight decay 0.7": ["--weight-decay", "0.7"],
    "defaults, weight decay 1.5": ["--weight-decay", "1.5"],
}
# The recipes of sweep 15 (docs/benchmarks.md) that beat the preset, together: the weight average and
# Muon's cautious weight decay (every other technique lost, by 0.007 to 0.15 bits/byte).
WINNERS: list[str] = ["--ema-decay", "0.99", "--muon-cautious-wd"]
RECIPES["defaults, the winners of sweep 15 together"] = WINNERS


def seed_flags(seed: int | None) -> list[str]:
    return [] if seed is None else ["--seed", str(seed)]


def run_recipe(name: str, flags: list[str], seed: int | None, preset: str, train: Path, val: Path, tmp: Path,
               console: Console) -> dict | None:
    """Train one recipe and score it on `val`; None when training failed."""
    try:
        scored, metrics, wall = train_and_score(train, val, tmp / "run", ["--preset", preset, "--sample-tokens", "0",
                                                                          *flags, *seed_flags(seed)])
    except subprocess.CalledProcessError as failed:
        console.print(f"[red]{name}: {failed.stderr.strip().splitlines()[-1]}[/]")
        return None
    total, last = scored["total"], metrics[-1]
    speed = sorted(m["tokens_per_s"] for m in metrics)[len(metrics) // 2]
    label = name if seed is None else f"{name} (seed {seed})"
    print(f"{label}: {total['bits_per_byte']:.4f} bits/byte, {last['step']} steps, {last['time_s']:.0f} s", flush=True)
    return {"steps": last["step"], "seconds": last["time_s"], "wall_s": wall, "tokens_per_s": speed,
            "bits_per_byte": total["bits_per_byte"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tinyshakespeare", type=Path, required=True, metavar="INPUT_TXT")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--time-budget", type=float, metavar="SECONDS")
    length.add_argument("--max-steps", type=int)
    length.add_argument("--nanogpt", type=Path, metavar="CHECKOUT",
                        help="run nanoGPT's CPU recipe here first; its wall-clock is the budget")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="recipes to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], metavar="SEED",
                        help="train each recipe once per seed (lm train --seed) and rank by the median")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, common = parser.parse_known_args()
    recipes = {name: RECIPES[name] for name in (args.only or RECIPES)}
    peer = dict(NANOGPT, measured=False)
    if args.nanogpt:
        peer = dict(run_nanogpt(args.nanogpt, args.tinyshakespeare), measured=True)
        args.time_budget = peer["seconds"]
        print(f"nanoGPT: {peer['bits_per_byte']:.4f} bits/byte, {peer['iters']} iterations, "
              f"{peer['seconds']:.1f} s", flush=True)
    budget = ["--time-budget", f"{args.time_budget:g}"] if args.time_budget else ["--max-steps", str(args.max_steps)]
    console = Console(width=130)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train, val = split_like_nanogpt(args.tinyshakespeare, Path(tmp))
        # Seed by seed, every recipe in turn: a machine whose speed drifts (and so gives fewer steps in
        # the same seconds) hits every recipe alike, not the ones that happen to run in a slow spell.
        runs: dict[str, list[dict | None]] = {name: [] for name in recipes}
        for seed in args.seeds or [None]:
            for name, extra in recipes.items():
                runs[name].append(run_recipe(name, [*budget, *common, *extra], seed, args.preset, train, val,
                                             Path(tmp), console))
        for name, extra in recipes.items():
            if None in runs[name]:
                continue
            by_seed = [r["bits_per_byte"] for r in runs[name]]
            middle = sorted(runs[name], key=lambda r: r["bits_per_byte"])[len(by_seed) // 2]  # the median run's
            results.append({**middle, "recipe": name, "args": extra, "seeds": args.seeds,
                            "bits_per_byte": median(by_seed), "by_seed": by_seed})
    table = Table(title=f"Recipes on tinyshakespeare (first 90% to train, last 10% scored), "
                        f"{' '.join(budget)}, preset {args.preset}; best first", title_justify="left")
    reference = f"vs nanoGPT's {peer['bits_per_byte']:.3f}" + ("" if peer["measured"] else " (2026-11-24)")
    held_out = "held-out bits/byte" + (f" (median of seeds {', '.join(map(str, args.seeds))})" if args.seeds else "")
    for column in ("recipe", "steps", "train s", "tokens/s", held_out, reference):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for r in sorted(results, key=lambda r: r["bits_per_byte"]):
        each = f" ({', '.join(f'{b:.4f}' for b in r['by_seed'])})" if len(r["by_seed"]) > 1 else ""
        table.add_row(r["recipe"], f"{r['steps']:,}", f"{r['seconds']:.0f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['bits_per_byte']:.4f}{each}", f"{r['bits_per_byte'] / peer['bits_per_byte']:.3f}x")
    if peer["measured"]:
        table.add_row("nanoGPT CPU recipe, run here first", f"{peer['iters']:,}", f"{peer['seconds']:.0f}", "",
                      f"{peer['bits_per_byte']:.4f}", "1.000x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"nanogpt": peer, "recipes": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
