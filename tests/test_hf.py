"""Interop with Hugging Face transformers, proven by parity in both directions (transformers is a dev extra)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_decodings_agree, assert_one_line_error, random_weights, run_lm, write_run
from safetensors.torch import load_file, save_file

from lm import rundir
from lm.checkpoint import load_run
from lm.config import PRESETS, ModelConfig
from lm.generate import Step, generate_tokens, prepare_for_generation
from lm.hf import family as export_family
from lm.sampling import SamplingConfig

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; nothing may be downloaded
transformers.utils.logging.set_verbosity_error()

GPT2_SHAPE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
LLAMA_SHAPE = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
UNICODE = "Ünïcödé, 日本語のテキスト, emoji 🕯️🔥, Ελληνικά, العربية, tabs\tand\r\nnewlines"


def make_run(path: Path, tokenizer, **shape) -> Path:
    return write_run(path, tokenizer, ModelConfig(vocab_size=tokenizer.vocab_size, context_length=96, n_layer=2,
                                                  n_head=4, d_model=32, **shape))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory, sample_tokenizer) -> tuple[Path, Path, str]:
    folder = tmp_path_factory.mktemp(request.param)
    run = make_run(folder / "run", sample_tokenizer, **(GPT2_SHAPE if request.param == "gpt2" else LLAMA_SHAPE))
    result = run_lm("export", run, "--out", folder / "hf")
    assert result.returncode == 0, result.stderr
    return run, folder / "hf", request.param


def hf_greedy(hf, prompt_ids: list[int], new_tokens: int) -> list[Step]:
    """transformers' greedy decoding, step by step with the logits each token was chosen from."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                          return_dict_in_generate=True, output_logits=True)
    return [Step(out.sequences[0, len(prompt_ids) + i].view(1), logits) for i, logits in enumerate(out.logits)]


