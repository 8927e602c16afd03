"""Text -> token ids on disk -> random training windows.

The corpus is encoded once, in small chunks (so memory stays flat however large it is), into a flat
array of ids written to the cache folder: uint16 when the vocabulary fits in 65,536 entries, uint32
otherwise. Encoding runs in a pool of threads, one per core (the encoders release the GIL), over
batches of chunks read ahead a few at a time and written back in order. The file is named by a hash
of the tokenizer and of every input file's bytes, so a second run on the same text with the same
tokenizer costs that hash and memory-maps the ids at once. Documents (text files, JSON Lines or
Parquet records, read by `lm.textfiles.iter_pieces`) are each followed by `<|endoftext|>`, so the
model learns where a text ends and never confuses one with the next. The cache also records how
many ids each file became, so scores can be given per file.

Validation text is set aside as text, before any tokenizer is trained (`split_text`), and encoded on
its own: the model never trains on it. Training batches are windows of `context_length + 1` ids at
random offsets in the training ids (inputs, and the same shifted by one as targets), drawn from a
seeded generator whose state is saved with each checkpoint, so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.atomic import atomic_open, atomic_write_text
from lm.cache import cache_dir
from lm.chat import CutCounts
from lm.config import WINDOW_ORDERS
from lm.errors import InputError
from lm.loss import IGNORE
from lm.textfiles import (
    TEXT,
    TEXT_FIELD,
    Piece,
    RecordProblems,
    TextFiles,
    find_text_files,
    hold_out_tail,
    iter_pieces,
)
from lm.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: per-file token counts
CHUNKS_PER_BATCH = 64  # ~256 kB of text per task: worth a thread's time, yet small in memory
BATCHES_AHEAD = 2  # batches in flight per thread: enough to keep every core busy, memory still flat


@dataclass
class TokenCorpus:
    """A tokenized corpus: all ids in one memory-mapped 1-D tensor."""

    tokens: torch.Tensor
    path: Path
    files: int
    text_bytes: int
    reused: bool  # True when the ids came from the cache
    part_tokens: list[int]  # ids per file (its closing <|endoftext|> included), in order
    bad_records: int = 0  # JSON Lines / Parquet records skipped as unreadable
    first_bad_record: str = ""  # where and why the first one was bad


def corpus_key(sources: TextFiles, tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer and of the content (not the names) of the files (or parts), in order.

    A part that is not plain text adds its format (and the records it covers) to the hash, and a corpus
    with records the text field, since the same bytes read another way are another text.
    """
    digest = hashlib.sha256(f"lm-tokens-v{FORMAT_VERSION}\n".encode())
    digest.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    if sources.has_records:
        digest.update(f"text field {sources.text_field}\n".encode())
    for part in sources.parts:
        start, size = (part.start, part.size) if part.records is None else (0, part.path.stat().st_size)
        file_digest = hashlib.sha256(f"{size}\n".encode())
        if part.format != TEXT:
            file_digest.update(f"{part.format} {part.records}\n".encode())
        with part.path.open("rb") as handle:
            handle.seek(start)
            left = size
            while left and (block := handle.read(min(1 << 20, left))):
                file_digest.update(block)
                left -= len(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:32]


def token_storage(vocab_size: int) -> tuple[torch.dtype, str]:
    """The smallest unsigned integer type that holds every id: (torch dtype, array typecode)."""
    return (torch.uint16, "H") if vocab_size <= 1 << 16 else (torch.uint32, "I")


