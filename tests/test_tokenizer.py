from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from conftest import SAMPLE
from hypothesis import given
from hypothesis import strategies as st

from lm.errors import InputError, UsageError
from lm.textfiles import find_text_files
from lm.tokenizer import (
    END_OF_TEXT,
    HELD_OUT_EVERY,
    Tokenizer,
    TokenizerConfig,
    default_vocab_size,
    enclosing_characters,
    train_tokenizer,
    visible_text,
)


@given(st.text())
def test_any_text_round_trips(sample_tokenizer: Tokenizer, text: str) -> None:
    ids = sample_tokenizer.encode(text)
    assert sample_tokenizer.decode(ids) == text
    assert b"".join(sample_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=50).map(lambda s: s.encode("utf-8")))
def test_visible_text_never_leaves_whitespace_or_controls(data: bytes) -> None:
    shown = visible_text(data)
    assert not any(ch in shown for ch in " \n\t\r\x00\x1b\x7f")


@pytest.mark.parametrize("text", [
    "emoji 😀 and a family 👩‍👩‍👧 and a flag 🇳🇴",
    "CJK 日本語のテキスト，中文文本，한국어",
    "combining e\u0301 a\u0308 and precomposed é ä",
    "windows\r\nline\r\nendings\r\n",
    "tabs\tin\t\tthe middle\t",
    "NUL \x00 and other controls \x01\x07\x1b[31m\x7f\x85",
    "   leading spaces and trailing   ",
    " ",
    "\n\n\n",
    "",
    f"a literal {END_OF_TEXT} is text",
    "'s 'T 're 'LL numbers 1234567 3.14159",
])
def test_hard_cases_round_trip(sample_tokenizer: Tokenizer, text: str) -> None:
    assert sample_tokenizer.decode(sample_tokenizer.encode(text)) == text


def test_end_of_text_is_special_but_only_when_allowed(sample_tokenizer: Tokenizer) -> None:
    eot = sample_tokenizer.eot_id
    assert eot is not None
    assert sample_tokenizer.token_bytes(eot) == END_OF_TEXT.encode()
    text = f"one{END_OF_TEXT}two"
    assert eot not in sample_tokenizer.encode(text)
    ids = sample_tokenizer.encode(text, allow_special=True)
    assert ids.count(eot) == 1
    assert sample_tokenizer.decode(ids) == text


def test_extra_special_tokens(tmp_path: Path) -> None:
    config = TokenizerConfig(vocab_size=300, special_tokens=("<|sep|>", END_OF_TEXT, "<|sep|>"))
    assert config.special_tokens == (END_OF_TEXT, "<|sep|>")
    tok, report = train_tokenizer(find_text_files([SAMPLE]), config)
    assert set(tok.special_tokens) == {END_OF_TEXT, "<|sep|>"}
    assert report.special_tokens == 2
    assert tok.encode("a<|sep|>b", allow_special=True)[1] == tok.special_tokens["<|sep|>"]


def test_split_pattern_groups_digits_in_threes_and_keeps_words_apart(sample_tokenizer: Tokenizer) -> None:
    pieces = [p for p, _ in sample_tokenizer.hf.pre_tokenizer.pre_tokenize_str("don't 1234567 hello,world")]
    # ByteLevel shows a space as Ġ. A word takes one leading non-letter (",world"); the GPT-2 pattern
    # would have kept "1234567" whole.
    assert pieces == ["don", "'t", "Ġ", "123", "456", "7", "Ġhello", ",world"]


def test_saved_file_is_a_standard_tokenizer_json(sample_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    sample_tokenizer.save(path)
    plain = tokenizers.Tokenizer.from_file(str(path))
    text = "MARGERY.\nSet the ladder there, against the third post. 🕯️"
    assert plain.encode(text).ids == sample_tokenizer.encode(text)
    assert plain.decode(plain.encode(text).ids) == text
    assert Tokenizer.from_file(path).encode(text) == sample_tokenizer.encode(text)
    assert Tokenizer.from_file(tmp_path).vocab_size == sample_tokenizer.vocab_size  # a folder holding one


def test_loading_something_else_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"is not a tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    (tmp_path / "wl.json").write_text(wordlevel.to_str())
    with pytest.raises(InputError, match="lm needs byte-level BPE"):
        Tokenizer.from_file(tmp_path / "wl.json")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"vocab_size": 256}, "below 257"),
    ({"vocab_size": 258, "special_tokens": ("<a>", "<b>")}, "below 259"),
    ({"min_frequency": 0}, "at least 1"),
    ({"special_tokens": ("  ",)}, "empty or only whitespace"),
])
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TokenizerConfig(**kwargs)


