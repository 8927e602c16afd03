"""CPU-dependent choices are measured on the machine that runs them, once, remembered, and can be forced:
Muon's Newton-Schulz precision here (lm/optim.py); the matmul kernel's own tests are in tests/test_linear.py."""

from __future__ import annotations

import json

import pytest
import torch

import lm.optim as optim_module
from lm import cpu_choices
from lm.config import ModelConfig, TrainConfig
from lm.errors import UsageError
from lm.model import GPT
from lm.optim import NS_COEFFICIENTS, BatchedMuon, make_optimizers, newton_schulz, newton_schulz_dtype


@pytest.fixture
def measuring(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """LM_MUON_NS_DTYPE=auto, an empty cache folder and nothing decided yet in this process."""
    monkeypatch.setenv("LM_MUON_NS_DTYPE", "auto")
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    optim_module.forget_newton_schulz_choices()
    yield
    optim_module.forget_newton_schulz_choices()


def test_the_precision_is_measured_once_per_machine_and_stack_shape(measuring, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path) -> None:
    probed: list[tuple[int, int, int]] = []

    def counting_probe(*shape: int) -> str:
        probed.append(shape)
        return "float32"

    monkeypatch.setattr(optim_module, "probe_newton_schulz", counting_probe)
    for _ in range(3):
        assert newton_schulz_dtype(20, 128, 384) == torch.float32
    assert newton_schulz_dtype(12, 128, 384) == torch.float32  # 12 and 20 matrices: one power of two apart
    assert probed == [(20, 128, 384), (12, 128, 384)]
    stored = json.loads((tmp_path / "cpu-newton-schulz.json").read_text())
    assert stored == {cpu_choices.machine_key(): {"newton-schulz 32x128x384": "float32",
                                                  "newton-schulz 16x128x384": "float32"}}
    # A new process on the same machine reads the answer...
    optim_module.forget_newton_schulz_choices()
    monkeypatch.setattr(optim_module, "probe_newton_schulz", lambda *shape: pytest.fail("measured again"))
    assert newton_schulz_dtype(20, 128, 384) == torch.float32
    # ...and the CPU modes PyTorch and oneDNN are held to are part of the machine.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "oneDNN up to AVX2" in cpu_choices.machine_key()


def test_the_variable_forces_a_precision(measuring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim_module, "probe_newton_schulz", lambda *shape: pytest.fail("measured"))
    monkeypatch.setenv("LM_MUON_NS_DTYPE", "BFloat16")
    assert newton_schulz_dtype(4, 32, 96) == torch.bfloat16
    monkeypatch.setenv("LM_MUON_NS_DTYPE", "float32")
    assert newton_schulz_dtype(4, 32, 96) == torch.float32
    monkeypatch.setenv("LM_MUON_NS_DTYPE", "float16")
    with pytest.raises(UsageError, match="LM_MUON_NS_DTYPE='float16' is not one of auto, bfloat16, float32"):
        newton_schulz_dtype(4, 32, 96)


@pytest.mark.parametrize(("bfloat16_s", "float32_s", "expected"), [
    (40.0, 1.0, "float32"), (1.0, 2.0, "bfloat16"), (0.9, 1.0, "float32")])  # a near tie goes to the exact one
def test_the_probe_takes_bfloat16_only_when_it_is_clearly_faster(monkeypatch: pytest.MonkeyPatch, bfloat16_s: float,
                                                                 float32_s: float, expected: str) -> None:
    monkeypatch.setattr(cpu_choices, "fastest", lambda runs, rounds: {"bfloat16": bfloat16_s, "float32": float32_s})
    assert optim_module.probe_newton_schulz(4, 128, 384) == expected


def test_the_probe_is_cheap_for_a_large_model(randn_shapes: list[tuple[int, ...]]) -> None:
    assert optim_module.probe_newton_schulz(48, 1024, 4096) in ("bfloat16", "float32")
    count, rows, columns = randn_shapes[0]
    # A 128 x 512 corner (38 MFLOP an iteration), 7 of them within the probe's 2^28 FLOPs, not 48 x 19 GFLOP.
    assert (count, rows, columns) == (7, 128, 512)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_orthogonalises_in_either_precision(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(shape, generator=generator) for shape in [(96, 32), (32, 96), (32, 32), (96, 32)]]
    ours = newton_schulz(updates, NS_COEFFICIENTS, 5, 1e-7, dtype=lambda *stack: dtype)
    reference = newton_schulz(updates, NS_COEFFICIENTS, 5, 1e-7, dtype=lambda *stack: torch.float64)
    for update, matrix, exact in zip(updates, ours, reference, strict=True):
        assert matrix.shape == update.shape and matrix.dtype == dtype
        singular_values = torch.linalg.svdvals(matrix.double())
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # orthogonal, as Muon's iteration goes
        # The same matrix to the precision's rounding (bfloat16 keeps 8 bits; float32 24).
        tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
        assert (matrix.double() - exact).norm() / exact.norm() < tolerance


def test_every_process_of_a_run_takes_the_first_ones_precisions(measuring, monkeypatch: pytest.MonkeyPatch) -> None:
    model = GPT(ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32))
    muon = make_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))[0]
    assert isinstance(muon, BatchedMuon)
    monkeypatch.setattr(optim_module, "probe_newton_schulz", lambda *shape: "bfloat16")
    chosen = muon.choose_precisions()
    assert chosen == {"2x32x96": "bfloat16", "2x32x32": "bfloat16", "4x32x128": "bfloat16"}  # qkv, proj, MLP
    optim_module.forget_newton_schulz_choices()  # another process, which would have measured float32
    monkeypatch.setattr(optim_module, "probe_newton_schulz", lambda *shape: pytest.fail("measured"))
    optim_module.adopt_newton_schulz_choices(chosen)
    assert muon.choose_precisions() == chosen


def test_the_start_up_line_says_what_was_chosen_and_how() -> None:
    from lm.cli.train import _describe_cpu
    from lm.train import CpuChoices

    line = _describe_cpu(CpuChoices("AMD EPYC", "AVX2", 2, {"2048x128x384": "onednn", "2048x128x8192": "default"},
                                    False, {"16x128x384": "float32", "4x128x128": "float32"}, True))
    assert line == ("CPU: AMD EPYC, PyTorch's AVX2 kernels, 2 threads; float32 products by oneDNN for 1 of 2 layer "
                    "shapes, MKL for the rest (measured here); Muon's Newton-Schulz in float32 (forced by "
                    "LM_MUON_NS_DTYPE)")
