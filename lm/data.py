"""Text -> token ids on disk -> random training windows.

The corpus is encoded once, in small chunks (so memory stays flat however large it is), into a flat
array of ids written to the cache folder: uint16 when the vocabulary fits in 65,536 entries, uint32
otherwise. The file is named by a hash of the tokenizer and of every input file's bytes, so a second
run on the same text with the same tokenizer memory-maps it at once. Files are documents: each one is
followed by `<|endoftext|>`, so the model learns where a text ends and never confuses one with the next.
The cache also records how many ids each file became, so scores can be given per file.

Validation text is set aside as text, before any tokenizer is trained (`split_text`), and encoded on
its own: the model never trains on it. Training batches are windows of `context_length + 1` ids at
random offsets in the training ids (inputs, and the same shifted by one as targets), drawn from a
seeded generator whose state is saved with each checkpoint, so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import array
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm.atomic import atomic_open, atomic_write_text
from lm.cache import cache_dir
from lm.errors import InputError
from lm.textfiles import TextFiles, find_text_files, hold_out_tail, iter_text_chunks
from lm.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: per-file token counts
CHUNKS_PER_BATCH = 64  # ~256 kB of text per encode_batch call: parallel, yet small in memory


@dataclass
class TokenCorpus:
    """A tokenized corpus: all ids in one memory-mapped 1-D tensor."""

    tokens: torch.Tensor
    path: Path
    files: int
    text_bytes: int
    reused: bool  # True when the ids came from the cache
    part_tokens: list[int]  # ids per file (its closing <|endoftext|> included), in order


def corpus_key(sources: TextFiles, tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer and of the content (not the names) of the files (or parts), in order."""
    digest = hashlib.sha256(f"lm-tokens-v{FORMAT_VERSION}\n".encode())
    digest.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    for part in sources.parts:
        file_digest = hashlib.sha256(f"{part.size}\n".encode())
        with part.path.open("rb") as handle:
            handle.seek(part.start)
            left = part.size
            while left and (block := handle.read(min(1 << 20, left))):
                file_digest.update(block)
                left -= len(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:32]


def token_storage(vocab_size: int) -> tuple[torch.dtype, str]:
    """The smallest unsigned integer type that holds every id: (torch dtype, array typecode)."""
    return (torch.uint16, "H") if vocab_size <= 1 << 16 else (torch.uint32, "I")


def tokenize_corpus(
    sources: TextFiles,
    tokenizer: Tokenizer,
    on_progress: Callable[[int, int], None] | None = None,
    cache_root: Path | None = None,
) -> TokenCorpus:
    """Encode `sources` to ids, or reuse an earlier encoding of the same text by the same tokenizer."""
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
        part_tokens = _encode_to_file(sources, tokenizer, bin_path, typecode, on_progress)
        # The metadata is written last: its presence says the .bin beside it is complete.
        meta = {"version": FORMAT_VERSION, "count": sum(part_tokens), "files": len(sources.parts),
                "text_bytes": sources.total_bytes, "vocab_size": tokenizer.vocab_size, "part_tokens": part_tokens}
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    assert meta is not None
    tokens = torch.from_file(str(bin_path), shared=False, size=meta["count"], dtype=dtype)
    return TokenCorpus(tokens, bin_path, meta["files"], meta["text_bytes"], reused, meta["part_tokens"])


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def _encode_to_file(sources: TextFiles, tokenizer: Tokenizer, target: Path, typecode: str,
                    on_progress: Callable[[int, int], None] | None) -> list[int]:
    """Write the ids of every part, each followed by <|endoftext|>; return how many ids each part became."""
    part_tokens: list[int] = []
    done = 0

    def add_bytes(n: int) -> None:
        nonlocal done
        done += n

    with atomic_open(target) as out:
        for part in sources.parts:
            count = 1  # the closing <|endoftext|>
            for batch in _batches(iter_text_chunks([part], on_bytes=add_bytes), CHUNKS_PER_BATCH):
                ids = array.array(typecode)
                for encoded in tokenizer.encode_batch(batch):
                    ids.extend(encoded)
                ids.tofile(out)
                count += len(ids)
                if on_progress is not None:
                    on_progress(done, sources.total_bytes)
            array.array(typecode, [tokenizer.eot_id]).tofile(out)
            part_tokens.append(count)
    return part_tokens


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
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


@dataclass
class TextSplit:
    """The training text and the validation text, decided before any tokenizer sees either."""

    train: TextFiles
    val: TextFiles
    record: dict[str, Any]  # what the run directory keeps about it (config.json's "validation")


def split_text(paths: Sequence[str | Path], val_paths: Sequence[str | Path] | None, val_fraction: float,
               exclude: Sequence[Path] = ()) -> TextSplit:
    """With `val_paths`: exactly those files validate, and they are left out of training even if the
    training paths include them. Without: the last `val_fraction` of the text's bytes, cut at a line end."""
    if val_paths:
        val = find_text_files(val_paths, exclude=exclude)
        train = find_text_files(paths, exclude=[*exclude, *val.files])
        record: dict[str, Any] = {"paths": [str(p.resolve()) for p in val.files]}
    else:
        train, val = hold_out_tail(find_text_files(paths, exclude=exclude), val_fraction)
        first = val.parts[0]
        record = {"fraction": val_fraction, "starts_in": str(first.path.resolve()), "at_byte": first.start}
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
    """Random training windows; `state_dict()` captures where the sequence of batches stands."""

    def __init__(self, tokens: torch.Tensor, context_length: int, seed: int) -> None:
        self.tokens = tokens
        self.context_length = context_length
        self.generator = torch.Generator().manual_seed(seed)
        self._steps = torch.arange(context_length + 1)

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, (batch_size, context_length) each, as int64.

        Every process draws the offsets of the whole global batch (batch_size x world_size) from the
        same generator and keeps its own slice, so the windows do not depend on how many there are.
        """
        high = len(self.tokens) - self.context_length  # the last start that still has a target
        offsets = torch.randint(0, high, (batch_size * world_size,), generator=self.generator)
        mine = offsets[rank * batch_size:(rank + 1) * batch_size]
        windows = self.tokens[mine[:, None] + self._steps].long()
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens, which are not part of any text."""
    specials = set(tokenizer.special_tokens.values())
    return torch.tensor([0 if i in specials else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
