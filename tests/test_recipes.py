"""Training recipes: Muon, schedules over steps or a time budget, and the block options (QK-norm, ReLU²)."""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLE, assert_one_line_error, run_lm, write_run
from test_train import make_setup
from torch.optim._muon import _zeropower_via_newtonschulz

from lm import optim as optim_module
from lm import rundir
from lm import train as train_module
from lm.checkpoint import load_run
from lm.config import ModelConfig, TrainConfig, parse_duration
from lm.errors import UsageError
from lm.model import GPT
from lm.optim import BatchedMuon, lr_at, make_optimizers
from lm.train import Trainer


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = GPT(ModelConfig(vocab_size=300, context_length=16, n_layer=2, n_head=2, d_model=32))
    muon, adamw = make_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert "tok_emb.weight" in in_adamw and not in_muon & in_adamw
    assert len(in_muon) + len(in_adamw) == len(list(model.parameters()))
    assert len(make_optimizers(model, TrainConfig(), torch.device("cpu"))) == 1


def _one_matrix_at_a_time(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                          eps: float, *_: Any) -> list[torch.Tensor]:
    return [_zeropower_via_newtonschulz(u, coefficients, steps, eps) for u in updates]


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_steps_exactly_as_torch_muon_around_its_orthogonalisation(nesterov: bool, monkeypatch) -> None:
    """With torch's own one-matrix Newton-Schulz put back, BatchedMuon's steps are torch.optim.Muon's, bit for bit:
    momentum, Nesterov, weight decay, the learning rate and its per-shape adjustment, the state and a reload."""
    monkeypatch.setattr(optim_module, "newton_schulz", _one_matrix_at_a_time)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, context_length=16, n_layer=2, n_head=2, d_model=32))
    models = [model, copy.deepcopy(model)]
    batched, plain = (make_optimizers(m, TrainConfig(optimizer="muon"), torch.device("cpu"))[0] for m in models)
    assert isinstance(batched, BatchedMuon)
    plain.step = lambda: torch.optim.Muon.step(plain)  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(1)
    for lr in (1e-2, 5e-3, 2e-3, 1e-3):
        if lr == 2e-3:  # as a resume does: the loaded state replaces the optimizer's state dict
            batched.load_state_dict(copy.deepcopy(batched.state_dict()))
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        for optimizer in (batched, plain):
            optimizer.param_groups[0].update(lr=lr, nesterov=nesterov)
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), name
    saved, reference = batched.state_dict(), plain.state_dict()
    assert saved["param_groups"] == reference["param_groups"]
    assert saved["state"].keys() == reference["state"].keys()
    for key, state in saved["state"].items():
        assert torch.equal(state["momentum_buffer"], reference["state"][key]["momentum_buffer"])


def test_batched_newton_schulz_orthogonalises_each_matrix_as_torch_does() -> None:
    """Stacked by shape (tall ones on their side), each matrix comes out as torch's one-matrix iteration makes it:
    to bfloat16's rounding here, and bit for bit where the batched products round as single ones do."""
    generator = torch.Generator().manual_seed(0)
    scales = [1.0, 1e-3, 50.0]  # each matrix is divided by its own norm, not the stack's
    updates = [torch.randn(shape, generator=generator) * scales[i % 3]
               for i, shape in enumerate([(96, 32), (32, 96), (32, 32), (96, 32), (32, 32), (128, 32), (32, 96)])]
    coefficients = (3.4445, -4.7750, 2.0315)
    for steps in (1, 5):  # in bfloat16, as torch computes it (lm picks the precision per CPU: test_cpu_choices.py)
        batched = optim_module.newton_schulz(updates, coefficients, steps, 1e-7, dtype=lambda *stack: torch.bfloat16)
        for update, ours, torchs in zip(updates, batched, _one_matrix_at_a_time(updates, coefficients, steps, 1e-7),
                                        strict=True):
            assert ours.shape == update.shape and ours.dtype == torch.bfloat16
            torch.testing.assert_close(ours, torchs)
    singular_values = torch.linalg.svdvals(batched[0].float())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # orthogonal, as Muon's iteration goes