def encode_threads() -> int:
    """Threads to encode with: $LM_ENCODE_THREADS, else every core this process may use."""
    if explicit := os.environ.get("LM_ENCODE_THREADS"):
        return max(1, int(explicit))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def tokenize_corpus(
    sources: TextFiles,
    tokenizer: Tokenizer,
    on_progress: Callable[[int, int], None] | None = None,
    cache_root: Path | None = None,
    threads: int | None = None,
) -> TokenCorpus:
    """Encode `sources` to ids, or reuse an earlier encoding of the same text by the same tokenizer.

    `on_progress(bytes_read, total_bytes)` follows the encoding; `threads` defaults to `encode_threads()`.
    """
    if tokenizer.eot_id is None:
        raise InputError("the tokenizer has no <|endoftext|> token to separate documents; "
                         "train one with `lm train-tokenizer`")
    folder = cache_root if cache_root is not None else cache_dir() / "tokens"
    key = corpus_key(sources, tokenizer)
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    dtype, typecode = token_storage(tokenizer.vocab_size)
    meta = _read_meta(meta_path)
    reused = meta is not None and bin_path.is_file() and bin_path.stat().st_size == meta["count"] * dtype.itemsize
    if not reused:
        folder.mkdir(parents=True, exist_ok=True)
        problems = RecordProblems()
        part_tokens = _encode_to_file(sources, tokenizer, bin_path, np.dtype(typecode), on_progress, problems,
                                      threads or encode_threads())
        # The metadata is written last: its presence says the .bin beside it is complete.
        meta = {"version": FORMAT_VERSION, "count": sum(part_tokens), "files": len(sources.parts),
                "text_bytes": sources.total_bytes, "vocab_size": tokenizer.vocab_size, "part_tokens": part_tokens,
                "bad_records": problems.bad, "first_bad_record": problems.first}
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    assert meta is not None
    tokens = (torch.from_file(str(bin_path), shared=False, size=meta["count"], dtype=dtype) if meta["count"]
              else torch.zeros(0, dtype=dtype))
    return TokenCorpus(tokens, bin_path, meta["files"], meta["text_bytes"], reused, meta["part_tokens"],
                       meta.get("bad_records", 0), meta.get("first_bad_record", ""))


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def _encode_to_file(sources: TextFiles, tokenizer: Tokenizer, target: Path, dtype: np.dtype,
                    on_progress: Callable[[int, int], None] | None, problems: RecordProblems,
                    threads: int) -> list[int]:
    """Write the ids of every document, each followed by <|endoftext|>; return how many ids each part became.

    Batches of pieces are encoded by `threads` threads while the reader reads ahead at most
    `BATCHES_AHEAD` batches per thread; results are written in order as they come back.
    """
    encode = tokenizer.batch_encoder()
    eot = np.asarray([tokenizer.eot_id], dtype=dtype)
    part_tokens = [0] * len(sources.parts)
    done = 0

    def add_bytes(n: int) -> None:
        nonlocal done
        done += n

    def write(out: Any, batch: list[Piece], encoded: list[np.ndarray], bytes_done: int) -> None:
        arrays = []
        for (part, _, ends_document), ids in zip(batch, encoded, strict=True):
            arrays.append(ids)
            part_tokens[part] += len(ids)
            if ends_document:
                arrays.append(eot)
                part_tokens[part] += 1
        np.concatenate(arrays).astype(dtype, copy=False).tofile(out)
        if on_progress is not None:
            on_progress(bytes_done, sources.total_bytes)

    pieces = iter_pieces(sources, on_bytes=add_bytes, problems=problems)
    in_flight: deque[tuple[list[Piece], Future[list[np.ndarray]], int]] = deque()
    with atomic_open(target) as out, ThreadPoolExecutor(threads, thread_name_prefix="lm-encode") as pool:
        for batch in _batches(pieces, CHUNKS_PER_BATCH):
            if len(in_flight) >= threads * BATCHES_AHEAD:
                write(out, *_finished(in_flight.popleft()))
            in_flight.append((batch, pool.submit(encode, [text for _, text, _ in batch]), done))
        while in_flight:
            write(out, *_finished(in_flight.popleft()))
    return part_tokens


def _finished(entry: tuple[list[Piece], Future[list[np.ndarray]], int]) -> tuple[list[Piece], list[np.ndarray], int]:
    batch, future, bytes_done = entry
    return batch, future.result(), bytes_done


