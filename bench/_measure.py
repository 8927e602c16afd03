"""Helpers for the benchmarks: run a command in a fresh process, return its wall time and peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Wall-clock seconds and peak resident memory (from the kernel's rusage) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr}")
    return Run(seconds, usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def alternate(commands: dict[str, Sequence[str]], rounds: int) -> dict[str, list[Run]]:
    """Run each command once per round, in turn, so drifting machine speed hits all of them alike."""
    results: dict[str, list[Run]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, argv in commands.items():
            results[name].append(run_measured(argv))
    return results


def median_seconds(runs: list[Run]) -> float:
    return median(r.seconds for r in runs)


def median_rss(runs: list[Run]) -> float:
    return median(r.peak_rss_mb for r in runs)


def write_summary(path: Path | None, **figures: float | str) -> None:
    """A benchmark's headline figures as JSON, where `--summary PATH` asks (bench/cpu_matrix.py reads them)."""
    if path is not None:
        path.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