def test_muon_learns(sample_tokenizer, play_text: Path, tmp_path: Path) -> None:
    trainer = Trainer(make_setup(tmp_path / "run", sample_tokenizer, text=play_text, max_steps=40, eval_every=40,
                                 optimizer="muon", lr=3e-3))
    before = trainer.evaluate().val_loss
    assert trainer.run().evaluation.val_loss < before - 0.5


def test_warmdown_holds_then_falls_and_time_progress_drives_the_decay() -> None:
    config = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, warmdown=0.4)
    rates = [lr_at(step, config) for step in range(101)]
    assert rates[9] == rates[50] == 1.0 and rates[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    timed = TrainConfig(lr=1.0, warmup_steps=5, min_lr_ratio=0.1, time_budget=60)
    assert lr_at(2, timed, progress=0.9) == pytest.approx(0.6)  # warmup goes by steps
    assert lr_at(500, timed, progress=0.5) == pytest.approx(0.55)  # then the cosine goes by time
    assert lr_at(500, timed, progress=1.0) == pytest.approx(0.1)


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "1.5m", "2h")] == [90, 90, 90, 7200]
    for bad in ("", "ten", "-5s", "0", "3d"):
        with pytest.raises(UsageError, match="--time-budget"):
            parse_duration(bad)


class StepClock:
    """A clock that moves 50 ms at each reading: the run's timing is then the same on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.05
        return self.now


def test_a_time_budget_ends_the_run_evaluated_saved_and_on_time(sample_tokenizer, play_text: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "time", StepClock())
    run = tmp_path / "run"
    budget = 6.0
    trainer = Trainer(make_setup(run, sample_tokenizer, text=play_text, max_steps=1, eval_every=1000,
                                 time_budget=budget, warmup_steps=2))
    outcome = trainer.run()
    assert outcome.status == "finished" and outcome.step > 5  # max_steps does not bind under a budget
    # On time: the closing evaluation and checkpoint were estimated and left room for.
    assert budget * 0.8 < outcome.elapsed_s <= budget
    last = rundir.read_metrics(run)[-1]
    assert last["step"] == outcome.step and last["val_tokens"] == len(trainer.setup.splits.val)
    assert rundir.latest_checkpoint(run).name == f"step-{outcome.step:06d}"
    lrs = [r["lr"] for r in rundir.read_metrics(run)]
    assert lrs[-1] < 0.25 * max(lrs)  # the schedule decayed to the end of the budget
    # Resuming keeps the time spent: the budget is used up.
    again = Trainer(make_setup(run, sample_tokenizer, text=play_text, resume=True, time_budget=budget))
    assert again.run().status == "already-done"


def make_run(path: Path, tokenizer, **shape) -> Path:
    return write_run(path, tokenizer, ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=2,
                                                  n_head=4, d_model=32, **shape))


@pytest.mark.parametrize(("shape", "architecture"), [
    ({"mlp": "relu2"}, "GPT2LMHeadModel"),
    ({"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True}, "Qwen3ForCausalLM"),
])
def test_block_options_export_to_transformers_with_the_same_logits(sample_tokenizer, tmp_path: Path, shape: dict,
                                                                    architecture: str) -> None:
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    run = make_run(tmp_path / "run", sample_tokenizer, **shape)
    result = run_lm("export", run, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture
    model = load_run(run)[0]
    ids = torch.randint(0, sample_tokenizer.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    back = run_lm("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert back.returncode == 0, back.stderr
    assert json.loads((tmp_path / "back" / rundir.CONFIG).read_text())["model"] == \
        json.loads((run / rundir.CONFIG).read_text())["model"]


def test_qk_norm_without_llamas_design_is_refused_by_name(sample_tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_tokenizer, qk_norm=True)
    assert_one_line_error(run_lm("export", run, "--out", tmp_path / "hf"), "--qk-norm")


def test_cli_flags_and_their_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_lm("train", SAMPLE, "--out", tmp_path / "r", "--time-budget", "soon"), "--time-budget")
    assert_one_line_error(run_lm("train", SAMPLE, "--out", tmp_path / "r", "--time-budget", "5s", "--max-steps",
                                 "3"), "replaces --max-steps")
    assert_one_line_error(run_lm("train", SAMPLE, "--out", tmp_path / "r", "--optimizer", "sgd"), "--optimizer 'sgd'")
