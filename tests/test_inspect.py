from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_lm
from safetensors.torch import save_file

from lm import rundir
from lm.checkpoint import load_run, model_state_dict
from lm.cli.inspect_attention import _grid, _summary_table
from lm.config import ModelConfig, TrainConfig
from lm.inspect import (
    attention_maps,
    compare_attention,
    head_matrix,
    head_stats,
    heads_summary,
    induction_scores,
    top_attended,
)
from lm.model import GPT
from lm.textfiles import find_text_files
from lm.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    text = tmp_path_factory.mktemp("bytes") / "t.txt"
    text.write_text("ascii\n")
    tokenizer, _ = train_tokenizer(find_text_files([text]), TokenizerConfig(vocab_size=257))
    return tokenizer  # one token per byte, <|endoftext|> = 0


def random_model(pos_encoding: str, vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab, context_length=24, n_layer=2, n_head=4, d_model=32,
                           pos_encoding=pos_encoding)).eval()


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_weights_times_values_reproduce_the_fast_path(pos_encoding: str, byte_tokenizer) -> None:
    model = random_model(pos_encoding, byte_tokenizer.vocab_size)
    text = "weights, values and the fast path"[:20]
    maps = attention_maps(model, byte_tokenizer, text, [0, 1])
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, block in enumerate(model.blocks):
        block.attn.register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, (args[0], output[0])))
    with torch.no_grad():
        model(torch.tensor([maps.ids]))  # the fast path (scaled_dot_product_attention)
    for layer, block in enumerate(model.blocks):
        attn_input, fast_output = captured[layer]
        weights = maps.weights[layer]  # (heads, time, time)
        time = weights.size(-1)
        assert torch.allclose(weights.sum(-1), torch.ones(4, time), atol=1e-6)
        assert (weights.triu(1) == 0).all()
        with torch.no_grad():
            values = block.attn.qkv(attn_input)[0, :, 64:].view(time, 4, 8).transpose(0, 1)  # (heads, time, d)
            mixed = (weights @ values).transpose(0, 1).reshape(time, 32)
            assert torch.allclose(block.attn.proj(mixed), fast_output[0], atol=1e-5)


def known_model(vocab: int, strength: float = 30.0) -> GPT:
    """One layer, two heads, positions one-hot: head 0 looks at the previous token, head 1 at the first."""
    context = 8
    model = GPT(ModelConfig(vocab_size=vocab, context_length=context, n_layer=1, n_head=2, d_model=16))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.blocks[0].norm1.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.pos_emb.weight[:, :context] = torch.eye(context)
        qkv = model.blocks[0].attn.qkv.weight  # rows: q (head 0: 0-7, head 1: 8-15), k (16-31), v (32-47)
        qkv[0:8, 0:8] = strength * torch.eye(8)  # head 0: query = own position
        qkv[16:24, 0:8] = torch.eye(8).roll(1, dims=0)  # head 0: key = next position (so it matches i-1)
        qkv[8, 0:8] = 1.0  # head 1: every query the same
        qkv[24, 0] = strength  # head 1: only position 0's key answers it
        qkv[32:48] = torch.randn(16, 16)
    return model.eval()


def test_a_model_built_to_look_back_and_to_the_start_is_measured_so(byte_tokenizer) -> None:
    model = known_model(byte_tokenizer.vocab_size)
    maps = attention_maps(model, byte_tokenizer, "abcdefg", [0])  # <|endoftext|> + 7 bytes = the context
    stats = head_stats(0, maps.weights[0], induction_scores(model, byte_tokenizer)[0])
    previous, sink = stats
    assert previous.previous > 0.99 and previous.label == "previous-token"
    assert sink.first > 0.99 and sink.label == "sink"
    assert previous.induction < 0.05 and sink.entropy < 0.1
    tops = top_attended(head_matrix(maps, 0, 0), 1)
    assert [best[0][0] for best in tops[1:]] == list(range(7))  # each token's top key: the one before it


