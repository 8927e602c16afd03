"""`lm info RUN... --plot` and `--save FILE.svg`: learning curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import assert_one_line_error, run_lm

from lm import rundir
from lm.cli.plot import Chart, Series, braille_chart, count
from lm.config import ModelConfig, TrainConfig


def fake_run(folder: Path, records: list[dict], torn: str = "") -> Path:
    """A run directory with a configuration and the given metrics (no weights: --plot needs none)."""
    folder.mkdir(parents=True)
    rundir.write_config(folder, ModelConfig(vocab_size=300, context_length=32), TrainConfig(batch_size=4, grad_accum=2),
                        {})
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (folder / rundir.METRICS).write_text(lines + torn, encoding="utf-8")
    return folder


def records(steps: int, speed: float, start_loss: float) -> list[dict]:
    out = []
    for step in range(10, steps + 1, 10):
        record = {"step": step, "loss": start_loss / (1 + step / 50), "lr": 1e-3, "tokens_per_s": 1000.0,
                  "time_s": step / speed}
        if step % 50 == 0:
            record.update(val_loss=record["loss"] + 0.1, val_bpb=record["loss"] / 2)
        out.append(record)
    return out


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    # The first is still training: its last line is half written.
    still_training = fake_run(tmp_path / "fast", records(200, 10.0, 6.0), torn='{"step": 210, "lo')
    finished = fake_run(tmp_path / "slow", [dict(r, tokens=r["step"] * 1000) for r in records(100, 2.0, 5.0)])
    return still_training, finished


def test_curves_count_tokens_seen_and_skip_a_torn_line(two_runs: tuple[Path, Path]) -> None:
    fast, slow = (rundir.learning_curves(path) for path in two_runs)
    assert fast.name == "fast" and len(fast.loss) == 20  # the half-written 21st line is left out
    assert fast.tokens[0] == 10 * 4 * 2 * 32  # step x batch x accumulation x context
    assert fast.val_tokens == [step * 256 for step in (50, 100, 150, 200)]
    assert fast.val_bpb == pytest.approx([6.0 / (1 + s / 50) / 2 for s in (50, 100, 150, 200)])
    assert slow.tokens[-1] == 100 * 1000  # a record's own count wins
    assert slow.val_time_s == [25.0, 50.0]


def test_plot_in_80_columns_and_as_svg(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    svg = tmp_path / "curves.svg"
    result = run_lm("info", *two_runs, "--plot", "--save", svg, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert sum(1 for line in lines if any("\u2801" <= ch <= "\u28ff" for ch in line)) >= 20  # braille dots
    for words in ("validation bits per byte", "training loss", "wall-clock time", "tokens seen"):
        assert words in result.stdout
    assert "⣿⣿ fast" in lines[-1] and "⣿⣿ slow" in lines[-1]  # the legend
    assert "100.0k" in result.stdout  # the tokens axis ends at the slow run's own count, 100 x 1000
    tree = ElementTree.parse(svg)
    polylines = tree.getroot().findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 8  # 4 charts x 2 runs
    assert {line.get("stroke") for line in polylines} == {"#0097b2", "#b8338f"}
    texts = {node.text for node in tree.getroot().iter("{http://www.w3.org/2000/svg}text")}
    assert {"fast", "slow", "tokens seen", "validation bits per byte"} <= texts


def test_braille_puts_high_values_at_the_top() -> None:
    chart = Chart("rising", "x", [Series("a", [0.0, 1.0], [0.0, 1.0])], count)
    rows = braille_chart(chart, width=30, height=6).plain.splitlines()[1:7]  # the plot, under the title
    plot = [row[8:] for row in rows]  # past the y labels and axis
    assert plot[0][0] == "\u2800" and plot[0][-1] != "\u2800"  # top row: a dot at the right only
    assert plot[-1][0] != "\u2800" and plot[-1][-1] == "\u2800"  # bottom row: at the left only


def test_save_needs_svg(two_runs: tuple[Path, Path]) -> None:
    assert_one_line_error(run_lm("info", two_runs[0], "--save", "curves.png"), "must end in .svg")


def tracked(records: list[dict]) -> list[dict]:
    """`records` with what --track-heads adds at each evaluation: 2 layers x 2 heads, one head inducing later."""
    out = []
    for record in records:
        if "val_bpb" in record:
            step = record["step"]
            record = dict(record, previous_token=[[0.1, 0.6], [0.2, 0.3]],
                          induction=[[0.01, 0.02], [0.4 * step / 200, 0.05]], in_context=-0.2 - step / 1000)
        out.append(record)
    return out


def test_tracked_heads_are_plotted_against_steps(tmp_path: Path) -> None:
    heads = fake_run(tmp_path / "heads", tracked(records(200, 10.0, 6.0)))
    plain = fake_run(tmp_path / "plain", records(100, 2.0, 5.0))
    curves = rundir.learning_curves(heads)
    assert curves.head_steps == [50, 100, 150, 200]
    assert curves.previous_token == [0.6] * 4  # the best head of each evaluation
    assert curves.induction == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert curves.in_context == pytest.approx([-0.25, -0.3, -0.35, -0.4])
    assert rundir.learning_curves(plain).head_steps == []

    svg = tmp_path / "curves.svg"
    result = run_lm("info", heads, plain, "--plot", "--save", svg, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    for title in ("best previous-token score (max over heads)", "best induction score (max over heads)",
                  "in-context score (nats: late minus early loss)"):
        assert title in result.stdout
    assert max(map(len, result.stdout.splitlines())) <= 80
    induction = result.stdout.split("best induction score")[1].splitlines()
    assert induction[1].lstrip().startswith("0.42┤")  # the y axis reaches the best score, 0.4 (+5 % margin)
    assert "steps" in result.stdout
    tree = ElementTree.parse(svg)
    polylines = tree.getroot().findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 4 * 2 + 3  # the runs' four charts, then three for the run that tracked its heads
    texts = {node.text for node in tree.getroot().iter("{http://www.w3.org/2000/svg}text")}
    assert {"best induction score (max over heads)", "steps"} <= texts


def test_runs_without_tracked_heads_get_no_head_charts(two_runs: tuple[Path, Path]) -> None:
    result = run_lm("info", *two_runs, "--plot", env={"COLUMNS": "80"})
    assert result.returncode == 0 and "induction" not in result.stdout
