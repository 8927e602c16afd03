"""Shared fixtures: a small tokenizer trained once, and a runner for the real `lm` executable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Tests fork `lm` subprocesses; tokenizers' thread pool must not be live across a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.txt"
LM = Path(sys.executable).parent / "lm"


@pytest.fixture(scope="session")
def sample_tokenizer():
    """A 512-token vocabulary learned from data/sample.txt (a few milliseconds)."""
    from lm.textfiles import find_text_files
    from lm.tokenizer import TokenizerConfig, train_tokenizer

    tokenizer, _ = train_tokenizer(find_text_files([SAMPLE]), TokenizerConfig(vocab_size=512))
    return tokenizer


def run_lm(*args: str | Path, cwd: Path | None = None, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `lm` executable, as a user would, and capture what it prints."""
    assert LM.exists(), f"the lm entry point is not installed beside {sys.executable}"
    return subprocess.run(
        [str(LM), *map(str, args)], cwd=cwd, input=stdin, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr that says what is wrong, no traceback."""
    assert result.returncode in (1, 2), (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
