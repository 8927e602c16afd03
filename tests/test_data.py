from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from lm.data import (
    BatchSampler,
    eval_windows,
    split_tokens,
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


def test_split_and_its_limits() -> None:
    tokens = torch.arange(1000)
    splits = split_tokens(tokens, 0.1, context_length=16)
    assert len(splits.val) == 100 and len(splits.train) == 900
    assert splits.val[0] == 900  # the end of the corpus is held out
    with pytest.raises(InputError, match="too short for windows of 129"):
        split_tokens(tokens, 0.05, context_length=128)


def test_batches_are_shifted_windows_and_resume_exactly() -> None:
    tokens = torch.arange(500, dtype=torch.int32)
    sampler = BatchSampler(tokens, context_length=8, seed=3)
    inputs, targets = sampler.next_batch(4)
    assert inputs.shape == targets.shape == (4, 8) and inputs.dtype == torch.long
    assert torch.equal(targets, inputs + 1)  # the next token, at every position
    state = sampler.state_dict()
    expected = sampler.next_batch(4)
    other = BatchSampler(tokens, context_length=8, seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.next_batch(4), expected, strict=True))


def test_each_rank_takes_its_slice_of_the_same_global_batch() -> None:
    tokens = torch.arange(10_000, dtype=torch.int32)
    whole, _ = BatchSampler(tokens, 16, seed=5).next_batch(8)
    halves = [BatchSampler(tokens, 16, seed=5).next_batch(4, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_windows_reach_the_last_token() -> None:
    tokens = torch.arange(20, dtype=torch.int32)
    sampler = BatchSampler(tokens, context_length=18, seed=0)
    seen = torch.cat([sampler.next_batch(64)[1] for _ in range(4)])
    assert seen.max() == 19 and seen.min() >= 1


def test_eval_windows_are_fixed_and_in_range() -> None:
    tokens = torch.arange(1000, dtype=torch.int32)
    windows = eval_windows(tokens, context_length=32, count=10)
    assert windows.shape == (10, 33)
    assert windows[0, 0] == 0 and windows[-1, -1] == 999
    assert torch.equal(windows, eval_windows(tokens, 32, 10))
    assert eval_windows(tokens[:40], 32, 10).shape == (1, 33)


def test_special_tokens_have_no_bytes(sample_tokenizer) -> None:
    lengths = token_byte_lengths(sample_tokenizer)
    assert lengths[sample_tokenizer.eot_id] == 0
    assert lengths.sum() > 256 and (lengths[[i for i in range(len(lengths)) if i != sample_tokenizer.eot_id]] > 0).all()
