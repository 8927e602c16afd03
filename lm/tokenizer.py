"""Byte-level BPE: turning text into the integer ids a model reads, and back, losslessly.

A model cannot read characters; it reads ids from a fixed vocabulary. Byte-level BPE starts from the
256 possible byte values (so *any* text, in any script, with emoji or control characters, can be
written down) and then learns merges: the most frequent adjacent pair of tokens in the training text
becomes a new token, again and again, until the vocabulary reaches the size asked for. Frequent
words end up as single tokens; rare ones are spelled from smaller pieces.

Before counting pairs, text is split into chunks with the GPT-4 ("cl100k") pattern so merges never
cross a word, number or punctuation boundary; digits group in threes and whitespace attaches to the
following word. On Shakespeare at 8192 tokens this gives 3.65 bytes per token against 3.35 for the
GPT-2 pattern: fewer tokens for the same text means cheaper training and a longer effective context.

The file written is a standard Hugging Face `tokenizer.json`; `tokenizers.Tokenizer.from_file` loads it.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lm.atomic import atomic_write_text, prepare_output
from lm.errors import InputError, UsageError
from lm.textfiles import RecordProblems, TextFiles, iter_text_chunks

END_OF_TEXT = "<|endoftext|>"
# The GPT-4 split pattern: contractions, words (with one leading non-letter such as a space), numbers
# of up to three digits, punctuation runs, and whitespace that stays off the next word but one space.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-2's own split (its ByteLevel pre-tokenizer with use_regex): imported GPT-2 tokenizers use it.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BYTE_ALPHABET_SIZE = 256
# Checked through both encoders before the fast one is trusted: scripts, digits, emoji, odd spacing.
ENCODER_PROBE = ("The lamp's lit; we'll READ 12345 pages.\n\n\t  Ünïcödé: 日本語のテキスト, русский, عربى 🕯️🇫🇷\r\n"
                 "x  \n   y\u00a0z <|endoftext|> ''' ... !!! ???\n")

# Every HELD_OUT_EVERY-th line is kept out of training to measure bytes per token on unseen text.
HELD_OUT_EVERY = 50
HELD_OUT_MAX_CHARS = 1 << 18
EXAMPLE_TOKENS = 8


# A vocabulary sized to the text: one entry per BYTES_PER_VOCAB_ENTRY bytes, so that a learned token occurs
# about a hundred times in the training text on average; a token seen a handful of times gets an embedding
# the model cannot learn in a short run, and its share of the output head costs time on every step. On
# tinyshakespeare (1.0 MB) at the tiny preset's budget 2,048 tokens beat 1,024, 1,536, 3,072 and 8,192
# (docs/benchmarks.md, sweeps 19-21); the demo corpus (4.8 MB) keeps the 8,192 it was tuned with.
BYTES_PER_VOCAB_ENTRY = 500
SMALLEST_DEFAULT_VOCAB = 512
LARGEST_DEFAULT_VOCAB = 8192


def default_vocab_size(text_bytes: int) -> int:
    """The vocabulary to learn when none is asked for: text_bytes / 500, rounded to the nearest power of
    two (in log scale), kept within 512..8192. `text_bytes` counts compressed files decompressed
    (lm.textfiles.text_bytes)."""
    wanted = max(text_bytes, 1) / BYTES_PER_VOCAB_ENTRY
    power = 1 << max(round(math.log2(wanted)), 0)
    return min(max(power, SMALLEST_DEFAULT_VOCAB), LARGEST_DEFAULT_VOCAB)


@dataclass(frozen=True)
class TokenizerConfig:
    """What to learn: the vocabulary size (bytes + special tokens + merges) and how rare a merge may be."""

    vocab_size: int = 8192
    min_frequency: int = 2
    special_tokens: tuple[str, ...] = (END_OF_TEXT,)

    def __post_init__(self) -> None:
        specials = tuple(dict.fromkeys((END_OF_TEXT, *self.special_tokens)))  # keep order, drop repeats
        object.__setattr__(self, "special_tokens", specials)
        if any(not token or token.isspace() for token in specials):
            raise UsageError("a special token is empty or only whitespace; give a visible string such as <|sep|>")
        smallest = BYTE_ALPHABET_SIZE + len(specials)
        if self.vocab_size < smallest:
            raise UsageError(f"vocab size {self.vocab_size} is below {smallest} (256 byte tokens + "
                             f"{len(specials)} special); use --vocab-size {smallest} or more, 8192 is typical")
        if self.min_frequency < 1:
            raise UsageError(f"min frequency {self.min_frequency} must be at least 1; 2 is typical")


@dataclass
class TokenizerReport:
    """The numbers behind the summary printed after training."""

    vocab_size_requested: int
    vocab_size: int
    special_tokens: int
    min_frequency: int
    files: int
    input_bytes: int
    skipped: list[tuple[Path, str]]
    seconds: float
    sample_bytes: int
    sample_tokens: int
    sample_is_held_out: bool
    longest_tokens: list[bytes]
    bad_records: int = 0  # JSON Lines / Parquet records skipped (not JSON, no text field, not a string)
    first_bad_record: str = ""  # where and why the first one was bad

    @property
    def bytes_per_token(self) -> float:
        return self.sample_bytes / self.sample_tokens if self.sample_tokens else float("nan")

    @property
    def merges(self) -> int:
        return self.vocab_size - BYTE_ALPHABET_SIZE - self.special_tokens

    @property
    def vocab_shortfall(self) -> bool:
        """True when the text ran out of pairs seen `min_frequency` times before the size asked for."""
        return self.vocab_size < self.vocab_size_requested


class Tokenizer:
    """A byte-level BPE tokenizer: `decode(encode(text)) == text` for every string."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        # Text is text: a literal "<|endoftext|>" typed by a user or found in a corpus must not become
        # the control token. Special ids are inserted explicitly (see `encode(allow_special=True)`).
        self.hf.encode_special_tokens = True
        self.special_tokens: dict[str, int] = {
            added.content: token_id for token_id, added in hf.get_added_tokens_decoder().items() if added.special
        }
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")
            if self.special_tokens else None
        )
        self._batch_encoder: Callable[[list[str]], list[np.ndarray]] | None = None

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        """Load a tokenizer.json written by `lm train-tokenizer` (or any byte-level BPE one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path} does not exist; train one with `lm train-tokenizer`") from None
        except UnicodeDecodeError:
            raise InputError(f"{path} is not a tokenizer.json (not UTF-8 text); "
                             "train one with `lm train-tokenizer`") from None
        except OSError as err:
            raise InputError(f"cannot read tokenizer {path} ({err.strerror}); check the path") from None
        return cls.from_str(text, source=str(path))

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer") -> Tokenizer:
        try:
            spec = json.loads(text)
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # the Rust loader raises a bare Exception on bad JSON
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"{source} is not a tokenizer.json ({first_line}); "
                             "train one with `lm train-tokenizer`") from None
        model_type = (spec.get("model") or {}).get("type")
        decoder_type = (spec.get("decoder") or {}).get("type")
        if model_type != "BPE" or decoder_type != "ByteLevel":
            raise InputError(f"{source} is a {model_type} tokenizer with a {decoder_type} decoder; lm needs "
                             "byte-level BPE: train one with `lm train-tokenizer`")
        return cls(hf)

    def to_str(self) -> str:
        return self.hf.to_str(pretty=True)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write tokenizer.json atomically: a crash leaves the old file or the new one, never half of one."""
        prepare_output(path, overwrite=overwrite, what="tokenizer")
        atomic_write_text(path, self.to_str())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """Id of `<|endoftext|>`, which separates documents, or None if this tokenizer lacks it."""
        return self.special_tokens.get(END_OF_TEXT)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids for `text`. Special-token strings in it are plain text unless `allow_special`."""
        if not allow_special or self._special_split is None:
            return self.hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for index, part in enumerate(self._special_split.split(text)):
            if index % 2:  # re.split puts the captured separators at odd positions
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.hf.encode(part, add_special_tokens=False).ids)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of several texts at once, in parallel threads (special-token strings are text)."""
        return [encoding.ids for encoding in self.hf.encode_batch(texts, add_special_tokens=False)]

    def batch_encoder(self) -> Callable[[list[str]], list[np.ndarray]]:
        """A function from texts to their ids (uint32 arrays, special-token strings as text) for bulk encoding.

        When tiktoken is installed and can reproduce this tokenizer (a byte-level BPE with the GPT-4 or
        GPT-2 split, no normalizer), its encoder does the work: 3-4x faster per core than `tokenizers`
        on our corpus, with the same ids (checked on a probe text before it is trusted; BPE over the
        same merges and split gives the same tokens). Otherwise `tokenizers` encodes. Either releases
        the GIL while it encodes, so several threads can call it at once.
        """
        if self._batch_encoder is None:
            self._batch_encoder = _tiktoken_batch_encoder(self) or self._hf_batch_encode
        return self._batch_encoder

    @property
    def uses_tiktoken(self) -> bool:
        return self.batch_encoder() is not self._hf_batch_encode

    def _hf_batch_encode(self, texts: list[str]) -> list[np.ndarray]:
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast: no offsets (tokenizers 0.20+)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text for `ids`; special tokens come back as their strings, so nothing is lost."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (possibly part of a multi-byte UTF-8 character)."""
        token = self.hf.id_to_token(token_id)
        if token is None:
            raise InputError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if token in self.special_tokens:
            return token.encode("utf-8")
        table = _byte_of_char()
        return bytes(table[char] for char in token)


