"""Shared rendering helpers: consoles, number formats and rich progress bars."""

from __future__ import annotations

from functools import cache

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@cache
def stdout() -> Console:
    """Results: what a user may pipe or redirect."""
    return Console(highlight=False)


@cache
def stderr() -> Console:
    """Progress, notices and errors: never mixed into results."""
    return Console(stderr=True, highlight=False)


def human_bytes(count: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and networks count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def byte_progress(console: Console | None = None) -> Progress:
    """A transient progress bar counting bytes, drawn on standard error when it is a terminal."""
    console = console or stderr()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # in logs and pipes a bar is noise (and leaves a blank line)
    )


def task_progress(console: Console | None = None) -> Progress:
    """A transient progress bar in percent, for work of any unit, drawn only on a terminal."""
    console = console or stderr()
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)
