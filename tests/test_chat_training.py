"""Chat fine-tuning's pieces below the trainer: masked targets in the loss, the sampler and the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm.chat import add_chat_tokens, render
from lm.data import BatchSampler, encode_conversations
from lm.eval import score_tokens
from lm.loss import IGNORE, head_cross_entropy
from lm.textfiles import find_text_files

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Who is Juliet?"},
                  {"role": "assistant", "content": "A Capulet, thirteen years old."}]},
    {"messages": [{"role": "system", "content": "Answer in verse."},
                  {"role": "user", "content": "And Romeo?"},
                  {"role": "assistant", "content": "A Montague who loves too fast."},
                  {"role": "user", "content": "Where?"},
                  {"role": "assistant", "content": "Verona, fair Verona, where we lay our scene."}]},
]


@pytest.fixture
def chat_tokenizer(sample_tokenizer):
    return add_chat_tokens(sample_tokenizer)


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("requires_grad", [True, False])
def test_ignored_targets_leave_the_loss_and_its_gradients(requires_grad: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (12,))
    targets[::3] = IGNORE
    with torch.set_grad_enabled(requires_grad):
        fused = head_cross_entropy(hidden, weight, targets)
    reference = F.cross_entropy(hidden.detach() @ weight.detach().T, targets, ignore_index=IGNORE)
    torch.testing.assert_close(fused.detach(), reference)
    if requires_grad:
        fused.backward()
        kept = targets != IGNORE
        assert hidden.grad[~kept].abs().max() == 0  # an ignored position teaches nothing
        assert hidden.grad[kept].abs().max() > 0


def test_a_batch_with_nothing_to_learn_gives_a_zero_loss_not_nan() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = head_cross_entropy(hidden, weight, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()


def test_conversations_become_one_stream_with_assistant_targets_only(tmp_path: Path, chat_tokenizer) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0], {"messages": [{"role": "bot", "content": "x"}]},
                                                 CONVERSATIONS[1]])
    from lm.textfiles import RecordProblems

    problems = RecordProblems()
    encoded = encode_conversations(find_text_files([path]), chat_tokenizer, 1000, problems)
    rendered = [render(record["messages"], chat_tokenizer) for record in CONVERSATIONS]
    assert encoded.tokens.tolist() == rendered[0].ids + rendered[1].ids
    assert encoded.learned.tolist() == rendered[0].mask + rendered[1].mask
    assert problems.bad == 1 and "chat.jsonl:2" in problems.first
    assert (encoded.counts.whole, encoded.counts.cut, encoded.counts.dropped) == (2, 0, 0)


def test_a_long_conversation_is_cut_and_one_too_long_is_counted_out(tmp_path: Path, chat_tokenizer) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    first_exchange = len(render(CONVERSATIONS[1]["messages"][:3], chat_tokenizer).ids)
    whole_first = len(render(CONVERSATIONS[0]["messages"], chat_tokenizer).ids)
    encoded = encode_conversations(find_text_files([path]), chat_tokenizer, max(first_exchange, whole_first))
    assert (encoded.counts.whole, encoded.counts.cut) == (1, 1)
    assert len(encoded.tokens) == whole_first + first_exchange


def test_the_sampler_ignores_every_target_the_mask_leaves_out() -> None:
    tokens = torch.arange(100)
    learned = torch.arange(100) % 5 == 0
    sampler = BatchSampler(tokens, 10, seed=0, learned=learned)
    inputs, targets = sampler.next_batch(8)
    assert torch.equal(inputs + 1, torch.where(targets == IGNORE, inputs + 1, targets))  # the shift holds
    assert torch.equal(targets != IGNORE, (inputs + 1) % 5 == 0)


def test_scores_count_only_the_learned_ids_each_read_in_its_context() -> None:
    torch.manual_seed(0)
    vocab = 12
    table = torch.randn(vocab, vocab)

    def model(ids: torch.Tensor, logits_from: int = 0) -> tuple[torch.Tensor, None]:
        return table[ids[:, logits_from:]], None  # a bigram model: logits depend on the input id only

    tokens = torch.randint(0, vocab, (40,))
    learned = torch.rand(40) < 0.4
    learned[0] = False
    byte_lengths = torch.ones(vocab, dtype=torch.long)
    scores = score_tokens(model, tokens, byte_lengths, 8, eot_id=None, learned=learned)
    losses = F.cross_entropy(table[tokens[:-1]], tokens[1:], reduction="none")
    assert scores.total.tokens == int(learned[1:].sum())
    assert scores.total.nats == pytest.approx(float(losses[learned[1:]].sum()), rel=1e-5)


def _conversations(path: Path, count: int, bad_line: int | None = None) -> Path:
    """`count` short conversations made from data/sample.txt's words (a third with a system prompt)."""
    import random

    from tests.conftest import SAMPLE

    words = SAMPLE.read_text(encoding="utf-8").split()
    chooser = random.Random(0)
    records: list[object] = []
    for index in range(count):
        messages = [{"role": "user", "content": "Say " + " ".join(chooser.sample(words, 3))},
                    {"role": "assistant", "content": " ".join(chooser.sample(words, 5)) + "."}]
        if index % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        records.append({"messages": messages})
    if bad_line is not None:
        records.insert(bad_line - 1, {"messages": [{"role": "bot", "content": "x"}]})
    return _write_jsonl(path, records)


