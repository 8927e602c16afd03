"""`lm train` and `lm info`: the happy path, resume, bad input (in this process), Ctrl-C and SIGTERM (the
installed executable, a process of its own to signal)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LM, SAMPLE, assert_one_line_error, run_lm

SMALL = ["-T", "16", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "-B", "4", "--vocab-size", "300",
         "--val-fraction", "0.1", "--eval-every", "10", "--log-every", "5", "--sample-tokens", "8", "--device", "cpu"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_small(run: Path, *extra: str) -> Path:
    result = run_lm("train", SAMPLE, "--out", run, "--max-steps", "10", *SMALL, *extra)
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run that the tests using it only read."""
    return train_small(tmp_path_factory.mktemp("shared") / "run")


@pytest.fixture
def trained_run(shared_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run, this test's own to change."""
    return Path(shutil.copytree(shared_run, tmp_path / "run"))


def test_train_then_info_then_resume_for_more_steps(trained_run: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= {
        p.name for p in trained_run.iterdir()}
    info = run_lm("info", trained_run)
    assert info.returncode == 0, info.stderr
    assert "step 10 of 10" in info.stdout and "evaluations" in info.stdout
    more = run_lm("train", "--out", trained_run, "--resume", "--max-steps", "20")
    assert more.returncode == 0, more.stderr
    assert "resuming at step 10" in more.stderr
    # The start-up lines say what this CPU computes with (the suite forces the matmul kernel: conftest.py).
    assert "CPU: " in more.stderr and "(forced by LM_CPU_MATMUL)" in more.stderr, more.stderr
    steps = [json.loads(line)["step"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert json.loads((trained_run / "config.json").read_text())["train"]["max_steps"] == 20


def test_without_a_tokenizer_one_is_trained_and_saved(shared_run: Path) -> None:
    saved = json.loads((shared_run / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) == 300


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen([str(LM), "train", SAMPLE, "--out", run, "--max-steps", "100000", *SMALL,
                                "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = json.loads((run / "train_state" / "latest.json").read_text())["step"]
    assert step >= 1
    resumed = run_lm("train", "--out", run, "--resume", "--max-steps", str(step + 5))
    assert resumed.returncode == 0, resumed.stderr


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen([str(LM), "train", SAMPLE, "--out", run, "--max-steps", "100000", *SMALL],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "SIGTERM" in stderr
    assert (run / "train_state" / "latest.json").exists()


def bad_cases(tmp: Path, run: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    fresh = tmp / "fresh"
    return {
        "unknown preset": (["train", str(SAMPLE), "--out", str(fresh), "--preset", "huge"], ("unknown preset 'huge'",)),
        "impossible config": (["train", str(SAMPLE), "--out", str(fresh), *SMALL, "--n-head", "3"],
                              ("--n-head 3 does not divide --d-model 16",)),
        "corpus too short": (["train", str(SAMPLE), "--out", str(fresh), *SMALL, "-T", "4096"],
                             ("too short for one window of 4097",)),
        "missing validation text": (["train", str(SAMPLE), "--out", str(fresh), *SMALL, "--val", str(tmp / "no.txt")],
                                    ("no.txt does not exist",)),
        "validation is all the text": (["train", str(SAMPLE), "--out", str(fresh), *SMALL, "--val", str(SAMPLE)],
                                       ("no text found",)),
        "not a tokenizer": (["train", str(SAMPLE), "--out", str(fresh), "--tokenizer", str(SAMPLE)],
                            ("is not a tokenizer.json",)),
        "resume without checkpoint": (["train", str(SAMPLE), "--out", str(fresh), "--resume"],
                                      ("is not a run directory",)),
        "existing run": (["train", str(SAMPLE), "--out", str(run), *SMALL], ("already holds a run", "--resume")),
        "resume changing the model": (["train", "--out", str(run), "--resume", "--n-layer", "3"],
                                      ("--resume keeps the model's shape", "--n-layer")),
        "no text": (["train", "--out", str(fresh)], ("no training text given",)),
        "bad learning rate": (["train", str(SAMPLE), "--out", str(fresh), "--lr", "-1"], ("--lr must be a positive",)),
        "unknown dtype": (["train", str(SAMPLE), "--out", str(fresh), "--dtype", "int8"], ("--dtype 'int8'",)),
        "no newton-schulz steps": (["train", str(SAMPLE), "--out", str(fresh), "--muon-ns-steps", "0"],
                                   ("--muon-ns-steps must be 1 to 20, got 0",)),
        "repeat share above one": (["train", str(SAMPLE), "--out", str(fresh), "--repeat-windows", "1.5"],
                                   ("--repeat-windows must be a share of the windows between 0 and 1, got 1.5",)),
    }


CASES = ["unknown preset", "impossible config", "corpus too short", "missing validation text",
         "validation is all the text", "not a tokenizer", "resume without checkpoint",
         "existing run", "resume changing the model", "no text", "bad learning rate", "unknown dtype",
         "no newton-schulz steps", "repeat share above one"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_damages_nothing(case: str, tmp_path: Path, shared_run: Path) -> None:
    before = snapshot(shared_run)
    argv, needles = bad_cases(tmp_path, shared_run)[case]
    assert_one_line_error(run_lm(*argv), *needles)
    assert snapshot(shared_run) == before
    assert not (tmp_path / "fresh" / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda(tmp_path: Path) -> None:
    result = run_lm("train", SAMPLE, "--out", tmp_path / "r", "--device", "cuda")
    assert_one_line_error(result, "--device cuda, but this torch sees no CUDA GPU")


def test_force_replaces_a_run(trained_run: Path) -> None:
    (trained_run / "notes.txt").write_text("mine")
    result = run_lm("train", SAMPLE, "--out", trained_run, "--max-steps", "5", *SMALL, "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((trained_run / "train_state" / "latest.json").read_text())["step"] == 5
    assert (trained_run / "notes.txt").read_text() == "mine"  # not ours: left alone


def test_info_on_something_that_is_not_a_run(tmp_path: Path) -> None:
    assert_one_line_error(run_lm("info", tmp_path), "is not a run directory")


def test_presets_table_says_which_average_their_weights() -> None:
    result = run_lm("presets", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert {"tiny", "small", "gpt2", "llama"} <= rows.keys()
    assert "weights averaged" in rows["tiny"] and "weights averaged" not in rows["small"]  # --ema-decay 0.99
