"""`lm eval`: score one or more runs on text of your choosing, as loss, perplexity and bits per byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lm.eval import RunScore


def command(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR...", show_default=False,
        help="Run directories (from `lm train` or `lm import`); several are compared, best first.")],
    text: Annotated[list[str], typer.Option(
        "--text", metavar="PATH", show_default=False,
        help="Text to score: files, folders or globs (repeat --text for several). Use text no run, nor its "
             "tokenizer, was trained on.")],
    output_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT", help="table | json.")] = "table",
    device: Annotated[str, typer.Option("--device", metavar="DEV", help="auto | cpu | cuda | mps.")] = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", metavar="TYPE", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs, fp32 on CPU).")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-B", metavar="N", help="Windows per forward pass.")] = 16,
    stride: Annotated[int | None, typer.Option(
        "--stride", metavar="S", show_default=False,
        help="How far each window moves on [default: half the model's context].")] = None,
    quantize: Annotated[str, typer.Option(
        "--quantize", metavar="KIND",
        help="none | int8: score the model with int8 linear layers, as `lm generate --quantize int8` runs it.")
    ] = "none",
    text_field: Annotated[str, typer.Option(
        "--text-field", metavar="NAME",
        help="JSON Lines and Parquet files: the field (column) that holds each record's text.")] = "text",
) -> None:
    """Score runs on a text: loss per token, perplexity and bits per byte, per file and in total.

    Each file is a document: the text is encoded as in training (<|endoftext|> before the first
    document and after each) and every token after the first is scored exactly once. Windows of
    the model's context length T move on by the stride S: the first scores all its T tokens, each
    later one only its last S, so every token after the first window sees at least T - S tokens of
    context. Bits per byte do not depend on the tokenizer, so runs with different vocabularies compare.
    """
    from lm.cli.render import stderr, stdout, task_progress
    from lm.config import DEVICES, DTYPES
    from lm.errors import UsageError
    from lm.eval import score_run
    from lm.textfiles import find_text_files

    if output_format not in ("table", "json"):
        raise UsageError(f"--format {output_format!r} is not one of: table, json")
    if device not in DEVICES or dtype not in DTYPES:
        bad, allowed = ("--device", DEVICES) if device not in DEVICES else ("--dtype", DTYPES)
        raise UsageError(f"{bad} {device if bad == '--device' else dtype!r} is not one of: {', '.join(allowed)}")
    sources = find_text_files(text, text_field=text_field)
    results = []
    for run in run_dirs:
        with task_progress(stderr()) as progress:
            encoding = progress.add_task(f"encoding for {run.name}", total=sources.total_bytes)
            scoring = progress.add_task(f"scoring {run.name}", total=None, visible=False)

            def scored(done: int, total: int, task: int = scoring) -> None:
                progress.update(task, completed=done, total=total, visible=True)

            results.append(score_run(
                run, sources, device=device, dtype=dtype, batch_size=batch_size, stride=stride, quantize=quantize,
                on_encode=lambda done, _total, task=encoding: progress.update(task, completed=done),
                on_progress=scored))
    if results and results[0].bad_records:
        stderr().print(f"Skipped {results[0].bad_records:,} bad record(s) (first: {results[0].first_bad_record})",
                       highlight=False)
    results.sort(key=lambda r: r.scores.total.bits_per_byte)
    if output_format == "json":
        stdout().print_json(json.dumps(_as_json(results)))
    else:
        _print_tables(results, stride)


def _score_fields(score) -> dict[str, float | int]:
    return {"tokens": score.tokens, "bytes": score.text_bytes, "loss": score.loss,
            "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte}


def _as_json(results: list[RunScore]) -> dict:
    return {"runs": [{
        "run": str(r.run), "parameters": r.parameters, "vocab_size": r.vocab_size,
        "context_length": r.context_length, "stride": r.scores.stride, "seconds": r.seconds,
        "tokens_per_s": r.tokens_per_s, "total": _score_fields(r.scores.total),
        "files": [{"path": str(path), **_score_fields(score)} for path, score in zip(r.files, r.scores.parts,
                                                                                    strict=True)],
    } for r in results]}


def _print_tables(results: list[RunScore], stride: int | None) -> None:
    from rich.table import Table

    from lm.cli.render import human_bytes, stdout

    first = results[0]
    files = len(first.files)
    title = (f"Scored on {files:,} file{'s' if files != 1 else ''}, {human_bytes(sum(first.file_bytes))}; "
             f"windows of each run's context moving by {f'{stride} tokens' if stride else 'half of it'}"
             + ("; best first" if len(results) > 1 else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("run", min_width=min(24, max(len(str(r.run)) for r in results)))
    for column in ("params", "vocab", "tokens", "loss", "ppl", "bits/byte", "tok/s"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        total = r.scores.total
        table.add_row(str(r.run), _short_count(r.parameters), f"{r.vocab_size:,}", f"{total.tokens:,}",
                      f"{total.loss:.4f}", _short_float(total.perplexity), f"[bold]{total.bits_per_byte:.4f}[/]",
                      f"{r.tokens_per_s:,.0f}")
    stdout().print(table)
    if files > 1:
        per_file = Table(title="bits per byte, per file", title_justify="left")
        per_file.add_column("file")
        per_file.add_column("bytes", justify="right")
        for r in results:
            per_file.add_column(r.run.name or str(r.run), justify="right")
        for index, path in enumerate(first.files):
            per_file.add_row(str(path), f"{first.file_bytes[index]:,}",
                             *(f"{r.scores.parts[index].bits_per_byte:.4f}" for r in results))
        stdout().print(per_file)


def _short_count(count: int) -> str:
    """12345678 -> '12.3M': parameter counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _short_float(value: float) -> str:
    return f"{value:,.2f}" if value < 1e5 else f"{value:.3g}"