def test_head_statistics_on_hand_written_weights() -> None:
    uniform = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    diagonal = torch.eye(4)
    stats = head_stats(0, torch.stack([uniform, diagonal]))
    assert stats[0].spread == pytest.approx(1.0) and stats[0].label == "broad"
    assert stats[0].entropy == pytest.approx((1 + math.log2(3) + 2) / 3)
    assert stats[0].previous == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert stats[1].itself == 1.0 and stats[1].entropy == 0.0 and stats[1].label == "self"


def test_compare_needs_a_shared_token(byte_tokenizer) -> None:
    from lm.errors import InputError

    model = random_model("learned", byte_tokenizer.vocab_size)
    shared = compare_attention(model, byte_tokenizer, "an apple", "apple pie", 1, None)
    assert {s.token for s in shared} == {b"a", b"p", b"l", b"e", b" "}
    assert all(0 <= s.difference <= 1 for s in shared)
    with pytest.raises(InputError, match="share no token"):
        compare_attention(model, byte_tokenizer, "abc", "xyz", 1, None)


@pytest.fixture(scope="module")
def known_run(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer) -> Path:
    """A run directory holding the hand-built model, for the command line."""
    run = tmp_path_factory.mktemp("known") / "run"
    run.mkdir()
    model = known_model(byte_tokenizer.vocab_size)
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    byte_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {"parameters": model.num_parameters()})
    return run


def test_heads_summary_and_top_from_the_command_line(known_run: Path) -> None:
    summary = run_lm("inspect-attention", known_run, "--text", "abcdefg", "--heads-summary")
    assert summary.returncode == 0, summary.stderr
    rows = [line.split() for line in summary.stdout.splitlines() if re.match(r" *\d+ +\d+ ", line)]
    cells = {(int(r[0]), int(r[1])): r[2:8] for r in rows}
    assert cells[(0, 0)][1] == "1.00" and cells[(0, 0)][5] == "previous-token"
    assert cells[(0, 1)][2] == "1.00" and cells[(0, 1)][5] == "sink"
    top = run_lm("inspect-attention", known_run, "--text", "abcdefg", "--head", "0", "--top", "1")
    lines = [line for line in top.stdout.splitlines() if "→" in line]
    assert "3 c" in lines[3] and "→ b @2 1.00" in lines[3]


def test_json_carries_every_weight(known_run: Path) -> None:
    result = run_lm("inspect-attention", known_run, "--text", "ab\tc", "--format", "json", "--layer", "all",
                    "--head", "all")
    data = json.loads(result.stdout)
    assert [t["text"] for t in data["tokens"]] == ["<|endoftext|>", "a", "b", "→", "c"]
    assert {(a["layer"], a["head"]) for a in data["attention"]} == {(0, 0), (0, 1)}
    for entry in data["attention"]:
        assert [len(row) for row in entry["weights"]] == [1, 2, 3, 4, 5]
        assert all(abs(sum(row) - 1) < 1e-5 for row in entry["weights"])
    csv_lines = run_lm("inspect-attention", known_run, "--text", "ab", "--format", "csv").stdout.splitlines()
    assert csv_lines[0] == "layer,head,query_position,query_token,key_position,key_token,weight"
    assert len(csv_lines) == 1 + 6  # 3 tokens: 1 + 2 + 3 weights, mean head


def test_heat_table_shows_tokens_visibly_and_escapes_markup(known_run: Path, tmp_path: Path) -> None:
    result = run_lm("inspect-attention", known_run, "--text", "[b]\n é", "--head", "0",
                    "--save", tmp_path / "a.svg", "--output", tmp_path / "a.txt")
    assert result.returncode == 0, result.stderr
    drawn = (tmp_path / "a.txt").read_text()
    for label in ("[", "b", "]", "↵", "·", "<0xC3>", "<0xA9>"):
        assert label in drawn
    assert "1.0" in drawn
    assert (tmp_path / "a.svg").read_text().startswith("<svg")


def test_long_text_uses_the_last_window_and_says_so(known_run: Path) -> None:
    result = run_lm("inspect-attention", known_run, "--text", "abcdefghijklmnop", "--top", "1")
    assert result.returncode == 0
    assert "first 9 tokens are left out" in result.stderr