def test_lm_train_fine_tunes_a_base_run_on_conversations(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lm.chat import CHAT_FORMAT_FILE, has_chat_tokens, load_chat_format
    from lm.tokenizer import Tokenizer
    from tests.conftest import SAMPLE, run_lm

    small = ["-T", "48", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "-B", "4"]
    base = tmp_path / "base"
    assert run_lm("train", SAMPLE, "--out", base, "--max-steps", "2", *small, "--vocab-size", "300").returncode == 0
    chats = _conversations(tmp_path / "chat.jsonl", 120, bad_line=7)
    run = tmp_path / "chat"
    result = run_lm("train", chats, "--init-from", base, "--out", run, "--max-steps", "3", "--eval-every", "3")
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "Chat tokens: <|system|>, <|user|>, <|assistant|>, <|end|> added as ids 300-303" in " ".join(printed.split())
    assert "chat.jsonl:7" in printed and "Conversations (training):" in printed
    assert load_chat_format(run) is not None and (run / CHAT_FORMAT_FILE).is_file()
    tokenizer = Tokenizer.from_file(run / "tokenizer.json")
    assert has_chat_tokens(tokenizer) and tokenizer.vocab_size == 304
    assert load_file(str(run / "model.safetensors"))["tok_emb.weight"].shape[0] == 304
    config = json.loads((run / "config.json").read_text())
    assert config["corpus"]["text_field"] == "messages" and config["chat"]["learned_tokens"] > 0
    scored = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in record for record in scored)
    _check_exports_carry_the_template(run, tokenizer, tmp_path)


def _check_exports_carry_the_template(run: Path, tokenizer, tmp_path: Path) -> None:
    """transformers renders the exported template to lm's ids; the GGUF file holds it and ends turns at <|end|>."""
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    from lm.chat import chat_token_ids
    from tests.conftest import run_lm

    assert run_lm("export", run, "--out", tmp_path / "hf").returncode == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    messages = CONVERSATIONS[1]["messages"][:4]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    assert list(rendered) == render(messages, tokenizer, add_generation_prompt=True).ids
    end = chat_token_ids(tokenizer).end
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert end in generation["eos_token_id"]
    assert run_lm("export", run, "--out", tmp_path / "chat.gguf", "--format", "gguf").returncode == 0
    fields = gguf.GGUFReader(tmp_path / "chat.gguf").fields
    template = fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == hf_tokenizer.chat_template
    eot = fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == end


def test_lm_train_learns_conversations_from_scratch_with_its_own_tokenizer(tmp_path: Path) -> None:
    from lm.chat import has_chat_tokens
    from lm.tokenizer import Tokenizer
    from tests.conftest import run_lm

    chats = _conversations(tmp_path / "chat.jsonl", 120)
    run = tmp_path / "run"
    result = run_lm("train", chats, "--out", run, "--max-steps", "2", "-T", "48", "--n-layer", "1", "--n-head",
                    "2", "--d-model", "16", "-B", "4", "--vocab-size", "300")
    assert result.returncode == 0, result.stderr
    assert has_chat_tokens(Tokenizer.from_file(run / "tokenizer.json"))
