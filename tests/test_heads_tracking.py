"""`lm train --track-heads`: head detectors and the in-context score at each evaluation, in metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_lm

from lm import checkpoint, rundir
from lm.config import ModelConfig, TrainConfig
from lm.data import split_text, tokenize_split
from lm.errors import InputError
from lm.heads import detect_heads, in_context_score, in_context_shift, in_context_windows
from lm.train import Evaluation, Trainer, TrainingSetup

CONTEXT = 16


def setup(run_dir: Path, tokenizer, text: Path, **train_changes) -> TrainingSetup:
    model = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=2, n_head=3, d_model=24)
    train = TrainConfig(**{"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 4, "eval_every": 10,
                           "eval_batches": 2, "log_every": 5, "sample_tokens": 0, "val_fraction": 0.1,
                           "device": "cpu", "track_heads": True, **train_changes})
    splits = tokenize_split(split_text([text], None, train.val_fraction), tokenizer,
                            cache_root=run_dir.parent / "token-cache")
    rundir.prepare_run_dir(run_dir, resume=False, force=True)
    return TrainingSetup(run_dir, model, train, tokenizer, splits)


def flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def expected(run: Path, val: torch.Tensor) -> tuple[list[list[float]], list[list[float]], float]:
    """The saved model's scores, computed here: detect_heads on the validation text's first window, and the
    in-context score from plain per-token losses (at a context of 16: tokens 15-16 of each window predicted
    from the whole window, minus the same tokens predicted from the last 1-2 tokens before them)."""
    model, tokenizer, _ = checkpoint.load_run(run)
    detectors = detect_heads(model, tokenizer, tokenizer.decode(val[:CONTEXT - 1].tolist()))
    windows = in_context_windows(val, CONTEXT)
    with torch.no_grad():
        whole, _ = model(windows[:, :-1])
        end, _ = model(windows[:, 14:-1])  # ids 14 and 15 before tokens 15 and 16
    late = F.cross_entropy(whole[:, 14:].transpose(1, 2), windows[:, 15:]).item()
    early = F.cross_entropy(end.transpose(1, 2), windows[:, 15:]).item()
    return detectors.previous_token, detectors.induction, late - early


def test_scores_in_metrics_match_lm_heads_on_the_saved_model(sample_tokenizer, play_text: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(setup(run, sample_tokenizer, play_text))
    val = trainer.setup.splits.val
    computed: dict[int, tuple] = {}

    def on_update(update) -> None:
        if update.evaluation is not None:  # model.safetensors is this step's: a checkpoint goes with each evaluation
            assert update.saved
            computed[update.step] = expected(run, val)

    trainer.run(on_update)
    evaluated = {r["step"]: r for r in rundir.read_metrics(run) if "val_loss" in r}
    assert sorted(evaluated) == sorted(computed) == [10, 20]
    for step, (previous, induction, in_context) in computed.items():
        record = evaluated[step]
        assert [len(row) for row in record["previous_token"]] == [3, 3]  # n_layer lists of n_head scores
        assert [len(row) for row in record["induction"]] == [3, 3]
        assert flat(record["previous_token"]) == pytest.approx(flat(previous), abs=1e-4)  # rounded to 4 places
        assert flat(record["induction"]) == pytest.approx(flat(induction), abs=1e-4)
        assert record["in_context"] == pytest.approx(in_context, abs=2e-4)
    # The final evaluation's scores are the final checkpoint's, also when loaded afresh after the run.
    previous, induction, in_context = expected(run, val)
    assert flat(evaluated[20]["induction"]) == pytest.approx(flat(induction), abs=1e-4)
    assert evaluated[20]["in_context"] == pytest.approx(in_context, abs=2e-4)
    # The scores change as the model learns (a stale model would repeat them).
    assert evaluated[10]["previous_token"] != evaluated[20]["previous_token"]


def test_off_by_default(sample_tokenizer, tmp_path: Path) -> None:
    assert TrainConfig().track_heads is False
    run = tmp_path / "run"
    sample = Path(__file__).resolve().parents[1] / "data" / "sample.txt"
    outcome = Trainer(setup(run, sample_tokenizer, sample, track_heads=False, max_steps=5, eval_every=5)).run()
    assert isinstance(outcome.evaluation, Evaluation) and outcome.evaluation.heads is None
    records = [r for r in rundir.read_metrics(run) if "val_loss" in r]
    assert records and not any({"previous_token", "induction", "in_context"} & r.keys() for r in records)


def test_the_in_context_score_compares_the_same_tokens_late_and_early() -> None:
    assert in_context_shift(512) == (461, 435)  # tokens 461-512 from 461-512 tokens, then from 26-77
    assert in_context_shift(128) == (116, 109)  # 116-128, then from 7-19
    assert in_context_shift(16) == (15, 14)  # 15-16, then from 1-2

    class Counter(torch.nn.Module):
        """A stand-in model that gives token 1 the probability n / (n + 1) after n tokens of context: its loss on
        token 1 is log((n + 1) / n), so the score is known."""

        def parameters(self):
            yield torch.zeros(1)

        def forward(self, ids: torch.Tensor, logits_from: int = 0):
            n = torch.arange(1, ids.size(1) + 1, dtype=torch.float32)[logits_from:]
            logits = torch.full((ids.size(0), len(n), 2), -1e9)
            logits[..., 0] = 0.0
            logits[..., 1] = torch.log(n)  # p(token 1) = n / (n + 1): loss log((n + 1) / n) on token 1
            return logits, None

    windows = torch.ones(3, 17, dtype=torch.long)  # every target is token 1; context 16
    late = sum(math.log((n + 1) / n) for n in (15, 16)) / 2
    early = sum(math.log((n + 1) / n) for n in (1, 2)) / 2
    assert in_context_score(Counter(), windows, batch_size=2) == pytest.approx(late - early, rel=1e-5)


def test_windows_spread_over_the_text_without_overlapping() -> None:
    ids = torch.arange(1000)
    windows = in_context_windows(ids, 99, count=4)  # 100 ids each
    assert windows[:, 0].tolist() == [0, 300, 600, 900] and windows[-1, -1].item() == 999
    assert in_context_windows(ids, 499).shape == (2, 500)  # as many as fit, under the count
    with pytest.raises(InputError, match=r"needs a window of 1,001 validation tokens.*has 1,000"):
        in_context_windows(ids, 1000)


def test_cli_option_and_its_errors(tmp_path: Path, play_text: Path) -> None:
    result = run_lm("train", play_text, "--out", tmp_path / "r", "-T", "4", "--n-layer", "1", "--n-head", "1",
                    "--d-model", "8", "-B", "2", "--vocab-size", "300", "--max-steps", "2", "--device", "cpu",
                    "--track-heads")
    assert_one_line_error(result, "context is too short to measure induction")
