"""Training on several processes through torchrun (gloo on the CPU): same numbers as one process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.fsdp as fsdp_module
from conftest import SAMPLE, assert_one_line_error, run_lm

SMALL = ["-T", "16", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--vocab-size", "300",
         "--val-fraction", "0.1", "--eval-every", "5", "--log-every", "1", "--sample-tokens", "8",
         "--device", "cpu", "-B", "8", "--warmup-steps", "50"]  # warmup > steps: the lr depends on the step only
HAS_FSDP2 = hasattr(fsdp_module, "fully_shard")
DRIVER = Path(__file__).with_name("distributed_driver.py")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(run: Path, *args: str) -> None:
    result = run_lm("train", *args, "--out", run)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module", params=["muon", "adamw"])
def one_process(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[float]]:
    """The reference: 15 steps in one process, with the preset's Muon or with AdamW (what FSDP takes)."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(run, str(SAMPLE), *SMALL, "--max-steps", "15", "--optimizer", request.param)
    return request.param, losses(run)


@pytest.mark.parametrize("mode", ["--ddp", pytest.param("--fsdp", marks=pytest.mark.skipif(
    not HAS_FSDP2, reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"))])
def test_two_processes_follow_one_process(mode: str, one_process: tuple[str, list[float]], tmp_path: Path) -> None:
    optimizer, reference = one_process
    if mode == "--fsdp" and optimizer == "muon":
        pytest.skip("--fsdp trains with AdamW (Muon is refused there; see the next test)")
    run = tmp_path / "run"
    train(run, str(SAMPLE), *SMALL, "--max-steps", "15", "--nproc", "2", mode,
          *(["--optimizer", optimizer] if mode == "--ddp" else []))  # --fsdp alone: the preset's Muon gives way
    two = losses(run)
    assert len(two) == 15
    assert max(abs(a - b) for a, b in zip(two, reference, strict=True)) <= 1e-5
    assert json.loads((run / "train_state" / "latest.json").read_text())["step"] == 15


@pytest.mark.parametrize(("first", "then"), [
    (["--nproc", "2"], []),
    ([], ["--nproc", "2", "--fsdp"] if HAS_FSDP2 else ["--nproc", "2"]),
])
def test_a_checkpoint_resumes_on_another_number_of_processes(first: list[str], then: list[str],
                                                              one_process: tuple[str, list[float]],
                                                              tmp_path: Path) -> None:
    optimizer, reference = one_process
    run = tmp_path / "run"
    train(run, str(SAMPLE), *SMALL, "--max-steps", "10", "--optimizer", optimizer, *first)
    result = run_lm("train", "--out", run, "--resume", "--max-steps", "15", *then)
    if optimizer == "muon" and "--fsdp" in then:  # a Muon run cannot go on sharded: refused, by name
        assert_one_line_error(result, "--optimizer muon", "--fsdp")
        return
    assert result.returncode == 0, result.stderr
    assert max(abs(a - b) for a, b in zip(losses(run), reference, strict=True)) <= 1e-5


def torchrun(case: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(DRIVER), case, str(workdir)], capture_output=True, text=True, timeout=120)


def test_mismatched_processes_are_detected(tmp_path: Path) -> None:
    result = torchrun("mismatch", tmp_path)
    assert result.returncode != 0
    assert "process 1 has a different configuration from process 0" in result.stderr


def test_a_dying_process_ends_the_job_with_a_message(tmp_path: Path) -> None:
    started = time.monotonic()
    result = torchrun("rank-dies", tmp_path)
    assert result.returncode != 0 and time.monotonic() - started < 100  # no hang
    assert "rank 1: simulated crash" in result.stderr
    assert "another process has probably failed" in result.stderr or "exitcode  : 3" in result.stderr
