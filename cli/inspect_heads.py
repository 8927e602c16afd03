"""`lm inspect-heads`: which heads matter (ablation, detectors, direct logit attribution), in the terminal."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lm.cli.inspect_attention import text_and_format

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from lm.heads import Ablation, Attribution, Detectors, HeadAblation, Patching
    from lm.tokenizer import Tokenizer

CELL_WIDTH = 5  # "+0.12": 12 heads and the layer label fit 80 columns
LABEL_WIDTH = 4
BAR_WIDTH = 30
ATTRIBUTION_ROWS = 16
ABLATION = "Ablation"
ATTRIBUTION = "Attribution"
PATCHING = "Patching"
PATCH_CELL = 3  # a recovered share in percent: "100", " 42", "-17"; 19 positions fit 80 columns
PAGE_WIDTH = 80
OUTPUT = "Output"
INDUCTION = "induction"  # --ablate induction: the head the induction detector scores highest


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    text: Annotated[str | None, typer.Option(
        "--text", metavar="TEXT", show_default=False, help="The text to test the heads on.")] = None,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", "--file", metavar="FILE", show_default=False, help="Read the text from a UTF-8 file.")] = None,
    ablation: Annotated[str, typer.Option(
        "--ablation", metavar="MODE", rich_help_panel=ABLATION,
        help="mean: a head's output is replaced by its mean over the text's positions; zero: by zeros.")] = "mean",
    ablate: Annotated[str | None, typer.Option(
        "--ablate", metavar="HEADS", rich_help_panel=ABLATION, show_default=False,
        help="Also ablate these heads together, LAYER.HEAD separated by commas (e.g. 1.3,2.0): their joint "
             "effect. `induction`: the head with the highest induction score.")] = None,
    top: Annotated[int, typer.Option(
        "--top", metavar="N", rich_help_panel=ABLATION,
        help="List the N heads that matter most, each with the tokens it helps most.")] = 5,
    position: Annotated[int | None, typer.Option(
        "--position", metavar="P", rich_help_panel=ATTRIBUTION, show_default=False,
        help="The position whose next-token logit is attributed [default: the last; negative counts from "
             "the end].")] = None,
    target: Annotated[str | None, typer.Option(
        "--target", metavar="TOKEN", rich_help_panel=ATTRIBUTION, show_default=False,
        help="Attribute this token's logit [default: the predicted token]; with --compare, patch the logit "
             "difference this token - --versus [default: the text's predicted token].")] = None,
    versus: Annotated[str | None, typer.Option(
        "--versus", metavar="TOKEN", rich_help_panel=ATTRIBUTION, show_default=False,
        help="Attribute the logit difference target - TOKEN; with --compare [default: the --compare text's "
             "predicted token].")] = None,
    compare: Annotated[str | None, typer.Option(
        "--compare", metavar="TEXT", rich_help_panel=PATCHING, show_default=False,
        help="Activation patching: run this corrupt text (as many tokens as --text) with each layer x position "
             "of the residual stream, then each head's output, taken from --text's run, and show the share of "
             "the logit difference --target - --versus at the last position that comes back. In the table "
             "and JSON output, not the CSV.")] = None,
    output_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT", rich_help_panel=OUTPUT, help="table | json | csv.")] = "table",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", rich_help_panel=OUTPUT, show_default=False,
        help="Write to FILE instead of standard output.")] = None,
    save: Annotated[Path | None, typer.Option(
        "--save", metavar="FILE.html", rich_help_panel=OUTPUT, show_default=False,
        help="Also write the attention explorer page (as `lm inspect-attention --save`) with these results in "
             "it: the ablation heat map (click a head for the tokens it helps most), the detector scores in the "
             "model view and the attribution bars. One file that opens offline in a browser.")] = None,
) -> None:
    """Which attention heads matter: ablate each head and measure the loss, score heads with
    TransformerLens's detectors, and attribute one prediction's logit to every part of the model.

    Ablation: each head's output is replaced (mean or zero) and the change in the mean loss per predicted
    token is shown as a layer x head table, in nats (and bits per byte in the lists and JSON). A positive
    change means the model predicts the text worse without the head: the head helps. A negative change
    means the model does better without it: on this text the head hurts.

    Detectors (share of a head's attention on a pattern, 0 to 1): previous-token and duplicate-token on
    the text; induction on 50 random tokens repeated twice (seed 0; fewer tokens in a short context).

    Attribution: the logit of the predicted token (or --target, minus --versus) at the last position (or
    --position), split into token embedding, position embedding, every head, every MLP and the biases,
    through the final norm with its scale frozen; the parts sum to the logit.

    Patching (with --compare CORRUPT): (patched - corrupt) / (clean - corrupt) of the logit difference, for
    each layer x position of the residual stream and each layer x head. Not in the CSV.

    --save FILE.html: all of it in the attention explorer page, beside the attention patterns.
    """
    from lm.errors import UsageError

    text = text_and_format(text, text_file, output_format, "test the heads on")
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if compare is not None and not compare:
        raise UsageError("--compare is empty; give the corrupt text to patch into")
    from lm.heads import ABLATIONS

    if ablation not in ABLATIONS:
        raise UsageError(f"--ablation {ablation!r} is not one of: {', '.join(ABLATIONS)}")
    if save is not None and save.suffix.lower() != ".html":
        raise UsageError(f"--save {save} must end in .html (the explorer page; --output writes the terminal's text)")
    for path in (output, save):
        if path is not None:
            from lm.atomic import prepare_output

            prepare_output(path, overwrite=True, what="output")

    from lm.checkpoint import load_run
    from lm.heads import ablate_heads, attribute_logit, detect_heads, parse_heads, patch_activations

    model, tokenizer, _ = load_run(run_dir)
    model.eval()
    joint = parse_heads(ablate, model) if ablate is not None and ablate.strip() != INDUCTION else None
    target_id = _token_id(tokenizer, target, "--target")
    versus_id = _token_id(tokenizer, versus, "--versus")
    detectors = detect_heads(model, tokenizer, text)
    if ablate is not None and joint is None:
        joint = [_best_induction_head(detectors)]
    result = ablate_heads(model, tokenizer, text, ablation, joint)
    attribution = attribute_logit(model, tokenizer, text, position, target_id, versus_id)
    patching = None if compare is None else patch_activations(model, tokenizer, text, compare, target_id, versus_id)
    data = _json(text, result, detectors, attribution, tokenizer, top)
    data["patching"] = None if patching is None else _patching_json(compare, patching, tokenizer)
    if save is not None:
        from lm.cli.page import write_page
        from lm.heads import most_important
        from lm.inspect import inspection_data

        # The attention page of every layer and head (and of the --compare text), with this document added;
        # it opens on the head-effects view at the head that matters most.
        page = inspection_data(model, tokenizer, text, range(model.config.n_layer), list(range(model.config.n_head)),
                               compare)
        page["inspect_heads"] = data
        first = most_important(result, 1)[0]
        write_page(save, page, layer=first.layer, head=first.head, view="effects")
    if output_format == "json":
        _write(json.dumps(data, ensure_ascii=False) + "\n", output)
    elif output_format == "csv":
        _write(_csv(result, detectors, attribution), output)
    else:
        shown = _terminal(result, detectors, attribution, tokenizer, top)
        if patching is not None:
            shown += _patching(patching, tokenizer)
        _show(shown, output)
    if save is not None:
        from lm.cli.page import announce_page

        announce_page(save)


def _best_induction_head(detectors: Detectors) -> tuple[int, int]:
    """--ablate induction: the (layer, head) with the highest induction score."""
    _, layer, head = max((score, layer, head) for layer, row in enumerate(detectors.induction)
                         for head, score in enumerate(row))
    return layer, head


def _token_id(tokenizer: Tokenizer, word: str | None, option: str) -> int | None:
    from lm.errors import UsageError
    from lm.inspect import resolve_token

    if word is None:
        return None
    ids = resolve_token(tokenizer, word)
    if len(ids) != 1:
        pieces = ", ".join(repr(tokenizer.decode([i])) for i in ids)
        raise UsageError(f"{option} {word!r} is not one token in this vocabulary (it is {pieces}); give one of them")
    return ids[0]


# Terminal -----------------------------------------------------------------------------------------


def _visible(data: bytes) -> str:
    from lm.tokenizer import visible_text

    return visible_text(data)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _signed(value: float) -> str:
    """A change in CELL_WIDTH characters: +0.12, +12.3, +123."""
    for digits in (2, 1, 0):
        cell = f"{value:+.{digits}f}"
        if len(cell) <= CELL_WIDTH:
            return cell
    return "+big" if value > 0 else "-big"


def _change_style(value: float, largest: float) -> str:
    # Red where removing the head hurts the prediction, blue where it helps; stronger for larger changes.
    share = min(1.0, abs(value) / largest) if largest > 0 else 0.0
    level = round(40 + 180 * share)
    colour = f"rgb({level},40,40)" if value > 0 else f"rgb(40,60,{level})"
    return f"{'white' if share > 0.3 else 'grey85'} on {colour}"


def _score_style(score: float) -> str:
    low, high = (22, 24, 48), (255, 176, 0)
    r, g, b = (round(lo + (hi - lo) * min(1.0, max(0.0, score))) for lo, hi in zip(low, high, strict=True))
    return f"{'black' if score > 0.45 else 'grey85'} on rgb({r},{g},{b})"


def _grid(title: str, values: list[list[float]], cell: Any, style: Any) -> list[Text]:
    """One line per layer, one CELL_WIDTH cell per head: 12 heads fit 80 columns."""
    from rich.text import Text

    heads = len(values[0])
    header = Text(" " * LABEL_WIDTH)
    for head in range(heads):
        header.append(" " + f"h{head}".rjust(CELL_WIDTH))
    lines = [Text(title, style="bold"), header]
    for layer, row in enumerate(values):
        line = Text(f"L{layer}".ljust(LABEL_WIDTH))
        for value in row:
            line.append(" ")
            line.append(cell(value).rjust(CELL_WIDTH), style=style(value))
        lines.append(line)
    return lines


def _terminal(result: Ablation, detectors: Detectors, attribution: Attribution, tokenizer: Tokenizer,
              top: int) -> list[RenderableType]:
    from rich.text import Text

    changes = [[head.nats for head in layer] for layer in result.heads]
    largest = max(abs(value) for row in changes for value in row)
    # An untrained or redundant model's changes are small: shown in thousandths of a nat, not as +0.00.
    unit, factor = ("millinats", 1000.0) if largest < 0.1 else ("nats", 1.0)
    out: list[RenderableType] = []
    if result.dropped:
        out.append(Text(f"note: the text is longer than the context; its first {result.dropped} tokens are left "
                        "out", style="dim"))
    out.append(Text(f"{len(result.ids)} tokens; mean loss {result.loss:.4f} nats per predicted token "
                    f"({result.bits_per_byte:.4f} bits per byte)"))
    out += _grid(f"loss change per token ({unit}), each head {result.mode}-ablated; +: the head helps",
                 [[value * factor for value in row] for row in changes], _signed,
                 lambda value: _change_style(value, largest * factor))
    out.append(Text(""))
    out += _top_heads(result, top)
    if result.joint is not None:
        out.append(_joint_line(result))
    out += [Text(""), Text("head detectors (TransformerLens's): share of each head's attention on a pattern",
                           style="bold")]
    for name, title in (("previous_token", "previous-token score"), ("duplicate_token", "duplicate-token score"),
                        ("induction", f"induction score ({detectors.induction_length} random tokens twice, seed "
                                      f"{detectors.induction_seed}; a perfect head: "
                                      f"{detectors.induction_perfect:.2f})")):
        out.append(Text(""))
        out += _grid(title, getattr(detectors, name), lambda value: f"{value:.2f}", _score_style)
    out.append(Text(""))
    out += _bars(attribution, result, tokenizer)
    return out


def _helped(result: Ablation, head: HeadAblation) -> str:
    return ", ".join(f"{_visible(result.tokens[e.position])!r} @{e.position} +{e.increase:.2f}" for e in head.helped)


def _top_heads(result: Ablation, top: int) -> list[Text]:
    from rich.text import Text

    from lm.heads import most_important

    lines = [Text(f"the {top} heads that matter most; below each, the tokens it helps predict most",
                  style="bold"), Text("(the token, its position, its loss rise in nats when the head is ablated)",
                                      style="dim")]
    for head in most_important(result, top):
        lines.append(Text(f"  L{head.layer}.H{head.head}  {head.nats:+.4f} nats  {head.bits_per_byte:+.4f} bits/byte"))
        if head.helped:
            lines.append(Text(f"      {_helped(result, head)}", style="dim"))
    return lines


def _joint_line(result: Ablation) -> Text:
    from rich.text import Text

    assert result.joint is not None
    names = " + ".join(f"L{layer}.H{head}" for layer, head in result.joint_heads)
    change = f"{result.joint.nats:+.4f} nats ({result.joint.bits_per_byte:+.4f} bits per byte)"
    if len(set(result.joint_heads)) == 1:
        return Text(f"{names} ablated: {change}", style="bold")
    alone = sum(result.heads[layer][head].nats for layer, head in set(result.joint_heads))
    return Text(f"{names} ablated together: {change}; one at a time they sum to {alone:+.4f}", style="bold")


def _bars(attribution: Attribution, result: Ablation, tokenizer: Tokenizer) -> list[Text]:
    from rich.text import Text

    what = repr(tokenizer.decode([attribution.target]))
    if attribution.versus is not None:
        what += f" minus that of {tokenizer.decode([attribution.versus])!r}"
    context = _clip("".join(_visible(t) for t in result.tokens[max(0, attribution.position - 5):
                                                              attribution.position + 1]), 30)
    total = sum(part.contribution for part in attribution.parts)
    lines = [Text(f"direct logit attribution: the logit of {what} after position {attribution.position} "
                  f"(…{context})", style="bold"),
             Text(f"is {attribution.logit:.4f}; its {len(attribution.parts)} parts sum to {total:.4f}")]
    parts = sorted(attribution.parts, key=lambda part: abs(part.contribution), reverse=True)
    shown, rest = parts[:ATTRIBUTION_ROWS], parts[ATTRIBUTION_ROWS:]
    largest = max((abs(part.contribution) for part in shown), default=0.0) or 1.0
    for part in shown:
        length = max(1 if part.contribution else 0, round(abs(part.contribution) / largest * BAR_WIDTH))
        line = Text(f"  {_clip(part.name, 20):<20} {part.contribution:+9.4f} ")
        line.append("█" * length, style="green" if part.contribution > 0 else "red")
        lines.append(line)
    if rest:
        lines.append(Text(f"  {len(rest)} smaller parts: {sum(p.contribution for p in rest):+.4f} together",
                          style="dim"))
    return lines


def _patch_cell(share: float) -> str:
    """A recovered share in percent, PATCH_CELL characters."""
    percent = round(share * 100)
    if percent > 999:
        return "+++"
    if percent < -99:
        return "---"
    return str(percent)


def _patching(patching: Patching, tokenizer: Tokenizer) -> list[Text]:
    """The layer x position table, in pages of the positions that fit PAGE_WIDTH, then the layer x head grid."""
    from rich.text import Text

    def style(share: float) -> str:
        return _change_style(share, 1.0)

    target, versus = tokenizer.decode([patching.target]), tokenizer.decode([patching.versus])
    lines = [Text(""), Text(f"activation patching: logit {target!r} - {versus!r} at the last position",
                            style="bold"),
             Text(f"is {patching.clean_diff:.4f} after the text, {patching.corrupt_diff:.4f} after --compare"),
             Text("each cell: the % of the change that comes back when the --compare run", style="dim"),
             Text("takes that activation from the text's run (100: all of it)", style="dim"),
             Text("residual stream, layer x position (Ln: entering block n; out: after the", style="bold"),
             Text("last block); under each token, the --compare token where they differ", style="bold")]
    time = len(patching.tokens)
    per_page = (PAGE_WIDTH - LABEL_WIDTH) // (PATCH_CELL + 1)
    labels = [f"L{layer}" for layer in range(len(patching.residual) - 1)] + ["out"]
    for start in range(0, time, per_page):
        columns = range(start, min(time, start + per_page))
        clean_line, corrupt_line = Text(f"{start}".ljust(LABEL_WIDTH), style="dim"), Text(" " * LABEL_WIDTH)
        for p in columns:
            clean_line.append(" " + _clip(_visible(patching.tokens[p]), PATCH_CELL).rjust(PATCH_CELL))
            other = patching.compare_tokens[p]
            shown = _clip(_visible(other), PATCH_CELL) if other != patching.tokens[p] else ""
            corrupt_line.append(" " + shown.rjust(PATCH_CELL), style="yellow")
        lines += [Text(""), clean_line, corrupt_line]
        for label, row in zip(labels, patching.residual, strict=True):
            line = Text(label.ljust(LABEL_WIDTH))
            for p in columns:
                line.append(" ")
                line.append(_patch_cell(row[p]).rjust(PATCH_CELL), style=style(row[p]))
            lines.append(line)
    lines.append(Text(""))
    lines += _grid("each head's output (all positions), layer x head, share recovered", patching.heads,
                   lambda share: f"{share:+.2f}" if abs(share) < 10 else _signed(share), style)
    return lines


def _show(renderables: list[RenderableType], output: Path | None) -> None:
    from rich.console import Console

    from lm.cli.render import stdout

    console = stdout() if output is None else Console(file=io.StringIO(), width=200, record=True)
    for renderable in renderables:
        console.print(renderable)
    if output is not None:
        _write(console.export_text(), output)


def _write(data: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(data)
        return
    from lm.atomic import atomic_write_text

    atomic_write_text(output, data)


# JSON and CSV -------------------------------------------------------------------------------------


def _json(text: str, result: Ablation, detectors: Detectors, attribution: Attribution, tokenizer: Tokenizer,
          top: int) -> dict[str, Any]:
    from dataclasses import asdict

    from lm.heads import most_important

    def head_entry(head: HeadAblation) -> dict[str, Any]:
        return {"layer": head.layer, "head": head.head, "nats": head.nats, "bits_per_byte": head.bits_per_byte,
                "helped": [{"position": e.position, "token": _visible(result.tokens[e.position]),
                            "increase_nats": e.increase} for e in head.helped]}

    joint = None
    if result.joint is not None:
        joint = {**head_entry(result.joint), "heads": [list(pair) for pair in result.joint_heads]}
        del joint["layer"], joint["head"]
    return {
        "text": text,
        "dropped_tokens": result.dropped,
        "tokens": [_visible(token) for token in result.tokens],
        "loss": {"nats": result.loss, "bits_per_byte": result.bits_per_byte},
        "ablation_mode": result.mode,
        # Per layer, each head's change in mean loss per predicted token, in nats (positive: the head helps).
        "ablation": [[head.nats for head in layer] for layer in result.heads],
        "ablation_bits_per_byte": [[head.bits_per_byte for head in layer] for layer in result.heads],
        # Per layer, per head: the tokens whose loss its ablation raises most (as in top_heads), most first.
        "ablation_helped": [[head_entry(head)["helped"] for head in layer] for layer in result.heads],
        "top_heads": [head_entry(head) for head in most_important(result, top)],
        "joint": joint,
        "detectors": asdict(detectors),
        "attribution": {
            "position": attribution.position, "target": attribution.target,
            "target_token": tokenizer.decode([attribution.target]), "versus": attribution.versus,
            "versus_token": None if attribution.versus is None else tokenizer.decode([attribution.versus]),
            "logit": attribution.logit,
            "parts": [{"name": part.name, "contribution": part.contribution} for part in attribution.parts],
        },
    }


def _patching_json(compare: str | None, patching: Patching, tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "compare": compare,
        "compare_tokens": [_visible(token) for token in patching.compare_tokens],
        "target": patching.target, "target_token": tokenizer.decode([patching.target]),
        "versus": patching.versus, "versus_token": tokenizer.decode([patching.versus]),
        "clean_diff": patching.clean_diff, "corrupt_diff": patching.corrupt_diff,
        # (patched - corrupt) / (clean - corrupt): per layer (the input of each block, then the final
        # stream) per position, and per layer per head.
        "residual": patching.residual,
        "heads": patching.heads,
    }


def _csv(result: Ablation, detectors: Detectors, attribution: Attribution) -> str:
    """One row per head: its ablation effect, detector scores and direct logit attribution."""
    direct = {part.name: part.contribution for part in attribution.parts}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "head", "loss_change_nats", "loss_change_bits_per_byte", "previous_token",
                     "duplicate_token", "induction", "direct_logit"])
    for layer, row in enumerate(result.heads):
        for head in row:
            writer.writerow([layer, head.head, f"{head.nats:.6g}", f"{head.bits_per_byte:.6g}",
                             f"{detectors.previous_token[layer][head.head]:.6g}",
                             f"{detectors.duplicate_token[layer][head.head]:.6g}",
                             f"{detectors.induction[layer][head.head]:.6g}",
                             f"{direct[f'L{layer}.H{head.head}']:.6g}"])
    return buffer.getvalue()