def test_report_numbers_match_an_independent_count(tmp_path: Path) -> None:
    progress: list[tuple[int, bool]] = []
    tok, report = train_tokenizer(find_text_files([SAMPLE]), TokenizerConfig(vocab_size=400),
                                  on_progress=lambda n, done: progress.append((n, done)))
    size = SAMPLE.stat().st_size
    assert report.input_bytes == size and report.files == 1
    assert progress[-1] == (size, True)
    assert report.vocab_size == tok.vocab_size == 400
    assert report.merges == 400 - 256 - 1
    saved = json.loads(tok.to_str())
    assert len(saved["model"]["vocab"]) == 400
    # The held-out sample is every 50th line; count its bytes and tokens here from scratch.
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > 2 * HELD_OUT_EVERY
    held_out = lines[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    assert report.sample_is_held_out
    assert report.sample_bytes == sum(len(line.encode()) for line in held_out)
    assert report.sample_tokens == sum(len(tok.encode(line)) for line in held_out)
    assert report.bytes_per_token == pytest.approx(report.sample_bytes / report.sample_tokens)
    assert 1.5 < report.bytes_per_token < 6
    assert len(report.longest_tokens) == 8
    assert all(len(b) >= len(report.longest_tokens[-1]) for b in report.longest_tokens)


def test_a_small_text_stops_short_of_the_vocab_asked_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("to be or not to be\n")
    tok, report = train_tokenizer(find_text_files([path]), TokenizerConfig(vocab_size=1000))
    assert report.vocab_shortfall and tok.vocab_size < 1000
    assert not report.sample_is_held_out  # one line: nothing to hold out, measured on training text
    assert report.bytes_per_token > 1


@pytest.mark.parametrize(("text_bytes", "vocab"), [
    (0, 512), (20_000, 512), (300_000, 512), (400_000, 1024),  # small texts: the smallest default
    (1_003_854, 2048),  # tinyshakespeare's training 90%
    (1_500_000, 4096), (4_840_000, 8192), (10**9, 8192),  # the demo corpus and beyond: the largest
])
def test_the_default_vocabulary_grows_with_the_text_as_a_power_of_two(text_bytes: int, vocab: int) -> None:
    assert default_vocab_size(text_bytes) == vocab


def test_visible_text_and_enclosing_characters() -> None:
    assert visible_text(b" a\n\tb\r") == "·a↵→b␍"
    assert visible_text("日".encode()[:2]) == "<0xE6><0x97>"
    assert visible_text(b"\x00\x1b[1m") == "<0x00><0x1B>[1m"
    data = "x日y".encode()
    assert enclosing_characters(data, 2, 3) == "日"
    assert enclosing_characters(data, 0, 1) == "x"


def test_the_help_states_the_default_vocabulary_rule_as_the_code_applies_it() -> None:
    """The CLI's help note is written out (importing lm.tokenizer would slow every `--help`): it must agree."""
    from lm.cli.train_tokenizer import VOCAB_SIZE_DEFAULT
    from lm.tokenizer import BYTES_PER_VOCAB_ENTRY, LARGEST_DEFAULT_VOCAB, SMALLEST_DEFAULT_VOCAB

    assert f"one token per {BYTES_PER_VOCAB_ENTRY} bytes" in VOCAB_SIZE_DEFAULT
    assert f"{SMALLEST_DEFAULT_VOCAB}-{LARGEST_DEFAULT_VOCAB}" in VOCAB_SIZE_DEFAULT
    assert f"{default_vocab_size(1_000_000)} for 1 MB" in VOCAB_SIZE_DEFAULT
