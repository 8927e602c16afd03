"""Benchmark: bits per byte on text that neither the tokenizer nor the model saw, against wall-clock.

Two protocols, each scoring the held-out text with `lm eval` (sliding windows, every byte once):

    python bench/quality.py --tinyshakespeare PATH/input.txt [--max-steps 400] [lm train options...]
        nanoGPT's protocol: the first 90% of the file (by characters, as nanoGPT cuts it) to train on,
        tokenizer included, the last 10% to score. `input.txt` is char-rnn's tinyshakespeare (it lies
        in ../shared/data/tinyshakespeare/ on the development machines).
    python bench/quality.py --corpus data/shakespeare [lm train options...]     (make bench)
        the default corpus: DIR/train to train on, the whole plays in DIR/heldout to score.

Options not listed here go to `lm train` unchanged (e.g. --pos-encoding rope), so recipes compare.
The reference is nanoGPT's documented CPU recipe (4 layers x 128, 4 heads, block 64, batch 12,
2,000 iterations): 2.703 bits/byte on tinyshakespeare's last 10%, scored the same way, in 61 s on a
2-core Intel Xeon (measured 2026-11-24, see shared/NOTES.md). It is not re-run here; bench/sweep.py
--nanogpt runs it side by side on this machine (bench/nanogpt.py), which is how to compare wall-clock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

LM = str(Path(sys.executable).parent / "lm")
NANOGPT = {"bits_per_byte": 2.703, "seconds": 61.0}  # CPU recipe, tinyshakespeare last 10%, 2-core Xeon


def design_flags(design: dict[str, object]) -> list[str]:
    """`lm train` options that give a run one of lm.config.FAMILY_DESIGNS, whatever the preset's design."""
    return ["--pos-encoding", str(design["pos_encoding"]), "--norm", str(design["norm"]), "--mlp", str(design["mlp"]),
            "--bias" if design["bias"] else "--no-bias", "--qk-norm" if design["qk_norm"] else "--no-qk-norm"]


def split_like_nanogpt(source: Path, folder: Path) -> tuple[Path, Path]:
    """train.txt and val.txt: the first int(0.9 n) characters and the rest, exactly as nanoGPT splits."""
    text = source.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


def train_and_score(train: Path, val: Path, run: Path, train_args: list[str]) -> tuple[dict, list[dict], float]:
    """Train (a fresh process) and score on `val` with `lm eval`: the scored run, every line of the run's
    metrics.jsonl, the training's wall seconds. A failed training raises CalledProcessError (its stderr kept)."""
    started = time.perf_counter()
    subprocess.run([LM, "train", str(train), "--val", str(val), "--out", str(run), "--force", *train_args],
                   check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    scored = subprocess.run([LM, "eval", str(run), "--text", str(val), "--format", "json"], check=True,
                            capture_output=True, text=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads(scored.stdout)["runs"][0], metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tinyshakespeare", type=Path, metavar="INPUT_TXT")
    where.add_argument("--corpus", type=Path, metavar="DIR", help="a folder from `lm corpus` (train/, heldout/)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--keep", type=Path, metavar="RUN_DIR", help="keep the run here instead of discarding it")
    args, train_args = parser.parse_known_args()
    train_args = ["--preset", args.preset, *train_args]
    with tempfile.TemporaryDirectory() as tmp:
        if args.tinyshakespeare:
            train, val = split_like_nanogpt(args.tinyshakespeare, Path(tmp))
            protocol = f"tinyshakespeare ({args.tinyshakespeare}): first 90% to train, last 10% scored"
        else:
            train, val = args.corpus / "train", args.corpus / "heldout"
            protocol = f"{args.corpus}: train/ to train, heldout/ scored"
        run = args.keep or Path(tmp) / "run"
        scored, metrics, seconds = train_and_score(train, val, run, train_args)
        evaluations = [m for m in metrics if "val_bpb" in m]
    console = Console(width=120)
    curve = Table(title=f"lm train {' '.join(train_args)}: held-out bits per byte during the run "
                        "(estimates on a spread sample of the windows; the last one is complete)",
                  title_justify="left")
    for column in ("step", "seconds", "train loss", "val bits/byte"):
        curve.add_column(column, justify="right")
    for r in evaluations:
        curve.add_row(f"{r['step']:,}", f"{r['time_s']:.0f}", f"{r['loss']:.3f}", f"{r['val_bpb']:.4f}")
    console.print(curve)
    total = scored["total"]
    table = Table(title=protocol, title_justify="left")
    for column in ("model", "tokenizer", "training s", "held-out bits/byte", "vs nanoGPT"):
        table.add_column(column, justify="left" if column in ("model", "tokenizer") else "right")
    table.add_row(f"lm {' '.join(train_args)}", f"{scored['vocab_size']:,} BPE, training text only",
                  f"{evaluations[-1]['time_s']:.0f} (wall {seconds:.0f})", f"{total['bits_per_byte']:.4f}",
                  f"{total['bits_per_byte'] / NANOGPT['bits_per_byte']:.2f}x" if args.tinyshakespeare else "")
    if args.tinyshakespeare:
        table.add_row("nanoGPT CPU recipe (reference, not re-run)", "characters", f"{NANOGPT['seconds']:.0f}",
                      f"{NANOGPT['bits_per_byte']:.4f}", "1.00x")
    console.print(table)
    console.print(f"lm eval and the run's own last evaluation: {total['bits_per_byte']:.4f} and "
                  f"{evaluations[-1]['val_bpb']:.4f} bits/byte on {total['bytes']:,} held-out bytes")


if __name__ == "__main__":
    main()
