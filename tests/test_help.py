"""`--help` in groups: each command with many options lists them under headings (cli/help_panels.py)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from lm.cli.main import app

TRAIN_PANELS = ["Run", "Data", "Model", "Optimizer and schedule", "Evaluation and logging", "Hardware"]
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def help_text(name: str) -> str:
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    return result.output


def sections(text: str, strip: bool = True) -> dict[str, list[str]]:
    """Heading -> the lines under it (continuation lines included)."""
    found: dict[str, list[str]] = {}
    heading = None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            heading = line[:-1]
            found[heading] = []
        elif heading is not None and line.strip():
            found[heading].append(line.strip() if strip else line)
    return found


def test_train_help_shows_its_panels() -> None:
    listed = sections(help_text("train"))
    assert list(listed) == [*TRAIN_PANELS, "Options"]
    assert [line.split()[:2] for line in listed["Options"]] == [["-h,", "--help"]]  # only click's own option
    assert listed["Run"][0].startswith("-o, --out RUN_DIR")  # the one required option comes first
    assert listed["Data"][0].startswith("PATH")
    assert listed["Model"][0].startswith("-p, --preset NAME")


def test_no_train_option_lacks_a_panel() -> None:
    train = COMMANDS["train"]
    assert [param.name for param in train.params if not getattr(param, "rich_help_panel", None)] == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_option_once(name: str) -> None:
    """Grouping moves options between headings and never drops one; more than 10 options means headings."""
    text = help_text(name)
    below_description = [line for lines in sections(text, strip=False).values() for line in lines]
    rows = [line for line in below_description if line.startswith("  -")]  # an option's own line, not a wrapped one
    named = [word.rstrip(",") for row in rows for word in row.split()[:3]]
    options = [param for param in COMMANDS[name].params if param.param_type_name == "option"]
    for param in options:
        assert named.count(max(param.opts, key=len)) == 1, (name, param.opts)
    if len(options) > 10:
        assert len(sections(text)) >= 3, name
