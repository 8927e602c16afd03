"""Text -> token ids on disk -> random training windows.

The corpus is encoded once, in small chunks (so memory stays flat however large it is), into a flat
array of ids written to the cache folder: uint16 when the vocabulary fits in 65,536 entries, uint32
otherwise. The file is named by a hash of the tokenizer and of every input file's bytes, so a second
run on the same text with the same tokenizer memory-maps it at once. Files are documents: each one is
followed by `<|endoftext|>`, so the model learns where a text ends and never confuses one with the next.

The last `val_fraction` of the ids (5% by default) is the validation split; the model never trains on
it. Training batches are windows of `context_length + 1` ids at random offsets in the training split
(inputs, and the same shifted by one as targets), drawn from a seeded generator whose state is saved
with each checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.atomic import atomic_open, atomic_write_text
from lm.cache import cache_dir
from lm.errors import InputError
from lm.textfiles import TextFiles, iter_text_chunks
from lm.tokenizer import Tokenizer

FORMAT_VERSION = 1
CHUNKS_PER_BATCH = 64  # ~256 kB of text per encode_batch call: parallel, yet small in memory


@dataclass
class TokenCorpus:
    """A tokenized corpus: all ids in one memory-mapped 1-D tensor."""

    tokens: torch.Tensor
    path: Path
    files: int
    text_bytes: int
    reused: bool  # True when the ids came from the cache


def corpus_key(sources: TextFiles, tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer and of the content (not the names) of the files, in order."""
    digest = hashlib.sha256(f"lm-tokens-v{FORMAT_VERSION}\n".encode())
    digest.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    for path in sources.files:
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                file_digest.update(block)
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
        count = _encode_to_file(sources, tokenizer, bin_path, typecode, on_progress)
        # The metadata is written last: its presence says the .bin beside it is complete.
        meta = {"version": FORMAT_VERSION, "count": count, "files": len(sources.files),
                "text_bytes": sources.total_bytes, "vocab_size": tokenizer.vocab_size}
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    assert meta is not None
    tokens = torch.from_file(str(bin_path), shared=False, size=meta["count"], dtype=dtype)
    return TokenCorpus(tokens, bin_path, meta["files"], meta["text_bytes"], reused)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def _encode_to_file(sources: TextFiles, tokenizer: Tokenizer, target: Path, typecode: str,
                    on_progress: Callable[[int, int], None] | None) -> int:
    count = 0
    done = 0

    def add_bytes(n: int) -> None:
        nonlocal done
        done += n

    with atomic_open(target) as out:
        for path in sources.files:
            for batch in _batches(iter_text_chunks([path], on_bytes=add_bytes), CHUNKS_PER_BATCH):
                ids = array.array(typecode)
                for encoded in tokenizer.encode_batch(batch):
                    ids.extend(encoded)
                ids.tofile(out)
                count += len(ids)
                if on_progress is not None:
                    on_progress(done, sources.total_bytes)
            array.array(typecode, [tokenizer.eot_id]).tofile(out)
            count += 1
    return count


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


def split_tokens(tokens: torch.Tensor, val_fraction: float, context_length: int) -> Splits:
    """The first (1 - val_fraction) of the ids for training, the rest for validation.

    Raises `InputError` when either part is too short to hold a single window of context + 1 ids.
    """
    window = context_length + 1
    n_val = math.ceil(len(tokens) * val_fraction)
    if n_val < window or len(tokens) - n_val < window:
        needed = math.ceil(max(window / val_fraction, window / (1 - val_fraction)))
        raise InputError(f"the corpus is {len(tokens):,} tokens, too short for windows of {window} with "
                         f"{val_fraction:.0%} held out for validation (at least {needed:,} needed); "
                         "give more text or a smaller --context-length")
    cut = len(tokens) - n_val
    return Splits(train=tokens[:cut], val=tokens[cut:])


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


def eval_windows(tokens: torch.Tensor, context_length: int, count: int) -> torch.Tensor:
    """Up to `count` windows of context + 1 ids spread evenly over `tokens`: the same every time."""
    window = context_length + 1
    last_start = len(tokens) - window
    count = max(1, min(count, last_start // context_length + 1))
    starts = torch.linspace(0, last_start, count).round().long()
    return tokens[starts[:, None] + torch.arange(window)].long()


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens, which are not part of any text."""
    specials = set(tokenizer.special_tokens.values())
    return torch.tensor([0 if i in specials else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
