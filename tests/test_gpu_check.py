"""bench/gpu_check.py without a GPU: it says so and exits 0, and its report code works on real-looking
results (so the day a GPU is lent is not spent on a bug in the table)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.json")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert "no CUDA device" in result.stdout and "nothing was checked" in result.stdout
    assert not (tmp_path / "r.json").exists()


def test_a_step_past_its_time_limit_is_stopped(gpu_check) -> None:
    started = time.monotonic()
    code, _, _ = gpu_check.run_limited([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert code is None and time.monotonic() - started < 15


def test_the_cause_of_a_failure_is_the_exception_line(gpu_check) -> None:
    output = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n\nbye\n"
    assert gpu_check.last_error_line(output) == "torch.OutOfMemoryError: CUDA out of memory."


LM_TRAIN = {"impl": "lm", "batch": 32, "context": 1024, "tokens_per_s": 420_000.0, "mfu": 0.49,
            "peak_memory_gib": 61.2}
HF_TRAIN = {**LM_TRAIN, "impl": "hf", "batch": 16, "tokens_per_s": 300_000.0, "mfu": 0.35}
LM_DECODE = {"variants": {"eager": {"decode_tokens_per_s": 400.0, "first_token_s": 0.012},
                          "compiled (CUDA graphs)": {"decode_tokens_per_s": 2000.0, "first_token_s": 0.011,
                                                     "compile_s": 40.0, "cudagraph_skips": 0}}}
HF_DECODE = {"variants": {"eager": {"decode_tokens_per_s": 200.0, "first_token_s": 0.02},
                          "static cache + compile": {"error": "ValueError: static cache not supported"}}}
PYTEST_OUTPUT = """tests/test_cuda.py::test_bf16_autocast_training_learns PASSED [ 10%]
tests/test_cuda.py::test_fused_and_explicit_attention_agree_in_bf16[1-64] FAILED [ 20%]
=========================== short test summary info ============================
FAILED tests/test_cuda.py::test_fused_and_explicit_attention_agree_in_bf16[1-64] - AssertionError: gradient of k
"""


def test_the_whole_report_on_made_up_results(gpu_check, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    results = {"train-lm": LM_TRAIN, "train-transformers": HF_TRAIN, "decode-lm": LM_DECODE,
               "decode-transformers": HF_DECODE}
    asked: list[tuple[str, tuple[str, ...]]] = []

    def fake_worker(task: str, timeout_s: float, *options: str):
        asked.append((task, options))
        if task == "decode-transformers":
            return gpu_check.Outcome(False, 3.0, cause="timed out after 200 s; last line: compiling")
        return gpu_check.Outcome(True, 1.0, result=results[task])

    monkeypatch.setattr(gpu_check, "run_worker", fake_worker)
    monkeypatch.setattr(gpu_check, "run_limited", lambda argv, timeout_s: (1, PYTEST_OUTPUT, 2.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    out = tmp_path / "report.json"

    code = gpu_check.main_parent(gpu_check.parse_args(["--out", str(out)]))

    assert code == 1  # a test failed and a step timed out
    assert ("train-transformers", ("--batch", "32")) in asked  # transformers trains at lm's micro-batch
    printed = capsys.readouterr().out
    assert "420,000 tokens/s, MFU 49.0%" in printed and "lm / transformers: 1.40x" in printed
    assert "2,000 tokens/s" in printed and "gradient of k" in printed and "timed out after 200 s" in printed
    report = json.loads(out.read_text())
    assert report["device"] == "NVIDIA H100 80GB HBM3"
    assert [t["status"] for t in report["tests"]] == ["PASSED", "FAILED"]
    assert report["failed"] == ["test test_fused_and_explicit_attention_agree_in_bf16[1-64]", "tests",
                                "decoding, transformers"]
    assert report["steps"]["train lm"]["result"]["batch"] == 32
