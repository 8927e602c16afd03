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
