"""`lm train --init-from`: fine-tuning an imported transformers model, and `--resume` with repeated options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, assert_one_line_error, run_lm

from lm import rundir
from lm.checkpoint import load_run, load_weights
from lm.config import ModelConfig
from lm.eval import score_run
from lm.model import GPT
from lm.textfiles import find_text_files

transformers = pytest.importorskip("transformers")

FINETUNE = ["--max-steps", "6", "--eval-every", "3", "--log-every", "3", "-B", "4", "--lr", "3e-3",
            "--sample-tokens", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, sample_tokenizer) -> Path:
    """A random GPT-2 built and saved by transformers, then `lm import`ed."""
    folder = tmp_path_factory.mktemp("hf")
    eot = sample_tokenizer.eot_id
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     vocab_size=sample_tokenizer.vocab_size, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    sample_tokenizer.save(folder / "gpt2" / "tokenizer.json")
    result = run_lm("import", folder / "gpt2", "--out", folder / "run")
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def finetuned(imported: Path, play_text: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ft") / "run"
    argv = ["train", play_text, "--val", SAMPLE, "--init-from", imported, "--out", out, *FINETUNE]
    result = run_lm(*argv)
    assert result.returncode == 0, result.stderr
    return out, [str(a) for a in argv]


def test_step_zero_is_the_imported_models_own_loss_and_training_lowers_it(imported: Path, finetuned) -> None:
    out, _ = finetuned
    metrics = [json.loads(line) for line in (out / rundir.METRICS).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6]
    start = metrics[0]
    assert "loss" not in start and start["val_tokens"] > 0
    # lm eval's scoring of the imported model on the same text, before any training.
    before = score_run(imported, find_text_files([SAMPLE]), device="cpu", batch_size=4)
    assert start["val_loss"] == pytest.approx(before.scores.total.loss, abs=2e-6)
    assert start["val_bpb"] == pytest.approx(before.scores.total.bits_per_byte, abs=2e-6)
    assert metrics[-1]["val_loss"] < start["val_loss"]


def test_the_new_run_records_its_origin_exports_and_resumes(imported: Path, finetuned, tmp_path: Path) -> None:
    out, argv = finetuned
    saved = json.loads((out / rundir.CONFIG).read_text())
    assert saved["init_from"]["run"] == str(imported.resolve()) and saved["init_from"]["imported_from"]
    assert saved["train"]["warmup_steps"] == 20 and saved["train"]["lr"] == 3e-3  # fine-tuning's, then --lr
    info = run_lm("info", out)
    assert info.returncode == 0 and "started from" in info.stdout, info.stderr
    exported = run_lm("export", out, "--out", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, _, _ = load_run(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    # The very command that started it, with --resume and more steps: accepted.
    more = run_lm(*argv[:argv.index("--max-steps") + 1], "8", *argv[argv.index("--max-steps") + 2:], "--resume")
    assert more.returncode == 0, more.stderr
    assert "resuming at step 6" in more.stderr
    steps = [json.loads(line)["step"] for line in (out / rundir.METRICS).read_text().splitlines()]
    assert steps == [0, 3, 6, 8]


@pytest.mark.parametrize(("option", "needles"), [
    (["--n-layer", "3"], ("--init-from keeps", "--n-layer 3")),
    (["--pos-encoding", "rope"], ("--pos-encoding rope",)),
    (["--context-length", "128"], ("--context-length 128 is longer", "64")),
    (["--tokenizer", str(SAMPLE)], ("--tokenizer cannot apply",)),
    (["--preset", "small"], ("--preset cannot apply",)),
])
def test_options_that_would_change_the_shape_are_refused(option: list[str], needles, imported: Path,
                                                         tmp_path: Path) -> None:
    result = run_lm("train", SAMPLE, "--init-from", imported, "--out", tmp_path / "new", *option)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "new").exists()


def test_a_shorter_context_keeps_the_first_positions(imported: Path) -> None:
    full, _, info = load_run(imported)
    short = GPT(ModelConfig(**{**info.model.__dict__, "context_length": 16}))
    load_weights(short, imported / rundir.WEIGHTS, shorter_context=True)
    assert torch.equal(short.pos_emb.weight, full.pos_emb.weight[:16])
    ids = torch.randint(0, info.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(short(ids)[0], full(ids)[0], atol=1e-5)


def test_resume_accepts_agreeing_options_and_names_conflicting_ones(tmp_path: Path, sample_tokenizer) -> None:
    sample_tokenizer.save(tmp_path / "tok.json")
    shutil.copy(tmp_path / "tok.json", tmp_path / "copy.json")
    small = ["-T", "16", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "-B", "4", "--eval-every", "5",
             "--sample-tokens", "0", "--device", "cpu", "--preset", "tiny", "--val-fraction", "0.1"]
    run = tmp_path / "run"
    first = run_lm("train", SAMPLE, "--out", run, "--tokenizer", tmp_path / "tok.json", "--max-steps", "5", *small)
    assert first.returncode == 0, first.stderr
    again = run_lm("train", SAMPLE, "--out", run, "--tokenizer", tmp_path / "copy.json", "--max-steps", "10",
                   *small, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming at step 5" in again.stderr
    other = tmp_path / "other.json"
    saved = json.loads((tmp_path / "tok.json").read_text())
    saved["added_tokens"][0]["content"] = "<|other|>"
    other.write_text(json.dumps(saved))
    clash = run_lm("train", tmp_path / "tok.json", "--out", run, "--tokenizer", other, "--preset", "small",
                   "--val-fraction", "0.2", "--resume")
    assert_one_line_error(clash, "--tokenizer", "--preset small", "--val-fraction 0.2", "PATH")