def assert_greedy_agrees_with_transformers(model, hf, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """lm's greedy tokens (returned) and transformers': another float32 code path, whose logits agree to
    1e-4 (as above), hence its tokens too until a near tie, after which the two read other texts."""
    ours = list(generate_tokens(model, prompt_ids, new_tokens, SamplingConfig(temperature=0)))
    theirs = hf_greedy(hf, prompt_ids, new_tokens)  # which ends early at <|endoftext|>
    assert_decodings_agree(ours[:len(theirs)], theirs, atol=1e-4, rtol=1e-5)
    return [int(step.ids) for step in ours]


def hf_load(folder: Path, eager: bool = False):
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def test_export_is_loaded_by_transformers_with_the_same_logits(exported) -> None:
    run, hf_dir, family = exported
    hf = hf_load(hf_dir)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    model, tokenizer, _ = load_run(run)
    ids = torch.randint(0, tokenizer.vocab_size, (3, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto(UNICODE).input_ids == tokenizer.encode(UNICODE)
    assert auto.eos_token == auto.bos_token == "<|endoftext|>"


def test_greedy_generation_matches_lm_generate(exported) -> None:
    run, hf_dir, _ = exported
    hf = hf_load(hf_dir)
    _, tokenizer, _ = load_run(run)
    prompt = "MARGERY. Set the"
    prompt_ids = [tokenizer.eot_id, *tokenizer.encode(prompt)]
    # prepared as `lm generate` prepares it: the command then runs these very operations, bit for bit
    model = prepare_for_generation(load_run(run)[0])
    ours = assert_greedy_agrees_with_transformers(model, hf, prompt_ids, 50)
    text = tokenizer.decode(list(itertools.takewhile(lambda token: token != tokenizer.eot_id, ours)))
    cli = run_lm("generate", run, "--prompt", prompt, "-n", "50", "--temperature", "0")
    assert cli.stdout == prompt + text


def test_eager_attention_weights_match_inspect_attention(exported) -> None:
    run, hf_dir, _ = exported
    result = run_lm("inspect-attention", run, "--text", "The lamp is lit; the street is bright.", "--format",
                    "json", "--layer", "all", "--head", "all")
    data = json.loads(result.stdout)
    ids = torch.tensor([[token["id"] for token in data["tokens"]]])
    with torch.no_grad():
        attentions = hf_load(hf_dir, eager=True)(ids, output_attentions=True).attentions
    for entry in data["attention"]:
        theirs = attentions[entry["layer"]][0, entry["head"]]
        for query, row in enumerate(entry["weights"]):
            assert torch.allclose(torch.tensor(row), theirs[query, :query + 1], atol=1e-4)


def test_round_trip_keeps_the_weights_bit_for_bit(exported, tmp_path: Path) -> None:
    run, hf_dir, _ = exported
    result = run_lm("import", hf_dir, "--out", tmp_path / "back")
    assert result.returncode == 0, result.stderr
    before, after = load_file(str(run / rundir.WEIGHTS)), load_file(str(tmp_path / "back" / rundir.WEIGHTS))
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


def save_hf_model(folder: Path, family: str, tokenizer) -> torch.nn.Module:
    common = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
    if family == "gpt2":
        config = transformers.GPT2Config(n_positions=96, n_embd=32, n_layer=2, n_head=4, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=96,
                                          tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(config)
    random_weights(model, seed=5)
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_transformers_checkpoint_imports_with_the_same_behaviour(family: str, tmp_path: Path,
                                                                   sample_tokenizer) -> None:
    hf = save_hf_model(tmp_path / "hf", family, sample_tokenizer)
    result = run_lm("import", tmp_path / "hf", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = load_run(tmp_path / "run")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    assert_greedy_agrees_with_transformers(model, hf, [tokenizer.eot_id, *tokenizer.encode("the lamp")], 50)
    data = json.loads(run_lm("inspect-attention", tmp_path / "run", "--text", "the lamp is lit", "--format", "json",
                             "--layer", "all", "--head", "all").stdout)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = hf(torch.tensor([[t["id"] for t in data["tokens"]]]), output_attentions=True).attentions
    for entry in data["attention"]:
        for query, row in enumerate(entry["weights"]):
            assert torch.allclose(torch.tensor(row), attentions[entry["layer"]][0, entry["head"], query, :query + 1],
                                  atol=1e-4)


def test_lm_tokenize_gives_autotokenizer_ids(exported) -> None:
    run, hf_dir, _ = exported
    table = run_lm("tokenize", run, UNICODE).stdout
    ids = [int(line.split("│")[2]) for line in table.splitlines() if line.startswith("│")]
    assert ids == transformers.AutoTokenizer.from_pretrained(hf_dir)(UNICODE).input_ids


def test_bad_checkpoints_are_one_line_and_leave_nothing(tmp_path: Path, sample_tokenizer) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_lm("import", tmp_path / "empty", "--out", out), "is not a transformers checkpoint")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert_one_line_error(run_lm("import", bert, "--out", out), "BertForMaskedLM",
                          "GPT2LMHeadModel and LlamaForCausalLM")
    hf_dir = tmp_path / "hf"
    save_hf_model(hf_dir, "gpt2", sample_tokenizer)
    (hf_dir / "tokenizer.json").unlink()
    assert_one_line_error(run_lm("import", hf_dir, "--out", out), "has no tokenizer.json")
    small = tmp_path / "small.txt"
    small.write_text("a few words only\n" * 20)
    other = run_lm("train-tokenizer", small, "--vocab-size", "300", "--out", hf_dir / "tokenizer.json")
    assert other.returncode == 0
    assert_one_line_error(run_lm("import", hf_dir, "--out", out), "does not belong to these weights")
    sample_tokenizer.save(hf_dir / "tokenizer.json", overwrite=True)
    weights = load_file(str(hf_dir / "model.safetensors"))
    names = sorted(weights)
    save_file({k: weights[k] for k in names[: len(names) // 2]}, str(hf_dir / "part-1.safetensors"))
    (hf_dir / "model.safetensors").unlink()
    index = {"weight_map": {k: ("part-1.safetensors" if i < len(names) // 2 else "part-2.safetensors")
                            for i, k in enumerate(names)}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run_lm("import", hf_dir, "--out", out), "shard part-2.safetensors")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_export_refuses_what_transformers_cannot_load(tmp_path: Path, sample_tokenizer) -> None:
    run = make_run(tmp_path / "sin", sample_tokenizer, pos_encoding="sinusoidal")
    assert_one_line_error(run_lm("export", run, "--out", tmp_path / "x"), "--pos-encoding sinusoidal")
    mixed = make_run(tmp_path / "mixed", sample_tokenizer, pos_encoding="rope", norm="rmsnorm", mlp="gelu", bias=False)
    assert_one_line_error(run_lm("export", mixed, "--out", tmp_path / "x"), "--mlp 'gelu' (needs 'swiglu')")
    attention_only = make_run(tmp_path / "attention-only", sample_tokenizer, mlp="none")
    for target, form in (("transformers", "hf"), ("llama.cpp", "gguf")):
        assert_one_line_error(run_lm("export", attention_only, "--out", tmp_path / "x", "--format", form),
                              f"attention-only (--mlp none), and the GPT-2, Llama and Qwen3 blocks of {target}")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    good = make_run(tmp_path / "good", sample_tokenizer, **GPT2_SHAPE)
    assert_one_line_error(run_lm("export", good, "--out", tmp_path / "busy"), "is not empty")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_leaves_for_transformers_and_llama_cpp(name: str) -> None:
    """What `make demo` (and any preset) trains can be exported both ways: family() raises otherwise."""
    config = PRESETS[name].model
    assert export_family(config, "transformers") == export_family(config, "llama.cpp") in ("gpt2", "llama", "qwen3")
