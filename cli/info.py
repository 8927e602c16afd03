"""`lm info`: what a run directory holds (configuration, size, checkpoint, metrics) and its learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.table import Table

    from lm.cli.plot import Chart
    from lm.rundir import LearningCurves


def command(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR...", show_default=False, help="One or more run directories written by `lm train`.")],
    plot: Annotated[bool, typer.Option(
        "--plot", help="Draw validation bits per byte and training loss against time and tokens seen, every run "
                       "overlaid; for runs trained with --track-heads also the best previous-token and induction "
                       "scores and the in-context score against steps.")] = False,
    save: Annotated[Path | None, typer.Option(
        "--save", metavar="FILE.svg", show_default=False, help="Write the same charts to FILE.svg.")] = None,
) -> None:
    """Show a run's configuration, parameter count, checkpoint and metrics, or plot its learning curves.

    Reads metrics.jsonl as it stands, so it works on a run that is still training.
    """
    from lm import rundir
    from lm.cli.render import stdout
    from lm.errors import UsageError

    if save is not None and save.suffix.lower() != ".svg":
        raise UsageError(f"--save {save} must end in .svg")
    names = _names(run_dirs)
    curves = [rundir.learning_curves(path, name) for path, name in zip(run_dirs, names, strict=True)]
    if save is not None:
        from lm.atomic import atomic_write_text, prepare_output
        from lm.cli.plot import svg_charts

        prepare_output(save, overwrite=True, what="--save")
        atomic_write_text(save, svg_charts(_charts(curves), names))
    if plot:
        _draw(curves, stdout().width)
    elif save is None:
        for index, path in enumerate(run_dirs):
            if index:
                stdout().rule()
            _facts(path)
    if save is not None:
        from lm.cli.render import stderr

        stderr().print(f"wrote {save}", soft_wrap=True)


def _names(paths: list[Path]) -> list[str]:
    """Each run's folder name, or the path as given where two folders share a name."""
    short = [path.name or str(path) for path in paths]
    return [name if short.count(name) == 1 else str(path) for name, path in zip(short, paths, strict=True)]


def _charts(curves: list[LearningCurves]) -> list[Chart]:
    from lm.cli.plot import Chart, Series, count, duration

    def chart(title: str, x_label: str, x: str, y: str, x_format: Callable[[float], str]) -> Chart:
        return Chart(title, x_label, [Series(c.name, getattr(c, x), getattr(c, y)) for c in curves], x_format)

    charts = [chart("validation bits per byte", "wall-clock time", "val_time_s", "val_bpb", duration),
              chart("validation bits per byte", "tokens seen", "val_tokens", "val_bpb", count),
              chart("training loss (nats per token)", "wall-clock time", "time_s", "loss", duration),
              chart("training loss (nats per token)", "tokens seen", "tokens", "loss", count)]
    if any(c.head_steps for c in curves):  # --track-heads: how the circuits form, against steps
        charts += [chart("best previous-token score (max over heads)", "steps", "head_steps", "previous_token", count),
                   chart("best induction score (max over heads)", "steps", "head_steps", "induction", count),
                   chart("in-context score (nats: late minus early loss)", "steps", "head_steps", "in_context",
                         count)]
    return charts


def _draw(curves: list[LearningCurves], width: int) -> None:
    """The charts two abreast when the terminal is wide enough, else one under another."""
    from rich.table import Table
    from rich.text import Text

    from lm.cli.plot import braille_chart, legend
    from lm.cli.render import stdout

    charts = [chart for chart in _charts(curves) if not chart.empty]
    if not charts:
        stdout().print("nothing logged yet: metrics.jsonl has no training steps")
        return
    missing = [c.name for c in curves if not c.val_bpb]
    abreast = width >= 120 and len(charts) > 1
    chart_width = (width - 2) // 2 if abreast else width
    drawn = [braille_chart(chart, chart_width, height=12 if abreast else 10) for chart in charts]
    if abreast:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        for left in range(0, len(drawn), 2):
            grid.add_row(drawn[left], drawn[left + 1] if left + 1 < len(drawn) else Text())
        stdout().print(grid)
    else:
        for item in drawn:
            stdout().print(item, no_wrap=True, overflow="crop")
    stdout().print(legend([c.name for c in curves]))
    if missing:
        stdout().print(f"not evaluated yet: {', '.join(missing)}", style="dim")


def _facts(run_dir: Path) -> None:
    from rich.columns import Columns
    from rich.table import Table

    from lm import rundir
    from lm.cli.render import human_bytes, stdout
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
    origin = info.extra.get("init_from")
    if origin:
        step = f" at step {origin['step']:,}" if origin.get("step") is not None else ""
        imported = f" (imported from {origin['imported_from']})" if origin.get("imported_from") else ""
        facts.add_row("started from", f"{origin['run']}{step}{imported}")
    validation = info.extra.get("validation")
    if validation:
        what = ("the --val files" if "paths" in validation
                else f"the last {validation['fraction']:.0%} of the text, set aside before tokenizing")
        facts.add_row("validation", f"{what}: {validation['files']:,} files, "
                                    f"{human_bytes(validation['text_bytes'])}, {validation['tokens']:,} tokens; "
                                    f"tokenizer {validation['tokenizer']}")
    if metrics:
        last = metrics[-1]
        if "loss" in last:  # a run started with --init-from logs step 0 with validation figures only
            facts.add_row("last step", f"{last['step']:,}: loss {last['loss']:.3f}, "
                                       f"{last['tokens_per_s']:,.0f} tok/s, {last['time_s']:,.0f} s")

    stdout().print(facts)
    tables = [_config_table("model", to_dict(info.model)), _config_table("training", to_dict(info.train))]
    stdout().print(Columns(tables))
    evaluations = [m for m in metrics if "val_loss" in m]
    if evaluations:
        table = Table(title="evaluations", title_justify="left")
        for column in ("step", "time (s)", "train loss", "val loss", "val bits/byte"):
            table.add_column(column, justify="right")
        for m in evaluations:
            train_loss = f"{m['loss']:.3f}" if "loss" in m else "-"
            table.add_row(f"{m['step']:,}", f"{m['time_s']:,.0f}", train_loss, f"{m['val_loss']:.3f}",
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
