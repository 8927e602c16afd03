"""`lm generate`: in this process through the entry point the executable runs, and once as the installed
executable itself, its two output streams in one pipe."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
from conftest import LM, SAMPLE, assert_decodings_agree, assert_one_line_error, run_lm


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


def assert_same_text_but_for_a_near_tie(run: Path, prompt: str, new_tokens: int, default: str, other: str,
                                        compile: bool = False) -> None:
    """Greedy texts of `lm generate` by two float code paths (the default one, and --no-kv-cache or
    --compile): the same, or parting only where lm's own two decodings part, at a near tie.

    `lm generate` runs the very operations of the library calls below, so these are bit for bit its
    decodings, with the logits `assert_decodings_agree` needs to tell a near tie from a wrong token."""
    if default == other:
        return
    from lm.checkpoint import load_run
    from lm.generate import CompiledDecoder, encode_prompt, generate_tokens, prepare_for_generation
    from lm.sampling import SamplingConfig
    from lm.tokenizer import TokenTextDecoder

    model, tokenizer, _ = load_run(run)
    model = prepare_for_generation(model)
    ids, greedy = encode_prompt(tokenizer, prompt), SamplingConfig(temperature=0.0)
    options = {"decoder": CompiledDecoder(model)} if compile else {"use_cache": False}
    reference = list(generate_tokens(model, ids, new_tokens, greedy))
    agreed = assert_decodings_agree(reference, list(generate_tokens(model, ids, new_tokens, greedy, **options)),
                                    atol=1e-5, rtol=1e-5)  # float32 logits
    assert agreed < new_tokens, "the texts differ, yet lm's two decodings agree token for token"
    decoder = TokenTextDecoder(tokenizer)
    tokens = itertools.takewhile(lambda token: token != tokenizer.eot_id, (int(s.ids) for s in reference[:agreed]))
    shared = prompt + "".join(decoder.push(token) for token in tokens)
    assert default.startswith(shared) and other.startswith(shared)


def test_greedy_is_identical_without_the_cache_past_the_context(run: Path) -> None:
    args = ["--prompt", "TOBIAS.", "-n", "60", "--temperature", "0"]  # 60 tokens through a 16-token window
    cached = run_lm("generate", run, *args, "--stats")
    assert "the window slid" in cached.stderr
    assert_same_text_but_for_a_near_tie(run, "TOBIAS.", 60, cached.stdout, generate(run, *args, "--no-kv-cache"))


def test_compiled_decoding_gives_the_same_text(run: Path) -> None:
    args = ["--prompt", "TOBIAS.", "-n", "40", "--temperature", "0"]
    assert_same_text_but_for_a_near_tie(run, "TOBIAS.", 40, generate(run, *args), generate(run, *args, "--compile"),
                                        compile=True)


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
