from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from lm.config import WINDOW_ORDERS
from lm.data import (
    BatchSampler,
    Splits,
    check_splits,
    split_text,
    token_byte_lengths,
    token_storage,
    tokenize_corpus,
)
from lm.errors import InputError
from lm.textfiles import find_text_files


def test_corpus_is_the_files_separated_by_end_of_text(sample_tokenizer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First document.\n")
    (tmp_path / "b.txt").write_text("Second, with 日本 and emoji 🕯️\n")
    corpus = tokenize_corpus(find_text_files([tmp_path]), sample_tokenizer, cache_root=tmp_path / "cache")
    assert corpus.tokens.dtype == torch.uint16 and not corpus.reused
    ids = corpus.tokens.long().tolist()
    eot = sample_tokenizer.eot_id
    assert ids.count(eot) == 2 and ids[-1] == eot
    assert sample_tokenizer.decode(ids) == "First document.\n<|endoftext|>Second, with 日本 and emoji 🕯️\n<|endoftext|>"
    assert corpus.files == 2 and corpus.text_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.txt"))


def test_second_run_reuses_the_cache_until_the_text_changes(sample_tokenizer, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE.read_text())
    first = tokenize_corpus(find_text_files([text]), sample_tokenizer, cache_root=tmp_path / "cache")
    again = tokenize_corpus(find_text_files([text]), sample_tokenizer, cache_root=tmp_path / "cache")
    assert again.reused and again.path == first.path and torch.equal(again.tokens, first.tokens)
    text.write_text(SAMPLE.read_text() + "One more line.\n")
    changed = tokenize_corpus(find_text_files([text]), sample_tokenizer, cache_root=tmp_path / "cache")
    assert not changed.reused and changed.path != first.path


def test_a_half_written_cache_entry_is_not_trusted(sample_tokenizer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = tokenize_corpus(find_text_files([SAMPLE]), sample_tokenizer, cache_root=cache)
    expected = first.tokens.clone()  # the tensor maps the file, which is about to be cut short
    first.path.write_bytes(first.path.read_bytes()[:-6])  # as if the machine died mid-write
    again = tokenize_corpus(find_text_files([SAMPLE]), sample_tokenizer, cache_root=cache)
    assert not again.reused and torch.equal(again.tokens, expected)


def test_storage_width_follows_the_vocabulary() -> None:
    assert token_storage(65536) == (torch.uint16, "H")
    assert token_storage(65537) == (torch.uint32, "I")


def test_splits_need_a_training_window_and_a_validation_target() -> None:
    tokens = torch.arange(1000)
    assert check_splits(Splits(tokens[:900], tokens[900:]), context_length=16).val[0] == 900
    with pytest.raises(InputError, match="too short for one window of 129"):
        check_splits(Splits(tokens[:100], tokens[100:]), context_length=128)
    with pytest.raises(InputError, match="validation text is 1 token"):
        check_splits(Splits(tokens[:999], tokens[999:]), context_length=16)


def test_split_text_keeps_validation_out_of_training(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("three\n", encoding="utf-8")
    given = split_text([tmp_path], [tmp_path / "b.txt"], 0.5)
    assert given.train.files == [tmp_path / "a.txt"] and given.val.files == [tmp_path / "b.txt"]
    assert given.record["paths"] == [str((tmp_path / "b.txt").resolve())] and given.record["text_bytes"] == 6
    tail = split_text([tmp_path], None, 0.3)
    assert tail.record["fraction"] == 0.3 and tail.val.total_bytes + tail.train.total_bytes == 14


@pytest.mark.parametrize("order", WINDOW_ORDERS)
def test_batches_are_shifted_windows_and_resume_exactly(order: str) -> None:
    tokens = torch.arange(500, dtype=torch.int32)
    sampler = BatchSampler(tokens, context_length=8, seed=3, order=order)
    inputs, targets = sampler.next_batch(4)
    assert inputs.shape == targets.shape == (4, 8) and inputs.dtype == torch.long
    assert torch.equal(targets, inputs + 1)  # the next token, at every position
    for _ in range(20):  # into the second epoch (61 windows of 8 in 500 tokens), then stop mid-way
        sampler.next_batch(4)
    state = sampler.state_dict()
    expected = [sampler.next_batch(4) for _ in range(20)]
    other = BatchSampler(tokens, context_length=8, seed=99, order=order)  # the state brings the seed
    other.load_state_dict(state)
    for batch, wanted in zip((other.next_batch(4) for _ in range(20)), expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch, wanted, strict=True))


def test_an_epoch_reads_every_token_once_from_a_phase_of_its_own() -> None:
    tokens = torch.arange(1_000, dtype=torch.int32)  # a token's id is its place in the text
    sampler = BatchSampler(tokens, context_length=10, seed=7, order="epochs")
    phases, orders = set(), []
    for epoch in range(6):
        starts = sampler.epoch_starts(epoch, len(tokens) - 10)
        phase = int(starts.min())
        # Windows every 10 tokens from the phase to the end, each once: the text between them read once.
        assert torch.equal(starts.sort().values, torch.arange(phase, 990, 10))
        phases.add(phase)
        orders.append(starts)
    assert len(phases) > 2  # epoch after epoch the windows start elsewhere
    assert not torch.equal(orders[0][:5], orders[1][:5])  # and come in another order
    served = torch.cat([sampler.next_batch(7)[0][:, 0] for _ in range(30)])  # 210 windows: into epoch 3
    first, second = (len(orders[0]), len(orders[1]))
    assert torch.equal(served[:first], orders[0])  # a batch may span two epochs: the next one just begins
    assert torch.equal(served[first:first + second], orders[1])
    assert (sampler.epoch, sampler.served) == (2, 210 - first - second)
    fresh = BatchSampler(tokens, context_length=10, seed=7, order="epochs")
    fresh.load_state_dict({"generator": fresh.generator.get_state()})  # a checkpoint from before epochs were kept
    assert (fresh.epoch, fresh.served) == (0, 0)
    with pytest.raises(ValueError, match="order must be one of"):
        BatchSampler(tokens, context_length=10, seed=7, order="shuffled")


@pytest.mark.parametrize("order", WINDOW_ORDERS)
def test_each_rank_takes_its_slice_of_the_same_global_batch(order: str) -> None:
    tokens = torch.arange(10_000, dtype=torch.int32)
    whole, _ = BatchSampler(tokens, 16, seed=5, order=order).next_batch(8)
    halves = [BatchSampler(tokens, 16, seed=5, order=order).next_batch(4, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_repeated_windows_are_a_passage_twice_and_plain_ones_unchanged() -> None:
    tokens = torch.arange(10_000, dtype=torch.int32)  # a token's id is its place in the text
    plain = BatchSampler(tokens, context_length=64, seed=4).next_batch(64)
    inputs, targets = BatchSampler(tokens, context_length=64, seed=4, repeat_share=0.5).next_batch(64)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])  # still next-token pairs
    window = torch.cat([inputs, targets[:, -1:]], dim=1)  # the 65 tokens each row was cut from
    jumps = window[:, 1:] != window[:, :-1] + 1
    repeated = jumps.any(dim=1)
    assert 16 <= repeated.sum() <= 48  # about half, by chance
    assert (jumps.sum(dim=1) <= 1).all()  # one jump back at most: the copy then runs on as plain text
    passage = jumps[repeated].int().argmax(dim=1) + 1  # where the copy starts
    assert torch.equal(window[repeated, passage], window[repeated, 0])  # ...is the passage's start again
    assert passage.min() >= 64 // 16 and passage.max() <= 32  # from a sixteenth of the context to half
    assert len(passage.unique()) > 5  # each window its own length: no fixed offset to copy from
    assert torch.equal(inputs[:, 0], plain[0][:, 0])  # every window starts where it would without repeats
    always = BatchSampler(tokens, context_length=64, seed=4, repeat_share=1.0).next_batch(8)[0]
    assert (always[:, 1:] != always[:, :-1] + 1).any(dim=1).all()


@pytest.mark.parametrize("order", WINDOW_ORDERS)
def test_windows_reach_the_last_token(order: str) -> None:
    tokens = torch.arange(20, dtype=torch.int32)
    sampler = BatchSampler(tokens, context_length=18, seed=0, order=order)
    seen = torch.cat([sampler.next_batch(64)[1] for _ in range(4)])
    assert seen.max() == 19 and seen.min() >= 1


def test_special_tokens_have_no_bytes(sample_tokenizer) -> None:
    lengths = token_byte_lengths(sample_tokenizer)
    assert lengths[sample_tokenizer.eot_id] == 0
    assert lengths.sum() > 256 and (lengths[[i for i in range(len(lengths)) if i != sample_tokenizer.eot_id]] > 0).all()
