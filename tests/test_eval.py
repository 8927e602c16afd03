"""Scoring text (`lm.eval`, `lm eval`): every token once, the same figure as a hand loop, as transformers,
and as the validation figure a run reports while it trains."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, assert_one_line_error, run_lm
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from lm import rundir
from lm.checkpoint import load_run, model_state_dict
from lm.config import ModelConfig, TrainConfig
from lm.data import token_byte_lengths
from lm.eval import plan_windows, score_tokens
from lm.model import GPT

PLAY = SAMPLE.read_text(encoding="utf-8").split("THE END")[0]


@given(n=st.integers(2, 300), context=st.integers(1, 40), stride_share=st.floats(0.01, 1.0))
def test_windows_score_every_token_after_the_first_once_with_enough_context(n: int, context: int,
                                                                            stride_share: float) -> None:
    stride = max(1, round(context * stride_share))
    plan = plan_windows(n, context, stride)
    scored: list[int] = []
    for start, first in zip(plan.starts.tolist(), plan.first_scored.tolist(), strict=True):
        assert start >= 0 and start + plan.length <= n - 1  # inside the stream, targets included
        positions = range(start + 1 + first, start + 1 + plan.length)
        scored.extend(positions)
        if start > 0:  # past the first window, each scored token sees at least T - S earlier ones
            assert all(p - start >= min(plan.length, context - stride + 1) for p in positions)
    assert scored == list(range(1, n))


def tiny_model(vocab_size: int, context: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab_size, context_length=context, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():
        for param in model.parameters():  # larger than the init's: confident, varied predictions
            param.mul_(8)
    return model.eval()


def hand_loss(model: GPT, stream: torch.Tensor, context: int, lengths: torch.Tensor) -> tuple[float, float, float]:
    """Each target scored by its own forward pass over the `context` ids before it (fewer at the start)."""
    nats = text_nats = text_bytes = 0.0
    with torch.no_grad():
        for position in range(1, len(stream)):
            window = stream[max(0, position - context):position]
            logits, _ = model(window[None].long())
            nll = -torch.log_softmax(logits[0, -1].double(), -1)[stream[position]].item()
            nats += nll
            if lengths[stream[position]] > 0:
                text_nats += nll
                text_bytes += lengths[stream[position]].item()
    return nats / (len(stream) - 1), text_nats / (math.log(2) * text_bytes), text_bytes


def test_scores_equal_a_hand_loop_over_the_logits(sample_tokenizer) -> None:
    context = 16
    model = tiny_model(sample_tokenizer.vocab_size, context)
    eot = sample_tokenizer.eot_id
    documents = [PLAY[:150], PLAY[400:500]]
    tokens = torch.tensor([i for doc in documents for i in [*sample_tokenizer.encode(doc), eot]])
    lengths = token_byte_lengths(sample_tokenizer)
    stream = torch.cat([torch.tensor([eot]), tokens])
    # Stride 1: every target past the first window has exactly `context` ids before it, as in the hand loop.
    scores = score_tokens(model, tokens, lengths, context, eot_id=eot, stride=1, batch_size=7,
                          part_tokens=[len(sample_tokenizer.encode(doc)) + 1 for doc in documents])
    loss, bpb, text_bytes = hand_loss(model, stream, context, lengths)
    assert scores.total.tokens == len(tokens) and scores.total.text_bytes == text_bytes
    assert text_bytes == sum(len(doc.encode()) for doc in documents)
    assert scores.total.loss == pytest.approx(loss, abs=1e-4)
    assert scores.total.bits_per_byte == pytest.approx(bpb, abs=1e-4)
    assert [part.text_bytes for part in scores.parts] == [len(doc.encode()) for doc in documents]
    assert sum(part.nats for part in scores.parts) == pytest.approx(scores.total.nats)
    # Other strides give other contexts, hence (slightly) other figures; the batch size changes nothing.
    default = score_tokens(model, tokens, lengths, context, eot_id=eot, batch_size=3)
    assert default.stride == 8 and default.total.tokens == len(tokens)
    again = score_tokens(model, tokens, lengths, context, eot_id=eot, batch_size=64)
    assert again.total.nats == pytest.approx(default.total.nats, rel=1e-6)


def test_a_sample_of_the_windows_estimates_the_whole(sample_tokenizer) -> None:
    model = tiny_model(sample_tokenizer.vocab_size)
    tokens = torch.tensor(sample_tokenizer.encode(PLAY * 2))
    lengths = token_byte_lengths(sample_tokenizer)
    whole = score_tokens(model, tokens, lengths, 16, eot_id=sample_tokenizer.eot_id)
    sample = score_tokens(model, tokens, lengths, 16, eot_id=sample_tokenizer.eot_id, max_windows=40)
    assert sample.windows == 40 < whole.windows and sample.total.tokens < whole.total.tokens / 2
    assert sample.total.bits_per_byte == pytest.approx(whole.total.bits_per_byte, rel=0.1)


def test_lm_eval_equals_transformers_loss_on_the_exported_model(sample_tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    run = tmp_path / "run"
    model = tiny_model(sample_tokenizer.vocab_size, context=128)
    run.mkdir()
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    sample_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {"parameters": model.num_parameters()})
    text = tmp_path / "text.txt"
    text.write_text(PLAY[:200], encoding="utf-8")  # shorter than the context: one window
    result = run_lm("eval", run, "--text", text, "--format", "json")
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["runs"][0]["total"]
    assert result.returncode == 0 and run_lm("export", run, "--out", tmp_path / "hf").returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    eot = sample_tokenizer.eot_id
    ids = torch.tensor([[eot, *sample_tokenizer.encode(PLAY[:200]), eot]])
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss.item()
    assert ids.size(1) <= 128 and total["tokens"] == ids.size(1) - 1 and total["bytes"] == len(PLAY[:200].encode())
    assert total["loss"] == pytest.approx(expected, abs=1e-4)


def test_a_run_trained_with_val_reports_what_lm_eval_gives(tmp_path: Path) -> None:
    train_text, val_text = tmp_path / "train.txt", tmp_path / "val.txt"
    train_text.write_text(PLAY * 3, encoding="utf-8")
    val_text.write_text(SAMPLE.read_text(encoding="utf-8").split("THE END")[1], encoding="utf-8")
    run = tmp_path / "run"
    result = run_lm("train", tmp_path, "--val", val_text, "--out", run, "--max-steps", "20", "-T", "16",
                    "--n-layer", "1", "--n-head", "2", "--d-model", "16", "-B", "8", "--vocab-size", "400",
                    "--eval-every", "10", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Validation: the --val text" in result.stderr
    # The tokenizer learned from the training text alone: the same as lm train-tokenizer on it.
    alone = run_lm("train-tokenizer", train_text, "--vocab-size", "400", "--out", tmp_path / "alone.json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads((run / rundir.TOKENIZER).read_text())["model"] == \
        json.loads((tmp_path / "alone.json").read_text())["model"]
    config = json.loads((run / rundir.CONFIG).read_text())
    assert config["validation"]["paths"] == [str(val_text.resolve())]
    assert config["corpus"]["files"] == 1  # the --val file was left out of the training folder
    reported = [r for r in rundir.read_metrics(run) if "val_bpb" in r][-1]
    scored = run_lm("eval", run, "--text", val_text, "--format", "json")
    assert scored.returncode == 0, scored.stderr
    total = json.loads(scored.stdout)["runs"][0]["total"]
    assert reported["val_tokens"] == total["tokens"]
    assert total["bits_per_byte"] == pytest.approx(reported["val_bpb"], rel=0.02)
    assert total["bits_per_byte"] == pytest.approx(reported["val_bpb"], abs=1e-5)  # in fact, the same figure


def test_several_runs_make_one_table_best_first(sample_tokenizer, tmp_path: Path) -> None:
    runs = []
    for name, scale in (("worse", 8.0), ("better", 0.0)):
        run = tmp_path / name
        run.mkdir()
        model = tiny_model(sample_tokenizer.vocab_size)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale / 8)  # scale 0: uniform predictions, far better than confident noise
        save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
        sample_tokenizer.save(run / rundir.TOKENIZER)
        rundir.write_config(run, model.config, TrainConfig(), {})
        runs.append(run)
    result = run_lm("eval", *runs, "--text", SAMPLE, "--text", Path(__file__), "--format", "json")
    assert result.returncode == 0, result.stderr
    names = [Path(r["run"]).name for r in json.loads(result.stdout)["runs"]]
    assert names == ["better", "worse"]
    better = json.loads(result.stdout)["runs"][0]
    assert better["total"]["loss"] == pytest.approx(math.log(sample_tokenizer.vocab_size), abs=1e-3)
    assert [Path(f["path"]).name for f in better["files"]] == [SAMPLE.name, Path(__file__).name]
    table = run_lm("eval", "worse", "better", "--text", SAMPLE, cwd=tmp_path, env={"COLUMNS": "80"})
    assert table.returncode == 0 and "best first" in table.stdout and "bits/byte" in table.stdout
    assert table.stdout.index("better") < table.stdout.index("worse"), table.stdout


def test_bad_input_gets_one_line(sample_tokenizer, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    sample_tokenizer.save(no_weights / rundir.TOKENIZER)
    rundir.write_config(no_weights, ModelConfig(vocab_size=sample_tokenizer.vocab_size), TrainConfig(), {})
    assert_one_line_error(run_lm("eval", no_weights, "--text", SAMPLE), "no model.safetensors")
    assert_one_line_error(run_lm("eval", no_weights, "--text", empty), "is empty")
    assert_one_line_error(run_lm("eval", no_weights, "--text", tmp_path / "missing.txt"), "does not exist")
    assert_one_line_error(run_lm("eval", tmp_path, "--text", SAMPLE), "not a run directory")
    assert_one_line_error(run_lm("eval", no_weights, "--text", SAMPLE, "--format", "xml"), "--format")


def test_load_run_scores_what_was_saved(sample_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model(sample_tokenizer.vocab_size)
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    sample_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {})
    loaded, tokenizer, _ = load_run(run)
    tokens = torch.tensor(tokenizer.encode(PLAY[:500]))
    lengths = token_byte_lengths(tokenizer)
    a = score_tokens(model, tokens, lengths, 16, eot_id=tokenizer.eot_id)
    b = score_tokens(loaded, tokens, lengths, 16, eot_id=tokenizer.eot_id)
    assert a.total.nats == pytest.approx(b.total.nats, rel=1e-6)


def test_int8_scores_near_float32_and_bad_kinds_are_refused(sample_tokenizer, tmp_path: Path) -> None:
    from lm.errors import UsageError
    from lm.eval import score_run
    from lm.textfiles import find_text_files

    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model(sample_tokenizer.vocab_size)  # confident, varied predictions: errors would show
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    sample_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {})
    sources = find_text_files([str(SAMPLE)])
    exact, int8 = (score_run(run, sources, device="cpu", quantize=kind, cache_root=tmp_path / "cache").scores.total
                   for kind in ("none", "int8"))
    assert int8.bits_per_byte != exact.bits_per_byte  # it did run the int8 layers
    assert int8.bits_per_byte == pytest.approx(exact.bits_per_byte, rel=0.01)
    with pytest.raises(UsageError, match="--quantize 'int4'"):
        score_run(run, sources, device="cpu", quantize="int4", cache_root=tmp_path / "cache")
