"""`lm generate` through the installed executable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import LM, SAMPLE, assert_one_line_error, run_lm


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "run"
    result = run_lm("train", SAMPLE, "--out", folder, "-T", "16", "--n-layer", "1", "--n-head", "2",
                    "--d-model", "32", "-B", "8", "--vocab-size", "300", "--val-fraction", "0.1", "--max-steps",
                    "40", "--eval-every", "40", "--sample-tokens", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return folder


def generate(run: Path, *args: str) -> str:
    result = run_lm("generate", run, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_output_is_the_prompt_then_the_continuation_and_nothing_else(run: Path) -> None:
    result = run_lm("generate", run, "--prompt", "MARGERY.", "-n", "30", "--seed", "3")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("MARGERY.") and len(result.stdout) > len("MARGERY.")
    assert generate(run, "--prompt", "MARGERY.", "-n", "30", "--seed", "3") == result.stdout  # same seed
    stats = run_lm("generate", run, "--prompt", "MARGERY.", "-n", "30", "--seed", "3", "--stats")
    assert stats.stdout == result.stdout  # statistics never reach standard output
    for label in ("prompt tokens", "new tokens", "time to first token", "tokens/s", "device", "seed"):
        assert label in stats.stderr
    # Both streams into one pipe (2>&1, a log file): the table starts on a line of its own.
    joined = subprocess.run([str(LM), "generate", str(run), "--prompt", "MARGERY.", "-n", "30", "--seed", "3",
                             "--stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert joined.stdout.startswith(result.stdout.rstrip("\n") + "\n")
    assert "\nprompt tokens" in joined.stdout


def test_greedy_is_identical_without_the_cache_past_the_context(run: Path) -> None:
    args = ["--prompt", "TOBIAS.", "-n", "60", "--temperature", "0"]  # 60 tokens through a 16-token window
    cached = run_lm("generate", run, *args, "--stats")
    assert "the window slid" in cached.stderr
    assert cached.stdout == generate(run, *args, "--no-kv-cache")


def test_compiled_decoding_gives_the_same_text(run: Path) -> None:
    args = ["--prompt", "TOBIAS.", "-n", "40", "--temperature", "0"]
    assert generate(run, *args, "--compile") == generate(run, *args)


def test_several_samples_share_one_prefill(run: Path) -> None:
    out = generate(run, "--prompt", "WATCHMAN.", "-n", "20", "--num-samples", "3", "--seed", "1")
    rules = [line for line in out.splitlines() if line and set(line) == {"─"}]
    assert out.count("WATCHMAN.") >= 3 and len(rules) == 2


def test_stop_strings_cut_the_text(run: Path) -> None:
    out = generate(run, "--prompt", "The", "-n", "80", "--seed", "2", "--stop", "e", "--stop", "a")
    continuation = out.removeprefix("The")
    assert "e" not in continuation and "a" not in continuation


def test_prompt_file_and_int8(run: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Set the ladder", encoding="utf-8")
    assert generate(run, "--prompt-file", str(prompt), "-n", "10").startswith("Set the ladder")
    assert generate(run, "--prompt", "Set", "-n", "10", "--quantize", "int8").startswith("Set")


BAD = {
    "negative temperature": (["--temperature", "-1"], "--temperature"),
    "top-p zero": (["--top-p", "0"], "--top-p must be in (0, 1]"),
    "top-p above one": (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "negative top-k": (["--top-k", "-3"], "--top-k"),
    "no new tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    "empty prompt": (["--prompt", ""], "the prompt is empty"),
    "both prompts": (["--prompt", "a", "--prompt-file", "x.txt"], "not both"),
    "missing prompt file": (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    "unknown quantization": (["--quantize", "int4"], "--quantize 'int4'"),
    "no samples": (["--num-samples", "0"], "--num-samples must be at least 1"),
    "compile without cache": (["--compile", "--no-kv-cache"], "--compile compiles the cached decode step"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_are_one_line_errors(case: str, run: Path) -> None:
    args, needle = BAD[case]
    assert_one_line_error(run_lm("generate", run, *args), needle)


def test_not_a_run(tmp_path: Path) -> None:
    assert_one_line_error(run_lm("generate", tmp_path, "--prompt", "x"), "not a run directory")
