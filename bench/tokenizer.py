"""Benchmark: `lm train-tokenizer` against the bare Hugging Face `tokenizers` API.

Both train the same byte-level BPE (GPT-4 split pattern, vocab 8192, min frequency 2) on the same
corpus, each in a fresh process, in alternating runs. The table shows end-to-end wall time (process
start to tokenizer.json written), throughput, peak RSS and bytes per token on the whole corpus.
Targets: lm within 1.15x of the bare library's time, and peak RSS on the corpus copied 10 times
within 1.3x of the peak on one copy (memory follows distinct words, not corpus size).

    python bench/tokenizer.py --corpus data/shakespeare/train      (or: make bench)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _measure import alternate, median_rss, median_seconds, run_measured
from rich.console import Console
from rich.table import Table

LM = Path(sys.executable).parent / "lm"


def bare_train(out: str, vocab_size: int, files: list[str]) -> None:
    """The baseline: the tokenizers API used directly, as its documentation shows."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from lm.tokenizer import END_OF_TEXT, SPLIT_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(out)


def commands(corpus: Path, vocab_size: int, workdir: Path) -> dict[str, list[str]]:
    files = sorted(str(p) for p in corpus.iterdir() if p.suffix == ".txt")
    return {
        "lm": [str(LM), "train-tokenizer", str(corpus), "--vocab-size", str(vocab_size),
                               "--out", str(workdir / "lm.json"), "--force"],
        "bare tokenizers": [sys.executable, __file__, "--bare", str(workdir / "bare.json"), str(vocab_size),
                            *files],
    }


def bytes_per_token(tokenizer_json: Path, corpus: Path) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    total_bytes = total_tokens = 0
    for path in sorted(corpus.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        total_bytes += len(text.encode())
        total_tokens += len(tok.encode(text).ids)
    return total_bytes / total_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare/train"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=int, default=10, help="copies of the corpus for the memory check")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        sys.exit(f"no corpus at {args.corpus}; run `lm corpus shakespeare --out {args.corpus}` first")
    corpus_mb = sum(p.stat().st_size for p in args.corpus.glob("*.txt")) / 1e6
    console = Console(width=120)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cmds = commands(args.corpus, args.vocab_size, work)
        results = alternate(cmds, args.rounds)
        bpt = {"lm": bytes_per_token(work / "lm.json", args.corpus),
               "bare tokenizers": bytes_per_token(work / "bare.json", args.corpus)}

        big = work / f"corpus_x{args.scale}"
        big.mkdir()
        for copy in range(args.scale):
            for path in args.corpus.glob("*.txt"):
                shutil.copy(path, big / f"{path.stem}_{copy}.txt")
        scaled = {name: run_measured(argv) for name, argv in commands(big, args.vocab_size, work).items()}

    table = Table(title=f"Tokenizer training: {corpus_mb:.2f} MB corpus, vocab {args.vocab_size}, "
                        f"median of {args.rounds} alternating runs")
    for column in ("end to end", "seconds", "MB/s", "peak RSS MB", f"RSS MB, corpus x{args.scale}",
                   f"RSS x{args.scale} / x1", "bytes/token"):
        table.add_column(column, justify="left" if column == "end to end" else "right")
    for name, runs in results.items():
        seconds, rss = median_seconds(runs), median_rss(runs)
        table.add_row(name, f"{seconds:.2f}", f"{corpus_mb / seconds:.2f}", f"{rss:.0f}",
                      f"{scaled[name].peak_rss_mb:.0f}", f"{scaled[name].peak_rss_mb / rss:.2f}", f"{bpt[name]:.3f}")
    console.print(table)

    ratio = median_seconds(results["lm"]) / median_seconds(results["bare tokenizers"])
    rss_ratio = scaled["lm"].peak_rss_mb / median_rss(results["lm"])
    verdict = {True: "[green]met[/]", False: "[red]missed[/]"}
    console.print(f"time, lm / bare: {ratio:.2f}x (target <= 1.15x: {verdict[ratio <= 1.15]}); "
                  f"lm peak RSS x{args.scale} / x1: {rss_ratio:.2f} (target <= 1.3: {verdict[rss_ratio <= 1.3]})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        bare_train(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
