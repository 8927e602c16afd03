"""Benchmark: fine-tune an imported transformers GPT-2 on Shakespeare, then hand it back to transformers.

Nothing is downloaded: transformers builds a small random `GPT2LMHeadModel` (4 layers x 128, context
128, the vocabulary of a tokenizer trained here on the corpus's train/ folder) and saves it with
`save_pretrained`. Then, through the installed `lm`:

    lm import HF --out BASE
    lm train CORPUS/train --val CORPUS/heldout --init-from BASE --out TUNED --max-steps N
    lm export TUNED --out HF2

and checks that validation loss went down from step 0 (the imported model's own loss, scored before
the first step) and that transformers loads HF2 with logits equal to lm's (1e-4). Prints a table.

    python bench/finetune.py --corpus data/shakespeare      (or: make bench)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

LM = Path(sys.executable).parent / "lm"


def lm(*args: str | Path) -> str:
    result = subprocess.run([str(LM), *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"lm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    import transformers

    from lm.checkpoint import load_run

    with tempfile.TemporaryDirectory(prefix="lm-bench-finetune-") as tmp:
        work = Path(tmp)
        lm("train-tokenizer", args.corpus / "train", "--vocab-size", "4096", "--out", work / "tokenizer.json")
        from lm.tokenizer import Tokenizer

        tok = Tokenizer.from_file(work / "tokenizer.json")
        config = transformers.GPT2Config(n_positions=128, n_embd=128, n_layer=4, n_head=4, vocab_size=tok.vocab_size,
                                         bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(work / "hf")
        tok.save(work / "hf" / "tokenizer.json")
        lm("import", work / "hf", "--out", work / "base")
        started = time.perf_counter()
        lm("train", args.corpus / "train", "--val", args.corpus / "heldout", "--init-from", work / "base",
           "--out", work / "tuned", "--max-steps", str(args.steps), "--eval-every", str(max(1, args.steps // 3)),
           "--lr", str(args.lr), "--sample-tokens", "0")
        seconds = time.perf_counter() - started
        lm("export", work / "tuned", "--out", work / "hf2")
        metrics = [json.loads(line) for line in (work / "tuned" / "metrics.jsonl").read_text().splitlines()]
        evaluations = [m for m in metrics if "val_loss" in m]
        hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf2").eval()
        model, _, _ = load_run(work / "tuned")
        ids = torch.randint(0, tok.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = (model(ids)[0] - hf(ids).logits).abs().max().item()

    table = Table(title=f"Fine-tuning an imported GPT-2 (4 x 128, vocab {tok.vocab_size:,}) on Shakespeare, "
                        f"{args.steps} steps at lr {args.lr:g}: {seconds:.0f} s end to end", title_justify="left")
    for column in ("step", "val loss", "val bits/byte"):
        table.add_column(column, justify="right")
    for m in evaluations:
        table.add_row(f"{m['step']:,}", f"{m['val_loss']:.4f}", f"{m['val_bpb']:.4f}")
    Console().print(table)
    went_down = evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]
    print(f"validation loss went down: {'yes' if went_down else 'NO'}; exported -> transformers logits max "
          f"difference {difference:.2e} ({'equal' if difference < 1e-4 else 'NOT equal'} to 1e-4)")


if __name__ == "__main__":
    main()