BAD = {
    "empty text": (["--text", ""], "no text to look at"),
    "layer out of range": (["--text", "ab", "--layer", "3"], "layers 0 to 0"),
    "head out of range": (["--text", "ab", "--head", "7"], "heads 0 to 1"),
    "no shared token": (["--text", "abc", "--compare", "xyz"], "share no token"),
    "unknown format": (["--text", "ab", "--format", "xml"], "--format 'xml'"),
    "unwritable output": (["--text", "ab", "--output", "/proc/nope/out.txt"], "cannot write output"),
    "bad range": (["--text", "abc", "--range", "5:2"], "--range '5:2'"),
    "bad save suffix": (["--text", "ab", "--save", "x.png"], "must end in .svg or .html"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case: str, known_run: Path) -> None:
    args, needle = BAD[case]
    assert_one_line_error(run_lm("inspect-attention", known_run, *args), needle)


def test_embeddings_from_the_command_line(known_run: Path) -> None:
    result = run_lm("inspect-embeddings", known_run, "a", "--top", "3", "--context", "a cat")
    assert result.returncode == 0, result.stderr
    assert "nearest to" in result.stdout and "logit lens" in result.stdout and "block 0" in result.stdout
    assert_one_line_error(run_lm("inspect-embeddings", known_run, "z", "--context", "abc"),
                          "does not occur in the --context text")


@pytest.fixture(scope="module")
def gpt2_shaped_run(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer) -> Path:
    """12 layers x 12 heads (narrow, short context: the shape is what matters to the terminal views)."""
    run = tmp_path_factory.mktemp("twelve") / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=byte_tokenizer.vocab_size, context_length=32, n_layer=12, n_head=12,
                            d_model=48))
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    byte_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {"parameters": model.num_parameters()})
    return run


def test_twelve_by_twelve_heads_read_at_80_columns(gpt2_shaped_run: Path, byte_tokenizer) -> None:
    narrow = {"COLUMNS": "80"}
    grid = run_lm("inspect-attention", gpt2_shaped_run, "--text", "abcdefghij", "--layer", "all", "--head", "all",
                  env=narrow)
    assert grid.returncode == 0, grid.stderr
    lines = grid.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in grid.stdout
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", *(f"h{head}" for head in range(12))]  # one block: all 12 heads fit
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == [str(layer) for layer in range(12)]
    assert all(len(row) == 13 and all(re.fullmatch(r"[PISDbm](\.\d\d|1\.0|\d+(\.\d)?)", cell) for cell in row[1:])
               for row in rows)
    assert "P previous-token" in grid.stdout  # the legend of the short codes
    wide = rendered(_grid(twelve_maps(gpt2_shaped_run), list(range(12)), 200), 200)
    assert "broad" in wide and "P previous-token" not in wide  # room for whole names
    known = known_model(byte_tokenizer.vocab_size)
    for model, text in ((known, "abcdefg"), (load_run(gpt2_shaped_run)[0], "abcdefghij")):
        stats, maps = heads_summary(model, byte_tokenizer, text)
        summary = rendered([_summary_table(stats, len(maps.ids), 80)], 80)
        assert max(map(len, summary.splitlines())) <= 80 and "…" not in summary
        assert len(re.findall(r"^ *\d+ +\d+ +\d", summary, re.M)) == len(stats)
        if model is known:
            assert re.search(r"^ *0 +0 +\S+ +1\.00 .* prev *$", summary, re.M)


def twelve_maps(run: Path):
    model, tokenizer, _ = load_run(run)
    return attention_maps(model, tokenizer, "abcdefghij", range(12))


def rendered(renderables: list, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    for renderable in renderables:
        console.print(renderable)
    return console.export_text()


def test_many_heads_wrap_into_blocks(byte_tokenizer) -> None:

    from lm.cli.inspect_attention import _grid

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=byte_tokenizer.vocab_size, context_length=16, n_layer=2, n_head=32,
                            d_model=64)).eval()
    maps = attention_maps(model, byte_tokenizer, "abcdefgh", [0, 1])
    text = rendered(_grid(maps, list(range(32)), 80), 80)
    headers = [line.split() for line in text.splitlines() if line.lstrip().startswith("layer")]
    assert len(headers) >= 3 and sum(len(h) - 1 for h in headers) == 32  # every head once, in blocks
    assert max(map(len, text.splitlines())) <= 80