def _batches(items: Iterator[Piece], size: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Splits:
    train: torch.Tensor
    val: torch.Tensor
    # Conversations only (`encode_conversations`): which ids are learned targets, aligned with the ids.
    train_mask: torch.Tensor | None = None
    val_mask: torch.Tensor | None = None
    conversations: ConversationCounts | None = None


@dataclass
class ConversationCounts:
    """What became of the conversations of a chat fine-tuning run, for its start-up lines."""

    train: CutCounts
    val: CutCounts
    bad_records: int = 0
    first_bad_record: str = ""


@dataclass
class ConversationTokens:
    """Rendered conversations end to end: ids, and which of them the model learns (assistant turns)."""

    tokens: torch.Tensor  # (n,) int64
    learned: torch.Tensor  # (n,) bool: ids[i] is a target the loss counts
    counts: CutCounts


def encode_conversations(sources: TextFiles, tokenizer: Tokenizer, max_tokens: int,
                         problems: RecordProblems | None = None) -> ConversationTokens:
    """The `messages` records of `sources` rendered (lm/chat.py), cut to `max_tokens` ids at turn
    boundaries, and laid end to end as one stream, the way documents are for pretraining.

    Kept in memory, not cached on disk: conversation sets for fine-tuning are small, and rendering
    them is quick next to training on them.
    """
    from lm.chat import read_conversations, render_conversations

    counts = CutCounts()
    ids: list[int] = []
    learned: list[bool] = []
    for rendered in render_conversations(read_conversations(sources, problems), tokenizer, max_tokens, counts):
        ids.extend(rendered.ids)
        learned.extend(rendered.mask)
    if not ids:
        raise InputError(f"no conversation fits in {max_tokens - 1} tokens ({counts.dropped:,} left out, each "
                         "longer than the context with its first exchange); raise --context-length")
    return ConversationTokens(torch.tensor(ids, dtype=torch.long), torch.tensor(learned), counts)


def tokenize_conversation_split(text: TextSplit, tokenizer: Tokenizer, context_length: int) -> Splits:
    """Training and validation ids and targets of conversation records (chat fine-tuning)."""
    problems = RecordProblems()
    train = encode_conversations(text.train, tokenizer, context_length + 1, problems)
    val = encode_conversations(text.val, tokenizer, context_length + 1, problems)
    counts = ConversationCounts(train.counts, val.counts, problems.bad, problems.first or "")
    return Splits(train.tokens, val.tokens, train.learned, val.learned, counts)


@dataclass
class TextSplit:
    """The training text and the validation text, decided before any tokenizer sees either."""

    train: TextFiles
    val: TextFiles
    record: dict[str, Any]  # what the run directory keeps about it (config.json's "validation")


def split_text(paths: Sequence[str | Path], val_paths: Sequence[str | Path] | None, val_fraction: float,
               exclude: Sequence[Path] = (), text_field: str = TEXT_FIELD) -> TextSplit:
    """With `val_paths`: exactly those files validate, and they are left out of training even if the
    training paths include them. Without: the last `val_fraction` of the text's bytes, cut at a line end
    (between whole records in JSON Lines, gzip and Parquet files; see `hold_out_tail`)."""
    if val_paths:
        val = find_text_files(val_paths, exclude=exclude, text_field=text_field)
        train = find_text_files(paths, exclude=[*exclude, *val.files], text_field=text_field)
        record: dict[str, Any] = {"paths": [str(p.resolve()) for p in val.files]}
    else:
        train, val = hold_out_tail(find_text_files(paths, exclude=exclude, text_field=text_field), val_fraction)
        first = val.parts[0]
        record = {"fraction": val_fraction, "starts_in": str(first.path.resolve()), "at_byte": first.start}
        if first.records is not None:
            record["at_record"] = first.records[0]  # a gzip line or Parquet row: the byte is only approximate
    record.update(files=len(val.parts), text_bytes=val.total_bytes)
    return TextSplit(train, val, record)


def tokenize_split(text: TextSplit, tokenizer: Tokenizer, cache_root: Path | None = None) -> Splits:
    """The training and validation ids of `text` (each encoded once and cached)."""
    return Splits(train=tokenize_corpus(text.train, tokenizer, cache_root=cache_root).tokens,
                  val=tokenize_corpus(text.val, tokenizer, cache_root=cache_root).tokens)


def check_splits(splits: Splits, context_length: int) -> Splits:
    """Raise `InputError` unless the training ids hold one window of context + 1 and validation a target."""
    window = context_length + 1
    if len(splits.train) < window:
        raise InputError(f"the training text is {len(splits.train):,} tokens, too short for one window of "
                         f"{window}; give more text or a smaller --context-length")
    if len(splits.val) < 2:
        raise InputError(f"the validation text is {len(splits.val):,} token(s), too short to score; "
                         "give more text, a larger --val-fraction, or --val FILES")
    return splits


class BatchSampler:
    """Training windows, in epochs or at random; `state_dict()` captures where the sequence of batches stands.

    `order` "epochs": each epoch tiles the text with windows that do not overlap, from a random phase (so
    that, epoch after epoch, windows start everywhere), and serves them in a random order; the next epoch
    starts when every window of this one has been served. Every token is then read once per epoch. With
    "random" (nanoGPT's way) each window starts anywhere, independently: after k passes' worth of windows a
    token has been read k times on average but, by chance, some never and others twice as often (Poisson:
    at 4 passes, 2% not once and 21% six times or more). On a small text seen several times over the evenly
    read one trains better (docs/benchmarks.md, sweep 25). An epoch's phase and order come from the seed and
    the epoch's number, so the state is the seed and two counters, and every process of a multi-process
    run, which draws the whole global batch and keeps its slice, draws the same.

    With `repeat_share` > 0 that share of the windows (drawn at random) is a passage and the same passage
    again, the text going on after the copy. Each window draws its passage's length, from a sixteenth of the
    context to half of it: at one fixed length a head could predict the copy from position alone (look back
    that many tokens) instead of finding the earlier occurrence. Natural text seldom repeats within a context,
    so the one thing induction heads do (find the earlier occurrence of the current token and predict what
    followed it) pays off on few tokens and forms slowly; repeated passages reward it on up to half a window
    (`lm train --repeat-windows`, docs/inspection.md). Validation windows are never repeated.
    """

    def __init__(self, tokens: torch.Tensor, context_length: int, seed: int,
                 learned: torch.Tensor | None = None, repeat_share: float = 0.0, order: str = "random") -> None:
        if order not in WINDOW_ORDERS:
            raise ValueError(f"order must be one of {WINDOW_ORDERS}, got {order!r}")
        self.tokens = tokens
        self.learned = learned  # conversations: targets outside it become IGNORE (see lm/loss.py)
        self.context_length = context_length
        self.repeat_share = repeat_share
        self.order, self.seed = order, seed
        self.epoch, self.served = 0, 0  # "epochs": the current epoch and how many of its windows are served
        self._epoch_starts: tuple[int, torch.Tensor] | None = None  # (epoch, its shuffled window starts)
        self.generator = torch.Generator().manual_seed(seed)
        self._steps = torch.arange(context_length + 1)
        self._passage_lengths = (max(1, context_length // 16), max(1, (context_length + 1) // 2))

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, (batch_size, context_length) each, as int64.

        Every process draws the offsets of the whole global batch (batch_size x world_size) from the
        same generator and keeps its own slice, so the windows do not depend on how many there are.
        """
        high = len(self.tokens) - self.context_length  # the last start that still has a target
        offsets = (self._next_in_epochs(batch_size * world_size, high) if self.order == "epochs"
                   else torch.randint(0, high, (batch_size * world_size,), generator=self.generator))
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        positions = offsets[mine, None] + self._steps
        if self.repeat_share > 0:  # drawn only then: runs without it keep the sequence of batches they had
            repeated = torch.rand(batch_size * world_size, generator=self.generator)[mine] < self.repeat_share
            shortest, longest = self._passage_lengths
            passage = torch.randint(shortest, longest + 1, (batch_size * world_size, 1), generator=self.generator)[mine]
            # The passage (its first `passage` tokens), then the text again from the passage's start.
            copied = self._steps - passage * (self._steps >= passage)
            positions = torch.where(repeated[:, None], offsets[mine, None] + copied, positions)
        windows = self.tokens[positions].long()
        targets = windows[:, 1:]
        if self.learned is not None:
            targets = targets.masked_fill(~self.learned[positions[:, 1:]], IGNORE)
        return windows[:, :-1], targets

    def epoch_starts(self, epoch: int, high: int) -> torch.Tensor:
        """The window starts of `epoch`, in the order it serves them: every `context_length` tokens from its
        phase, shuffled; both drawn from a generator of its own, seeded by the run's seed and the epoch."""
        if self._epoch_starts is None or self._epoch_starts[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            phase = int(torch.randint(0, min(self.context_length, high), (1,), generator=generator))
            starts = torch.arange(phase, high, self.context_length)
            self._epoch_starts = (epoch, starts[torch.randperm(len(starts), generator=generator)])
        return self._epoch_starts[1]

    def _next_in_epochs(self, count: int, high: int) -> torch.Tensor:
        taken: list[torch.Tensor] = []
        while count > 0:
            starts = self.epoch_starts(self.epoch, high)
            part = starts[self.served:self.served + count]
            taken.append(part)
            count -= len(part)
            self.served += len(part)
            if self.served == len(starts):
                self.epoch, self.served = self.epoch + 1, 0
        return torch.cat(taken)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "seed": torch.tensor(self.seed),
                "epoch": torch.tensor(self.epoch), "served": torch.tensor(self.served)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        # A checkpoint from before epochs were kept (random windows only) starts them afresh.
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.served = int(state.get("epoch", 0)), int(state.get("served", 0))
        self._epoch_starts = None


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens, which are not part of any text."""
    specials = set(tokenizer.special_tokens.values())
    return torch.tensor([0 if i in specials else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
