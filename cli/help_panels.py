"""`--help` in groups: each option listed under its `rich_help_panel`, in plain text.

`lm` renders help without Rich (cli/main.py sets rich_markup_mode=None: plain text that pipes and
greps, whose "[default: ...]" notes are not read as markup), and Typer's plain help puts every option
in one "Options" list, ignoring panels. This command class keeps the plain look and gives each panel
its own heading, in the order the panels first appear among the parameters; within a panel, options
keep the order of the command's signature. Parameters without a panel stay under "Arguments" and
"Options" (where click adds --help, last). One column width serves every heading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from typer.core import TyperCommand

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter

ARGUMENTS = "Arguments"
OPTIONS = "Options"
TERM_WIDTH_MAX = 30  # click's own limit for the first column; longer terms put their help on the next line


class GroupedHelpCommand(TyperCommand):
    """A Typer command whose plain-text --help groups its parameters by `rich_help_panel`."""

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            default = ARGUMENTS if param.param_type_name == "argument" else OPTIONS
            sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        width = min(TERM_WIDTH_MAX, max((len(term) for rows in sections.values() for term, _ in rows), default=0))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl([(term.ljust(width), text) for term, text in rows], col_max=TERM_WIDTH_MAX)

