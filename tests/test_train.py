from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from lm import checkpoint, rundir
from lm.config import ModelConfig, TrainConfig
from lm.data import split_text, tokenize_split
from lm.errors import InputError
from lm.optim import lr_at
from lm.train import Trainer, TrainingDiverged, TrainingSetup

METRIC_KEYS = {"step", "loss", "lr", "tokens_per_s", "time_s"}


def make_setup(run_dir: Path, tokenizer, resume: bool = False, text: Path = SAMPLE, model_changes: dict | None = None,
               **train_changes) -> TrainingSetup:
    model = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=2, n_head=2, d_model=32,
                        **(model_changes or {}))
    train = TrainConfig(**{"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 4, "eval_every": 10,
                           "eval_batches": 2, "log_every": 1, "sample_tokens": 8, "val_fraction": 0.1,
                           "device": "cpu", **train_changes})
    splits = tokenize_split(split_text([text], None, train.val_fraction), tokenizer,
                            cache_root=run_dir.parent / "token-cache")
    if not resume:
        rundir.prepare_run_dir(run_dir, resume=False, force=True)
    return TrainingSetup(run_dir, model, train, tokenizer, splits, resume=resume)


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in rundir.read_metrics(run_dir)]


def test_loss_goes_down_and_metrics_follow_the_schema(sample_tokenizer, play_text: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(make_setup(run, sample_tokenizer, text=play_text, max_steps=60, eval_every=30))
    untrained = trainer.evaluate()
    assert untrained.val_loss == pytest.approx(math.log(sample_tokenizer.vocab_size), abs=0.2)
    outcome = trainer.run()
    assert outcome.status == "finished" and outcome.step == 60
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert all(r.keys() >= METRIC_KEYS for r in records)
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [30, 60]
    # The last evaluation scores every validation id (as `lm eval` would); earlier ones a spread sample.
    assert evaluated[-1]["val_tokens"] == len(trainer.setup.splits.val) > evaluated[0]["val_tokens"] > 0
    assert evaluated[-1]["val_loss"] < untrained.val_loss - 0.5 and evaluated[0]["val_loss"] < untrained.val_loss - 0.3
    assert sum(losses(run)[-10:]) < sum(losses(run)[:10]) - 5  # a clear drop, not noise
    assert outcome.evaluation.val_bpb == pytest.approx(evaluated[-1]["val_bpb"], abs=1e-5)
    assert isinstance(outcome.evaluation.sample, str)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    rates = [lr_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert lr_at(100, config) == pytest.approx(0.1)
    assert lr_at(55, config) == pytest.approx(0.55)  # half way down the cosine


# The speedrun's techniques (issue 27) all at once: the model's, Muon's cautious decay, an lr per group, the
# 1-sqrt warmdown and the weights' average, whose checkpoints hold the average and the trained weights both.
SPEEDRUN = {"model_changes": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                              "qk_norm": True, "tie_embeddings": False, "residual_scalars": True, "logit_softcap": 15.0,
                              "value_embeddings": True, "smear": True, "bigram_buckets": 64, "qk_gain": 1.2,
                              "head_init_std": 0.001, "zero_init_projections": True},
            "optimizer": "muon", "muon_cautious_wd": True, "warmdown": 0.5, "warmdown_shape": "1-sqrt",
            "adam_eps": 1e-10, "embed_lr_scale": 5.0, "head_lr_scale": 0.5, "scalar_lr_scale": 2.0, "ema_decay": 0.9}


@pytest.mark.parametrize("recipe", [{"optimizer": "adamw"}, {"optimizer": "muon"}, SPEEDRUN],
                         ids=["adamw", "muon", "speedrun"])
def test_resume_is_exact_to_the_bit(sample_tokenizer, tmp_path: Path, recipe: dict) -> None:
    straight = tmp_path / "straight"
    Trainer(make_setup(straight, sample_tokenizer, max_steps=20, **recipe)).run()

    halves = tmp_path / "halves"
    first = Trainer(make_setup(halves, sample_tokenizer, max_steps=20, **recipe))
    stopped = first.run(should_stop=lambda: first.step == 10)
    assert (stopped.status, stopped.step) == ("interrupted", 10)
    assert rundir.latest_checkpoint(halves).name == "step-000010"
    resumed = Trainer(make_setup(halves, sample_tokenizer, resume=True, max_steps=20, **recipe))
    assert resumed.step == 10
    assert resumed.run().status == "finished"
    assert losses(halves) == losses(straight)  # float equality: bit for bit, all 20 steps
    a = checkpoint.load_run(straight)[0].state_dict()
    b = checkpoint.load_run(halves)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = checkpoint.load_training_state(halves)[1]
    assert ("trained_weights" in state) == ("ema_decay" in recipe)
    if "ema_decay" in recipe:  # the saved weights are the average; the trained ones, kept to resume, differ
        assert all(torch.equal(a[k], resumed.average.average[i]) for i, k in enumerate(resumed.average.names))
        trained = checkpoint.load_training_state(straight)[1]["trained_weights"]
        assert all(torch.equal(trained[k], state["trained_weights"][k]) for k in trained)
        assert not torch.equal(trained["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])
        assert torch.equal(trained["blocks.0.attn.qkv.weight"], resumed.model.blocks[0].attn.qkv.weight)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(sample_tokenizer, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    trainer = Trainer(make_setup(run, sample_tokenizer, max_steps=20))
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if obj.get("step") == 20:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk unplugged")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk unplugged"):
        trainer.run()
    assert rundir.latest_checkpoint(run).name == "step-000010"
    assert [p.name for p in (run / "train_state").iterdir()] == ["latest.json", "step-000010"]
    checkpoint.load_run(run)  # the published weights are whole (step 10's)
    monkeypatch.setattr(torch, "save", real_save)
    resumed = Trainer(make_setup(run, sample_tokenizer, resume=True, max_steps=20))
    assert resumed.step == 10
    assert resumed.run().status == "finished"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(sample_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(make_setup(run, sample_tokenizer, max_steps=20))
    real_step = trainer._train_step

    def poisoned(lr: float) -> torch.Tensor:
        return real_step(lr) * (float("nan") if trainer.step >= 13 else 1.0)

    trainer._train_step = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became nan before step 14; the last good checkpoint \(step 10\)"):
        trainer.run()
    assert rundir.latest_checkpoint(run).name == "step-000010"


def test_already_finished_runs_do_nothing(sample_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_setup(run, sample_tokenizer, max_steps=10)).run()
    again = Trainer(make_setup(run, sample_tokenizer, resume=True, max_steps=10)).run()
    assert again.status == "already-done" and again.step == 10


def test_load_run_checks_the_files_against_each_other(sample_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_setup(run, sample_tokenizer, max_steps=10)).run()
    model, tokenizer, info = checkpoint.load_run(run)
    assert not model.training and tokenizer.vocab_size == info.model.vocab_size
    assert json.loads((run / "config.json").read_text())["parameters"] == model.num_parameters()

    config = json.loads((run / "config.json").read_text())
    config["model"]["vocab_size"] += 1
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="has 512 tokens but the model was built for 513"):
        checkpoint.load_run(run)
    config["model"]["vocab_size"] -= 1
    config["model"]["n_layer"] = 3
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"does not match config.json \(missing"):
        checkpoint.load_run(run)
    config["model"]["n_layer"] = 2
    (run / "config.json").write_text(json.dumps(config))
    (run / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="cannot be read"):
        checkpoint.load_run(run)
    with pytest.raises(InputError, match="not a run directory"):
        checkpoint.load_run(tmp_path / "nothing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_learns(sample_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    outcome = Trainer(make_setup(run, sample_tokenizer, max_steps=60, eval_every=30, device="cuda")).run()
    evaluated = [r for r in rundir.read_metrics(run) if "val_loss" in r]
    assert outcome.status == "finished" and evaluated[-1]["val_loss"] < evaluated[0]["val_loss"]
