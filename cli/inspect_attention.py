"""`lm inspect-attention`: which token looks at which, per layer and head, drawn in the terminal."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import torch
    from rich.console import Console, RenderableType
    from rich.table import Table

    from lm.inspect import AttentionMaps, HeadStats, SharedToken
    from lm.model import GPT
    from lm.tokenizer import Tokenizer

FORMATS = ("table", "json", "csv")
ROW_LABEL_WIDTH = 16
CELL_WIDTH = 4
OUTPUT_WIDTH = 200  # columns of what --output writes to a file
VIEW = "View"
OUTPUT = "Output"


def text_and_format(text: str | None, text_file: Path | None, output_format: str, purpose: str) -> str:
    """The text an inspection command reads (--text, or --text-file's contents), its --format checked.
    `purpose` finishes "no text to ..." in the error for neither."""
    from lm.errors import UsageError

    if output_format not in FORMATS:
        raise UsageError(f"--format {output_format!r} is not one of: {', '.join(FORMATS)}")
    if text is not None and text_file is not None:
        raise UsageError("give --text or --text-file, not both")
    if text_file is not None:
        from lm.textfiles import read_text_option

        text = read_text_option(text_file, "--text-file")
    if not text:
        raise UsageError(f"no text to {purpose}; give --text TEXT or --text-file FILE")
    return text


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    text: Annotated[str | None, typer.Option(
        "--text", metavar="TEXT", show_default=False, help="The text to look at.")] = None,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", metavar="FILE", show_default=False, help="Read the text from a UTF-8 file.")] = None,
    compare: Annotated[str | None, typer.Option(
        "--compare", metavar="TEXT2", show_default=False,
        help="Show how the tokens TEXT and TEXT2 share attend differently in each.")] = None,
    layer: Annotated[str, typer.Option(
        "--layer", "-l", metavar="L", rich_help_panel=VIEW, help="A layer number, 'last' or 'all'.")] = "last",
    head: Annotated[str, typer.Option(
        "--head", metavar="H", rich_help_panel=VIEW, help="A head number, 'mean' (of all heads) or 'all'.")] = "mean",
    top: Annotated[int | None, typer.Option(
        "--top", metavar="K", rich_help_panel=VIEW, show_default=False,
        help="One line per token: the K earlier tokens it attends to most.")] = None,
    heads_summary: Annotated[bool, typer.Option(
        "--heads-summary", metavar="", rich_help_panel=VIEW,
        help="One table of every layer x head: entropy, previous-token, sink, self, induction, label.")] = False,
    rows: Annotated[str | None, typer.Option(
        "--range", metavar="START:END", rich_help_panel=VIEW, show_default=False,
        help="Draw the query tokens at positions START to END-1 [default: the last that fit].")] = None,
    output_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT", rich_help_panel=OUTPUT,
        help="table | json | csv (json and csv carry every weight).")] = "table",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", rich_help_panel=OUTPUT, show_default=False,
        help="Write to FILE instead of standard output.")] = None,
    save: Annotated[Path | None, typer.Option(
        "--save", metavar="FILE", rich_help_panel=OUTPUT, show_default=False,
        help="Also write FILE.html, an attention explorer page (head view, model view, gravity view) that "
             "opens offline in a browser, or FILE.svg, what is drawn here.")] = None,
) -> None:
    """Show attention patterns: which token looks at which, per layer and head.

    The default view is a heat table of one layer and head (the mean of the heads unless --head
    says otherwise): rows are the tokens doing the looking, columns the tokens looked at.
    """
    from lm import rundir
    from lm.atomic import prepare_output
    from lm.errors import UsageError

    text = text_and_format(text, text_file, output_format, "look at")
    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if compare is not None and not compare:
        raise UsageError("--compare needs a second text")
    if save is not None and save.suffix.lower() not in (".svg", ".html"):
        raise UsageError(f"--save {save} must end in .svg or .html")
    info = rundir.read_config(run_dir)
    layers = _layers(layer, info.model.n_layer)
    heads = _heads(head, info.model.n_head)
    span = _span(rows)
    for target in (output, save):
        if target is not None:
            prepare_output(target, overwrite=True, what="output")

    from lm.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir)
    page = save if save is not None and save.suffix.lower() == ".html" else None
    if page is not None:
        from lm.cli.page import write_page
        from lm.inspect import inspection_data

        # The page carries every layer and head (the model view shows them all); it opens on the chosen ones.
        everything = inspection_data(model, tokenizer, text, range(info.model.n_layer), list(range(info.model.n_head)),
                                     compare)
        view = "model" if len(layers) > 1 or len(heads) > 1 else "head"
        write_page(page, everything, layer=layers[-1], head=heads[0] if len(heads) == 1 else None, view=view)
    _terminal_view(model, tokenizer, text, layers, heads, span, top=top, heads_summary=heads_summary, compare=compare,
                   output_format=output_format, output=output, save=None if page is not None else save)
    if page is not None:
        from lm.cli.page import announce_page

        announce_page(page)


def _terminal_view(model: GPT, tokenizer: Tokenizer, text: str, layers: list[int], heads: list[int | None],
                   span: tuple[int, int | None] | None, *, top: int | None, heads_summary: bool, compare: str | None,
                   output_format: str, output: Path | None, save: Path | None) -> None:
    """What the options ask for, drawn in the terminal (or written to `output`)."""
    from lm.errors import InputError

    if output_format == "json":
        from lm.inspect import inspection_data, inspection_json

        _write(inspection_json(inspection_data(model, tokenizer, text, layers, heads, compare)) + "\n", output)
        return
    if heads_summary:
        from lm.inspect import heads_summary as summarise

        stats, maps = summarise(model, tokenizer, text)
        _notice_dropped(maps.dropped)
        _show([_summary_table(stats, len(maps.ids), _width(output))], output, save)
        return
    if compare is not None:
        from lm.inspect import compare_attention

        shared = compare_attention(model, tokenizer, text, compare, layers[-1], heads[0] if len(heads) == 1 else None)
        _show([_compare_table(shared, text, compare, layers[-1], heads)], output, save)
        return

    from lm.inspect import attention_maps

    maps = attention_maps(model, tokenizer, text, layers)
    _notice_dropped(maps.dropped)
    if output_format == "csv":
        _write(_csv(maps, heads), output)
        return
    if len(maps.ids) < 2:
        raise InputError("the text is a single token; attention needs at least two")
    if len(layers) > 1 or (len(heads) > 1 and heads[0] is not None):
        _show(_grid(maps, heads, _width(output)), output, save)
    elif top is not None:
        _show(_top_lines(maps, layers[0], heads[0], top), output, save)
    else:
        _show(_heat_table(maps, layers[0], heads[0], span, _width(output)), output, save)


# Parsing ------------------------------------------------------------------------------------------


def _layers(spec: str, count: int) -> list[int]:
    from lm.errors import UsageError

    if spec == "all":
        return list(range(count))
    if spec == "last":
        return [count - 1]
    if not spec.isdigit() or int(spec) >= count:
        raise UsageError(f"--layer {spec!r} does not exist: this model has layers 0 to {count - 1} "
                         "(or use 'last' or 'all')")
    return [int(spec)]


def _heads(spec: str, count: int) -> list[int | None]:
    from lm.errors import UsageError

    if spec == "all":
        return list(range(count))
    if spec == "mean":
        return [None]
    if not spec.isdigit() or int(spec) >= count:
        raise UsageError(f"--head {spec!r} does not exist: this model has heads 0 to {count - 1} "
                         "(or use 'mean' or 'all')")
    return [int(spec)]


def _span(spec: str | None) -> tuple[int, int | None] | None:
    from lm.errors import UsageError

    if spec is None:
        return None
    start, sep, end = spec.partition(":")
    try:
        span = (int(start) if start else 0, int(end) if end else None)
    except ValueError:
        span = None
    if not sep or span is None or span[0] < 0 or (span[1] is not None and span[1] <= span[0]):
        raise UsageError(f"--range {spec!r} should be START:END with 0 <= START < END, e.g. --range 0:20")
    return span


def _width(output: Path | None) -> int:
    """The terminal's width, or a generous one for a file."""
    from lm.cli.render import stdout

    return stdout().width if output is None else OUTPUT_WIDTH


def _notice_dropped(dropped: int) -> None:
    from lm.cli.render import stderr

    if dropped:
        stderr().print(f"note: the text is longer than the model's context; its first {dropped} tokens are "
                       "left out and the last window is shown")


# Output -------------------------------------------------------------------------------------------


def _show(renderables: list[RenderableType], output: Path | None, save: Path | None) -> None:
    """Print to the terminal (or `output` as plain text), and export to `save` if asked."""
    from rich.console import Console

    from lm.cli.render import stdout

    console: Console = stdout() if output is None else Console(file=io.StringIO(), width=OUTPUT_WIDTH, record=True)
    console.record = True
    for renderable in renderables:
        console.print(renderable)
    if output is not None:
        _write(console.export_text(clear=False), output)
    if save is not None:
        from lm.atomic import atomic_write_text

        exported = console.export_svg(title="lm inspect-attention") if save.suffix.lower() == ".svg" \
            else console.export_html()
        atomic_write_text(save, exported)


def _write(data: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(data)
        return
    from lm.atomic import atomic_write_text

    atomic_write_text(output, data)


def _visible(data: bytes) -> str:
    from lm.tokenizer import visible_text

    return visible_text(data)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _heat_style(weight: float) -> str:
    # From a dark blue (no attention) to amber (all of it), with text that stays readable on both.
    low, high = (22, 24, 48), (255, 176, 0)
    r, g, b = (round(lo + (hi - lo) * weight) for lo, hi in zip(low, high, strict=True))
    return f"{'black' if weight > 0.45 else 'grey85'} on rgb({r},{g},{b})"


def _cell(weight: float) -> str:
    return "1.0" if weight >= 0.995 else f".{round(weight * 100):02d}"


def _title(maps: AttentionMaps, layer: int, head: int | None) -> str:
    heads = "mean of all heads" if head is None else f"head {head}"
    return f"layer {layer}, {heads}: row = token looking, column = token looked at ({len(maps.ids)} tokens)"


def _heat_table(maps: AttentionMaps, layer: int, head: int | None, span: tuple[int, int | None] | None,
                width: int) -> list[RenderableType]:
    from rich.table import Table
    from rich.text import Text

    from lm.inspect import head_matrix

    matrix = head_matrix(maps, layer, head)
    count = len(maps.ids)
    fitting = max(1, (width - ROW_LABEL_WIDTH - 10) // (CELL_WIDTH + 1))
    end = count if span is None or span[1] is None else min(span[1], count)
    lo = max(0, end - fitting)
    start = lo if span is None else min(span[0], end - 1)
    table = Table(title=_title(maps, layer, head), title_justify="left", box=None, padding=(0, 1, 0, 0),
                  show_edge=False, pad_edge=False)
    table.add_column("", no_wrap=True, min_width=ROW_LABEL_WIDTH)
    if lo > 0:
        table.add_column(Text(f"<{lo}\nearlier", style="dim"), justify="right", no_wrap=True)
    for key in range(lo, end):
        label = Text(f"{key}\n{_clip(_visible(maps.tokens[key]), CELL_WIDTH)}")
        table.add_column(label, justify="right", no_wrap=True, min_width=CELL_WIDTH, max_width=CELL_WIDTH)
    for query in range(start, end):
        cells: list[Text] = [Text(_clip(f"{query:>3} {_visible(maps.tokens[query])}", ROW_LABEL_WIDTH))]
        if lo > 0:
            earlier = matrix[query, :lo].sum().item()
            cells.append(Text(_cell(earlier), style=_heat_style(earlier)))
        for key in range(lo, end):
            weight = matrix[query, key].item()
            cells.append(Text("") if key > query else Text(_cell(weight), style=_heat_style(weight)))
        table.add_row(*cells)
    notes = []
    if start > 0 or end < count:
        notes.append(f"rows {start} to {end - 1} of {count} shown (choose others with --range START:END)")
    if lo > 0:
        notes.append(f"keys before {lo} are summed in the 'earlier' column")
    return [table, *(Text(note, style="dim") for note in notes)]


def _top_lines(maps: AttentionMaps, layer: int, head: int | None, k: int) -> list[RenderableType]:
    from rich.text import Text

    from lm.inspect import head_matrix, top_attended

    what = "the token" if k == 1 else f"the {k} tokens"
    lines: list[RenderableType] = [Text(_title(maps, layer, head).split(":")[0] + f": {what} each token attends to "
                                        "most", style="bold")]
    for query, best in enumerate(top_attended(head_matrix(maps, layer, head), k)):
        line = Text(f"{query:>4} {_clip(_visible(maps.tokens[query]), 14):<14} → ")
        for key, weight in best:
            line.append(_visible(maps.tokens[key]), style=_heat_style(weight))
            line.append(f" @{key} {weight:.2f}   ", style="dim")
        lines.append(line)
    return lines


# A head's role in three lengths: the widest that fits the terminal is used.
ROLE_NAMES = {"previous-token": ("prev", "P"), "induction": ("ind", "I"), "sink": ("sink", "S"),
              "self": ("self", "D"), "broad": ("broad", "b"), "mixed": ("mixed", "m")}
ROLE_LEGEND = ("P previous-token (weight on the token before), I induction, S sink (weight on the first token), "
               "D self (on the token itself), b broad, m mixed: then the score, or for b and m the rows' entropy "
               "in bits")
GRID_LABEL_WIDTH = 6  # "layer" and its numbers


def _grid(maps: AttentionMaps, heads: list[int | None], width: int) -> list[RenderableType]:
    """What each head does, one row per layer and one column per head, in as many blocks of heads as it
    takes to fit `width` columns, with the role names as long as the width allows."""
    from rich.text import Text

    from lm.inspect import head_matrix, head_stats

    stats: dict[int, list[HeadStats]] = {}
    for layer in sorted(maps.weights):
        if heads == [None]:
            stats[layer] = head_stats(layer, head_matrix(maps, layer, None)[None])
        else:
            every = head_stats(layer, maps.weights[layer])
            stats[layer] = [every[head] for head in heads]  # type: ignore[index]
    cells = {form: [[_behaviour(s, form) for s in row] for row in stats.values()] for form in range(3)}
    for form in range(3):  # long, medium, short
        cell_width = max(len(cell) for row in cells[form] for cell in row)
        per_block = max(1, (width - GRID_LABEL_WIDTH) // (cell_width + 1))
        if per_block >= len(heads) or form == 2:
            break
    out: list[RenderableType] = [Text(
        "what each head does on this text: its dominant behaviour and score (for broad and mixed heads, the "
        "entropy of their rows in bits); rows are layers, columns heads", style="bold")]
    for start in range(0, len(heads), per_block):
        block = range(start, min(start + per_block, len(heads)))
        out.append(_grid_block(stats, cells[form], heads, block, cell_width))
    if form == 2:
        out.append(Text(ROLE_LEGEND, style="dim"))
    return out


def _grid_block(stats: dict[int, list[HeadStats]], cells: list[list[str]], heads: list[int | None],
                block: range, cell_width: int) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    table.add_column("layer", justify="right", width=GRID_LABEL_WIDTH - 1, no_wrap=True)
    for index in block:
        head = heads[index]
        table.add_column("mean" if head is None else f"h{head}", width=cell_width, no_wrap=True)
    for (layer, row), row_cells in zip(stats.items(), cells, strict=True):
        table.add_row(str(layer), *(Text(row_cells[i], style=_label_style(row[i].label)) for i in block))
    return table


def _behaviour(stats: HeadStats, form: int = 0) -> str:
    """`form` 0: 'previous-token 0.62', 1: 'prev .62', 2: 'P.62' (broad and mixed: entropy in bits)."""
    score = stats.scores().get(stats.label)
    if form == 0:
        return f"{stats.label} {score:.2f}" if score is not None else f"{stats.label} {stats.entropy:.1f}"
    name = ROLE_NAMES[stats.label][form - 1]
    if score is not None:
        return f"{name}{'' if form == 2 else ' '}{_cell(score)}"
    bits = f"{stats.entropy:.1f}" if stats.entropy < 9.95 else f"{stats.entropy:.0f}"
    return f"{name}{'' if form == 2 else ' '}{bits}"


def _label_style(label: str) -> str:
    return {"previous-token": "cyan", "induction": "magenta", "sink": "yellow", "self": "green"}.get(label, "")


def _summary_table(stats: list[HeadStats], tokens: int, width: int) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"every head on this text ({tokens} tokens); induction on a repeated random sequence",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    narrow = width < 100  # short headers and role names, so 80 columns hold a row
    headers = ("layer", "head", "bits" if narrow else "entropy (bits)", "prev" if narrow else "previous",
               "first" if narrow else "first (sink)", "self", "ind" if narrow else "induction", "label")
    for column in headers:
        table.add_column(column, justify="left" if column == "label" else "right", no_wrap=True)
    for s in stats:
        cells = [Text("-" if value is None else f"{value:.2f}", style=_label_style(name) if name == s.label else "")
                 for name, value in s.scores().items()]
        label = ROLE_NAMES[s.label][0] if narrow else s.label
        table.add_row(str(s.layer), str(s.head), f"{s.entropy:.2f}", *cells, Text(label, style=_label_style(s.label)))
    if narrow:
        table.caption = ("bits: entropy of the rows; prev: weight on the previous token; first: on the first "
                         "(a sink); self: on itself; ind: induction score")
        table.caption_justify = "left"
    return table


def _compare_table(shared: list[SharedToken], text_a: str, text_b: str, layer: int, heads: list[int | None]) -> Table:
    from rich.table import Table
    from rich.text import Text

    head = heads[0] if len(heads) == 1 else None
    which = "mean of all heads" if head is None else f"head {head}"
    table = Table(title=f"layer {layer}, {which}: what shared tokens attend to in each text", title_justify="left")
    table.add_column("token")
    table.add_column(Text(f"in A: {_clip(text_a, 30)}"))
    table.add_column(Text(f"in B: {_clip(text_b, 30)}"))
    table.add_column("difference", justify="right")

    def attended(items: list[tuple[bytes, float]]) -> Text:
        line = Text()
        for token, weight in items:
            line.append(_visible(token), style=_heat_style(weight))
            line.append(f" {weight:.2f}  ", style="dim")
        return line

    for item in sorted(shared, key=lambda s: s.difference, reverse=True):
        table.add_row(Text(_visible(item.token)), attended(item.top_a), attended(item.top_b), f"{item.difference:.2f}")
    return table


def _selected(maps: AttentionMaps, heads: list[int | None]) -> list[tuple[int, int | None, torch.Tensor]]:
    from lm.inspect import head_matrix

    return [(layer, head, head_matrix(maps, layer, head)) for layer in sorted(maps.weights) for head in heads]


def _csv(maps: AttentionMaps, heads: list[int | None]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "head", "query_position", "query_token", "key_position", "key_token", "weight"])
    for layer, head, matrix in _selected(maps, heads):
        rows = matrix.tolist()
        for query, row in enumerate(rows):
            for key in range(query + 1):
                writer.writerow([layer, "mean" if head is None else head, query, _visible(maps.tokens[query]), key,
                                 _visible(maps.tokens[key]), f"{row[key]:.6g}"])
    return buffer.getvalue()
