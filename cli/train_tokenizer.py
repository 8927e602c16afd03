"""`lm train-tokenizer`: learn a byte-level BPE vocabulary from text files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# The help's note on --vocab-size's default (lm.tokenizer.default_vocab_size), here and in `lm train`.
VOCAB_SIZE_DEFAULT = ("[default: sized to the text, one token per 500 bytes as a power of two within 512-8192: "
                      "2048 for 1 MB]")

if TYPE_CHECKING:
    from rich.table import Table

    from lm.tokenizer import TokenizerReport


def command(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH", show_default=False,
        help="Text files, folders (read recursively) or glob patterns.")],
    vocab_size: Annotated[int | None, typer.Option(
        "--vocab-size", metavar="N", show_default=False,
        help=f"Tokens in the vocabulary: 256 bytes + special tokens + learned merges {VOCAB_SIZE_DEFAULT}.")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="FILE",
        help="Where to write tokenizer.json.")] = Path("tokenizer.json"),
    special_token: Annotated[list[str] | None, typer.Option(
        "--special-token", metavar="TEXT", show_default=False,
        help="Another special token (repeatable); <|endoftext|> is always there.")] = None,
    min_frequency: Annotated[int, typer.Option(
        "--min-frequency", metavar="N",
        help="Learn a merge only for pairs seen at least this many times.")] = 2,
    force: Annotated[bool, typer.Option(
        "--force", "-f", metavar="",
        help="Overwrite --out if it exists.")] = False,
    text_field: Annotated[str, typer.Option(
        "--text-field", metavar="NAME",
        help="JSON Lines and Parquet files: the field (column) that holds each record's text.")] = "text",
) -> None:
    """Learn a byte-level BPE tokenizer from text files, JSON Lines, Parquet or gzip-compressed corpora.

    Uses the GPT-4 split pattern and writes a standard Hugging Face tokenizer.json.
    """
    from lm.atomic import prepare_output
    from lm.cli.render import byte_progress, stdout
    from lm.textfiles import find_text_files, text_bytes
    from lm.tokenizer import TokenizerConfig, default_vocab_size, train_tokenizer

    prepare_output(out, overwrite=force, what="tokenizer")
    sources = find_text_files(paths, exclude=[out], text_field=text_field)  # never our own earlier output
    config = TokenizerConfig(vocab_size=default_vocab_size(text_bytes(sources)) if vocab_size is None else vocab_size,
                             min_frequency=min_frequency, special_tokens=tuple(special_token or ()))
    with byte_progress() as progress:
        task = progress.add_task("reading", total=sources.total_bytes)

        def on_progress(bytes_read: int, reading_done: bool) -> None:
            progress.update(task, completed=bytes_read,
                            description="learning merges" if reading_done else "reading")

        tokenizer, report = train_tokenizer(sources, config, on_progress)
    tokenizer.save(out, overwrite=force)
    stdout().print(_summary(report, out))


def _summary(report: TokenizerReport, out: Path) -> Table:
    from rich.table import Table
    from rich.text import Text

    from lm.cli.render import human_bytes
    from lm.tokenizer import BYTE_ALPHABET_SIZE, HELD_OUT_EVERY, visible_text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("tokenizer", Text(str(out)))
    vocab = (f"{report.vocab_size:,} tokens ({BYTE_ALPHABET_SIZE} bytes + {report.special_tokens} special "
             f"+ {report.merges:,} merges)")
    if report.vocab_shortfall:
        vocab += (f"; {report.vocab_size_requested:,} asked, but no pair of tokens is left that occurs "
                  f"{report.min_frequency}+ times: give more text or a lower --min-frequency")
    grid.add_row("vocabulary", vocab)
    input_line = f"{report.files:,} file{'s' if report.files != 1 else ''}, {human_bytes(report.input_bytes)}"
    if report.skipped:
        path, why = report.skipped[0]
        input_line += f" (skipped {len(report.skipped)} that are not text, e.g. {path} {why})"
    grid.add_row("input", Text(input_line))
    if report.bad_records:
        grid.add_row("skipped", Text(f"{report.bad_records:,} bad record{'s' if report.bad_records != 1 else ''} "
                                     f"(first: {report.first_bad_record})"))
    speed = report.input_bytes / report.seconds if report.seconds > 0 else 0.0
    grid.add_row("time", f"{report.seconds:.2f} s ({human_bytes(speed)}/s)")
    where = (f"a held-out sample (every {HELD_OUT_EVERY}th line, not trained on)" if report.sample_is_held_out
             else "training text (too few lines to hold any out)")
    grid.add_row("bytes/token", f"{report.bytes_per_token:.2f} on {human_bytes(report.sample_bytes)} of {where}")
    grid.add_row("longest tokens", Text("  ".join(visible_text(b) for b in report.longest_tokens)))
    return grid