class TokenTextDecoder:
    """Token ids in, text out, one token at a time, never splitting a character.

    A token may end in the middle of a multi-byte UTF-8 character (an emoji spans 4 bytes, often 2-4
    tokens); decoding each token on its own would print replacement characters. The bytes of an
    incomplete character wait here for the tokens that complete it. Byte sequences that can never
    be valid UTF-8 (a model can produce them) come out as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def train_tokenizer(
    sources: TextFiles,
    config: TokenizerConfig,
    on_progress: Callable[[int, bool], None] | None = None,
) -> tuple[Tokenizer, TokenizerReport]:
    """Learn a byte-level BPE vocabulary from `sources`, streaming them in chunks of whole lines.

    `on_progress(bytes_read, reading_done)` is called after each chunk; once reading is done
    the trainer still computes its merges, which takes a moment on large inputs.
    """
    started = time.perf_counter()
    hf = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    held_out: list[str] = []
    problems = RecordProblems()
    fallback_sample: list[str] = []  # for inputs too short to hold anything out
    bytes_read = 0

    def count(n: int) -> None:
        nonlocal bytes_read
        bytes_read += n

    def training_text() -> Iterator[str]:
        lines_seen = held_chars = 0
        for chunk in iter_text_chunks(sources, on_bytes=count, problems=problems):
            lines = chunk.splitlines(keepends=True)
            if held_chars < HELD_OUT_MAX_CHARS:
                first = (HELD_OUT_EVERY - 1 - lines_seen) % HELD_OUT_EVERY
                held = lines[first::HELD_OUT_EVERY]
                del lines[first::HELD_OUT_EVERY]
                held_out.extend(held)
                held_chars += sum(map(len, held))
                lines_seen += len(lines) + len(held)
            # Whole chunks, not single lines, so runs of blank lines are learned as the text has them.
            kept = "".join(lines)
            if not fallback_sample:
                fallback_sample.append(kept)
            yield kept
            if on_progress is not None:
                on_progress(bytes_read, False)
        if on_progress is not None:
            on_progress(bytes_read, True)

    hf.train_from_iterator(training_text(), trainer)
    tokenizer = Tokenizer(hf)
    sample = held_out or fallback_sample
    report = TokenizerReport(
        vocab_size_requested=config.vocab_size,
        vocab_size=tokenizer.vocab_size,
        special_tokens=len(tokenizer.special_tokens),
        min_frequency=config.min_frequency,
        files=len(sources.files),
        input_bytes=bytes_read,
        skipped=list(sources.skipped),
        seconds=time.perf_counter() - started,
        sample_bytes=sum(len(line.encode("utf-8")) for line in sample),
        # Line by line: one Encoding for the whole sample would cost ~100 bytes of memory per token.
        sample_tokens=sum(len(tokenizer.encode(line)) for line in sample),
        sample_is_held_out=bool(held_out),
        longest_tokens=_longest_tokens(tokenizer, EXAMPLE_TOKENS),
        bad_records=problems.bad,
        first_bad_record=problems.first,
    )
    return tokenizer, report


def _tiktoken_batch_encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]] | None:
    """tiktoken's encoder over this tokenizer's merges, or None when tiktoken is missing or cannot match it.

    tiktoken ranks tokens by their bytes and merges the adjacent pair whose joined bytes rank lowest;
    giving merge i the rank 256 + i (single bytes: their value) makes that the merge order `tokenizers`
    follows. Ranks then map back to this tokenizer's ids through a table.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer.to_str())
    pattern = _split_pattern(spec)
    model = spec.get("model") or {}
    if pattern is None or spec.get("normalizer") or model.get("dropout") or model.get("ignore_merges"):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    table = _byte_of_char()
    ranks: dict[bytes, int] = {}
    rank_to_id = []
    for char, byte in sorted(table.items(), key=lambda item: item[1]):
        if char not in vocab:
            return None
        ranks[bytes([byte])] = byte
        rank_to_id.append(vocab[char])
    for merge in model.get("merges") or []:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = left + right
        key = bytes(table[char] for char in token)
        if token not in vocab or key in ranks:
            return None
        ranks[key] = len(rank_to_id)
        rank_to_id.append(vocab[token])
    # Special tokens are named so that tiktoken's search for them looks for something: with none, it
    # tries an empty pattern at every character and runs at half speed. They stay text (none is allowed).
    specials = {}
    for text, token_id in tokenizer.special_tokens.items():
        specials[text] = len(rank_to_id)
        rank_to_id.append(token_id)
    encoding = tiktoken.Encoding("lm", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    ids = np.asarray(rank_to_id, dtype=np.uint32)

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [ids[encoding.encode_to_numpy(text, disallowed_special=())] for text in texts]

    probe = [ENCODER_PROBE, ENCODER_PROBE[::-1]]
    if [a.tolist() for a in encode(probe)] != [a.tolist() for a in tokenizer._hf_batch_encode(probe)]:
        return None
    return encode


def _split_pattern(spec: dict) -> str | None:
    """The regex a byte-level BPE tokenizer.json splits text with, if it is one tiktoken can use as is."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps else {}
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    if len(steps) == 1:
        return GPT2_SPLIT_PATTERN if byte_level.get("use_regex", True) else None
    split = steps[0]
    if (len(steps) != 2 or split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("use_regex", True)):
        return None
    return (split.get("pattern") or {}).get("Regex")


def _new_byte_level_bpe() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        # use_regex=False: the split above already did the chunking; this step only maps bytes to chars.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


def _longest_tokens(tokenizer: Tokenizer, count: int) -> list[bytes]:
    """The longest learned tokens that hold a letter or digit: the words BPE found worth a token."""
    specials = set(tokenizer.special_tokens.values())
    learned = (tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size) if i not in specials)
    wordy = [b for b in learned if any(ch.isalnum() for ch in b.decode("utf-8", errors="ignore"))]
    return sorted(wordy, key=len, reverse=True)[:count]


@cache
def _byte_of_char() -> dict[str, int]:
    """Invert the byte-level alphabet: each byte is stored as one printable character.

    Bytes that are already printable Latin-1 characters stand for themselves; the other 68 (controls,
    space, a few odd ones) are moved to code points 256 and up, in byte order. This is the GPT-2 scheme
    that `tokenizers`' ByteLevel pre-tokenizer uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = sorted(set(range(BYTE_ALPHABET_SIZE)) - set(printable))
    for offset, byte in enumerate(shifted):
        table[chr(BYTE_ALPHABET_SIZE + offset)] = byte
    return table


VISIBLE_WHITESPACE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def _hex_bytes(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError)
    return "".join(f"<0x{b:02X}>" for b in err.object[err.start:err.end]), err.end


codecs.register_error("lm-hex-bytes", _hex_bytes)


def visible_text(data: bytes) -> str:
    """Show a token's bytes so that nothing is invisible or ambiguous in a terminal.

    Spaces, newlines, tabs and carriage returns become `·`, `↵`, `→` and `␍`; other control characters
    and bytes that are not (yet) a complete UTF-8 character become `<0xNN>`.
    """
    text = data.decode("utf-8", errors="lm-hex-bytes")
    return "".join(VISIBLE_WHITESPACE.get(ch) or (_control_hex(ch) if _is_control(ch) else ch) for ch in text)


def enclosing_characters(data: bytes, start: int, end: int) -> str:
    """The whole characters of UTF-8 `data` that bytes `start:end` belong to.

    A token may hold part of a character (CJK characters and emoji take 3-4 bytes and rare ones are
    split over several tokens); this names the character each such piece is part of.
    """
    def is_continuation(index: int) -> bool:
        return index < len(data) and data[index] & 0xC0 == 0x80

    while start > 0 and is_continuation(start):
        start -= 1
    while is_continuation(end):
        end += 1
    return data[start:end].decode("utf-8", errors="lm-hex-bytes")


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def _control_hex(char: str) -> str:
    return "".join(f"<0x{b:02X}>" for b in char.encode("utf-8"))
