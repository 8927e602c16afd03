"""Benchmark: encoding a corpus into lm's token cache, against tiktoken with the same threads.

The corpus is Shakespeare (`lm corpus shakespeare`'s train/ folder) repeated to 200 MB, with a 50 MB
copy to check that memory stays flat. The tokenizer is a byte-level BPE of 8192 tokens trained here
on the corpus; tiktoken gets an `Encoding` built from that tokenizer's own merges (ranks in merge
order), so both produce the same ids, and the benchmark checks that they do.

- `lm`: `lm.data.tokenize_corpus` into an empty cache folder: reading, chunking, encoding in a
  thread pool, writing the uint16 cache file: the whole job `lm train` does before its first step.
- `lm`, `tokenizers` encoder: the same, with tiktoken's encoder swapped for `tokenizers`'
  `encode_batch_fast` (what lm does when tiktoken is missing or cannot reproduce a tokenizer).
- tiktoken: the same chunks of text read from the same file, `encode_ordinary_batch(batch,
  num_threads=T)` per 64 chunks, ids written to a file: what a script around tiktoken would do.
- `lm`, cached: a second `tokenize_corpus` of the same text: a hash of the files, no encoding.

Each run is a fresh process (peak RSS from the kernel); contenders alternate, medians are shown.
Targets: lm >= 0.8x tiktoken's MB/s at the same threads, peak RSS < 500 MB and flat from 50 to 200 MB.

    python bench/encode.py --corpus data/shakespeare/train      (or: make bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from rich.console import Console
from rich.table import Table

CHUNKS_PER_BATCH = 64


def build_corpus(source: Path, folder: Path, megabytes: int) -> Path:
    """One file of `megabytes` MB: the source files, in order, repeated (reused when already there)."""
    target = folder / f"shakespeare-{megabytes}mb.txt"
    if target.is_file() and target.stat().st_size >= megabytes * 1_000_000:
        return target
    files = sorted(p for p in source.rglob("*") if p.is_file())
    text = b"".join(p.read_bytes() for p in files)
    folder.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        written = 0
        while written < megabytes * 1_000_000:
            out.write(text)
            written += len(text)
    return target


def worker(kind: str, corpus: Path, tokenizer_file: Path, threads: int, cache: Path) -> dict:
    """One measurement, in this (fresh) process."""
    from lm.textfiles import find_text_files, iter_text_chunks
    from lm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    sources = find_text_files([corpus])
    if kind == "tiktoken":
        import numpy as np
        import tiktoken

        from lm.tokenizer import SPLIT_PATTERN, _byte_of_char

        spec = json.loads(tok.to_str())["model"]
        table = _byte_of_char()
        ranks = {bytes([b]): b for b in range(256)}
        for merge in spec["merges"]:
            left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
            ranks[bytes(table[c] for c in left + right)] = len(ranks)
        encoding = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
        started = time.perf_counter()
        tokens = 0
        batch: list[str] = []
        with (cache / "tiktoken.bin").open("wb") as out:
            for chunk in iter_text_chunks(sources):
                batch.append(chunk)
                if len(batch) == CHUNKS_PER_BATCH:
                    for ids in encoding.encode_ordinary_batch(batch, num_threads=threads):
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                        tokens += len(ids)
                    batch = []
            for ids in encoding.encode_ordinary_batch(batch, num_threads=threads):
                np.asarray(ids, dtype=np.uint16).tofile(out)
                tokens += len(ids)
        seconds = time.perf_counter() - started
        tokens += 1  # lm closes the document with <|endoftext|>
    else:
        from lm.data import tokenize_corpus

        if kind == "lm-tokenizers":
            tok._batch_encoder = tok._hf_batch_encode
        if kind == "lm-cached":
            tokenize_corpus(sources, tok, cache_root=cache, threads=threads)
        started = time.perf_counter()
        corpus_ids = tokenize_corpus(sources, tok, cache_root=cache, threads=threads)
        seconds = time.perf_counter() - started
        assert corpus_ids.reused == (kind == "lm-cached")
        tokens = len(corpus_ids.tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "bytes": sources.total_bytes, "tokens": tokens, "peak_rss_mb": peak}


def measure(kind: str, corpus: Path, tokenizer_file: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lm-bench-encode-") as cache:
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--corpus", str(corpus),
                              "--tokenizer", str(tokenizer_file), "--threads", str(threads), "--cache", cache],
                             capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare/train"))
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--small-megabytes", type=int, default=50)
    parser.add_argument("--fallback-megabytes", type=int, default=10,
                        help="corpus size for the slow tokenizers-encoder row")
    parser.add_argument("--threads", type=str, default=str(len(os.sched_getaffinity(0))),
                        help="comma-separated thread counts to compare at")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lm" / "bench-encode")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ["LM_ENCODE_THREADS"] = args.threads
        print(json.dumps(worker(args.worker, args.corpus, args.tokenizer, int(args.threads), args.cache)))
        return

    console = Console()
    big = build_corpus(args.corpus, args.work, args.megabytes)
    small = build_corpus(args.corpus, args.work, args.small_megabytes)
    fallback = build_corpus(args.corpus, args.work, args.fallback_megabytes)
    tokenizer_file = args.work / "tokenizer.json"
    if not tokenizer_file.is_file():
        subprocess.run([str(Path(sys.executable).parent / "lm"), "train-tokenizer", str(args.corpus), "--vocab-size",
                        "8192", "--out", str(tokenizer_file), "--force"], check=True, capture_output=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    table = Table(title=f"Encoding {big.stat().st_size / 1e6:.0f} MB of Shakespeare, vocab 8192, on {cpu} "
                        f"({os.cpu_count()} cores), median of {args.rounds}", title_justify="left")
    for column in ("encoder", "threads", "MB/s", "MB/s per thread", "vs tiktoken", "peak RSS",
                   f"peak RSS at {args.small_megabytes} MB"):
        table.add_column(column, justify="right" if column != "encoder" else "left")
    for threads in (int(t) for t in args.threads.split(",")):
        runs: dict[str, list[dict]] = {"lm": [], "tiktoken": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(measure(kind, big, tokenizer_file, threads))
        assert {r["tokens"] for r in runs["lm"]} == {r["tokens"] for r in runs["tiktoken"]}, "different token counts"
        small_lm = measure("lm", small, tokenizer_file, threads)
        rate = {kind: median(r["bytes"] / r["seconds"] / 1e6 for r in rs) for kind, rs in runs.items()}
        for kind in ("lm", "tiktoken"):
            rss = median(r["peak_rss_mb"] for r in runs[kind])
            small_rss = f"{small_lm['peak_rss_mb']:.0f} MB" if kind == "lm" else ""
            table.add_row(kind, str(threads), f"{rate[kind]:.2f}", f"{rate[kind] / threads:.2f}",
                          f"{rate[kind] / rate['tiktoken']:.2f}x", f"{rss:.0f} MB", small_rss)
        slow = measure("lm-tokenizers", fallback, tokenizer_file, threads)
        slow_rate = slow["bytes"] / slow["seconds"] / 1e6
        table.add_row(f"lm, tokenizers encoder ({slow['bytes'] / 1e6:.0f} MB)", str(threads), f"{slow_rate:.2f}",
                      f"{slow_rate / threads:.2f}", f"{slow_rate / rate['tiktoken']:.2f}x",
                      f"{slow['peak_rss_mb']:.0f} MB", "")
    cached = measure("lm-cached", big, tokenizer_file, 1)
    console.print(table)
    console.print(f"Already cached: {cached['seconds']:.2f} s for the {cached['bytes'] / 1e6:.0f} MB (a hash of the "
                  f"text, {cached['bytes'] / cached['seconds'] / 1e6:.0f} MB/s; no encoding), "
                  f"peak RSS {cached['peak_rss_mb']:.0f} MB.")


if __name__ == "__main__":
    main()
