"""`lm info`: what a run directory holds: its configuration, size, checkpoint and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
) -> None:
    """Show a run's configuration, parameter count, checkpoint and metrics."""
    from rich.columns import Columns
    from rich.table import Table

    from cli.render import human_bytes, stdout
    from lm import rundir
    from lm.config import to_dict

    info = rundir.read_config(run_dir)
    latest = rundir.latest_checkpoint(run_dir)
    metrics = rundir.read_metrics(run_dir)
    corpus = info.extra.get("corpus", {})

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("run", str(run_dir))
    facts.add_row("parameters", f"{info.extra.get('parameters', 0):,}")
    step = latest.name.removeprefix("step-").lstrip("0") or "0" if latest else "none yet"
    facts.add_row("checkpoint", f"step {step} of {info.train.max_steps:,}" if latest else step)
    if corpus:
        facts.add_row("corpus", f"{corpus.get('files', 0):,} files, {human_bytes(corpus.get('text_bytes', 0))}, "
                                f"{corpus.get('tokens', 0):,} tokens")
    validation = info.extra.get("validation")
    if validation:
        what = ("the --val files" if "paths" in validation
                else f"the last {validation['fraction']:.0%} of the text, set aside before tokenizing")
        facts.add_row("validation", f"{what}: {validation['files']:,} files, "
                                    f"{human_bytes(validation['text_bytes'])}, {validation['tokens']:,} tokens; "
                                    f"tokenizer {validation['tokenizer']}")
    if metrics:
        last = metrics[-1]
        facts.add_row("last step", f"{last['step']:,}: loss {last['loss']:.3f}, {last['tokens_per_s']:,.0f} tok/s, "
                                   f"{last['time_s']:,.0f} s")

    stdout().print(facts)
    tables = [_config_table("model", to_dict(info.model)), _config_table("training", to_dict(info.train))]
    stdout().print(Columns(tables))
    evaluations = [m for m in metrics if "val_loss" in m]
    if evaluations:
        table = Table(title="evaluations", title_justify="left")
        for column in ("step", "time (s)", "train loss", "val loss", "val bits/byte"):
            table.add_column(column, justify="right")
        for m in evaluations:
            table.add_row(f"{m['step']:,}", f"{m['time_s']:,.0f}", f"{m['loss']:.3f}", f"{m['val_loss']:.3f}",
                          f"{m['val_bpb']:.3f}")
        stdout().print(table)


def _config_table(title: str, values: dict) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in values.items():
        table.add_row(key, str(value))
    return table
