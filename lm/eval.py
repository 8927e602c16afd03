"""Scoring a model on text: loss per token, perplexity and bits per byte, with sliding windows.

One function scores both the validation text while `lm train` runs and any text given to `lm eval`,
so the number a run reports is the number `lm eval` gives on the same text.

The text's ids are the training stream's: each document (file) is followed by `<|endoftext|>`, and the
stream starts with one as well, so the first word of the text is predicted as a document start is in
training. Every id after the first is scored exactly once, by the windows of the model's context:

- the first window covers ids 0..T (T = the context length) and scores all T of its targets;
- each further window moves on by the stride S (T/2 by default) and scores only its last S targets,
  which therefore see at least T - S ids of context; the last window is pulled back to end at the
  text's end, scoring whatever the previous ones left.

Bits per byte divide the nats of text tokens by ln 2 x the bytes they spell: a figure that does not
depend on the tokenizer, so models with different vocabularies compare. `<|endoftext|>` spells no text:
its nats count in the loss per token but not in bits per byte.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.errors import InputError, UsageError
from lm.textfiles import TextFiles


@dataclass
class Score:
    """Sums over the scored ids of one text (or one file of it)."""

    tokens: int = 0  # ids scored
    nats: float = 0.0  # cross-entropy summed over every scored id
    text_nats: float = 0.0  # the same over ids that spell text (not special tokens)
    text_bytes: int = 0  # bytes spelled by the scored ids

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token, in nats."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.text_nats / (math.log(2) * self.text_bytes) if self.text_bytes else float("nan")


@dataclass
class Scores:
    total: Score
    parts: list[Score]  # one per document, in order (empty when no part lengths were given)
    windows: int  # windows scored
    stride: int
    inputs: int  # ids fed through the model (windows x their length)


@dataclass(frozen=True)
class WindowPlan:
    """Where each window starts in the stream, and the first of its targets it scores."""

    starts: torch.Tensor  # (windows,) int64
    first_scored: torch.Tensor  # (windows,) int64, index into the window's targets
    length: int  # inputs per window
    stride: int


def plan_windows(stream_length: int, context_length: int, stride: int | None = None) -> WindowPlan:
    """Windows that score every id after the first exactly once, each with as much context as fits."""
    stride = stride or max(1, context_length // 2)
    if not 1 <= stride <= context_length:
        raise UsageError(f"--stride must be between 1 and the context length {context_length}, got {stride}")
    targets = stream_length - 1
    if targets < 1:
        raise InputError("the text is too short to score: it needs at least two tokens; give more text")
    length = min(context_length, targets)
    # Window k's last target is ends[k]; it scores the targets after ends[k - 1].
    ends = torch.cat([torch.arange(length, targets, stride), torch.tensor([targets])])
    starts = ends - length
    previous = torch.cat([torch.tensor([0]), ends[:-1]])
    first = previous - starts  # targets of window k are ids starts[k]+1 .. ends[k]
    return WindowPlan(starts, first.clamp(min=0), length, stride)


def scoring_stream(tokens: torch.Tensor, eot_id: int | None) -> torch.Tensor:
    """The ids to score: the text's stream, after one <|endoftext|> when the tokenizer has it."""
    if eot_id is None:
        return tokens
    return torch.cat([torch.tensor([eot_id], dtype=tokens.dtype), tokens])


@torch.no_grad()
def score_tokens(
    model: Callable[..., tuple[torch.Tensor, object]],
    tokens: torch.Tensor,
    byte_lengths: torch.Tensor,
    context_length: int,
    *,
    eot_id: int | None,
    part_tokens: Sequence[int] = (),
    stride: int | None = None,
    batch_size: int = 16,
    max_windows: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    learned: torch.Tensor | None = None,
) -> Scores:
    """Score `model` on a token stream (a `TokenCorpus`'s ids: documents each closed by <|endoftext|>).

    `model(ids, logits_from=k)` must return logits for positions k.. of `ids` (as `GPT` does).
    `byte_lengths[id]` is the bytes of text an id spells (0 for special tokens), on the model's device.
    `part_tokens` splits the stream into documents for per-file scores. `max_windows` scores an evenly
    spread subset of the windows (a quicker estimate, as during training); None scores them all.
    `learned` (bool, aligned with `tokens`) scores only those ids: a conversation's assistant turns,
    read with everything before them as context, the way chat fine-tuning learns them.
    """
    device = byte_lengths.device
    stream = scoring_stream(tokens, eot_id)
    if learned is not None:
        learned = torch.cat([torch.zeros(len(stream) - len(tokens), dtype=torch.bool), learned.bool()])
    plan = plan_windows(len(stream), context_length, stride)
    chosen = torch.arange(len(plan.starts))
    if max_windows is not None and max_windows < len(chosen):
        chosen = torch.linspace(0, len(chosen) - 1, max(1, max_windows)).round().long().unique()
    # Part p covers stream positions [bounds[p], bounds[p + 1]); the leading <|endoftext|> joins part 0.
    offset = 1 if eot_id is not None else 0
    bounds = torch.tensor([0, *torch.tensor(list(part_tokens), dtype=torch.long).cumsum(0).add(offset).tolist()])
    n_parts = max(1, len(part_tokens))
    sums = torch.zeros(3, n_parts, dtype=torch.float64, device=device)  # nats, text nats, text bytes
    counts = torch.zeros(n_parts, dtype=torch.long, device=device)
    steps = torch.arange(plan.length + 1)
    done = 0
    for batch in chosen.split(batch_size):
        starts, first = plan.starts[batch], plan.first_scored[batch]
        windows = stream[starts[:, None] + steps].long().to(device)
        skip = int(first.min())
        logits, _ = model(windows[:, :-1], logits_from=skip)
        targets = windows[:, 1 + skip:]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        losses = losses.view_as(targets).double()
        column = torch.arange(skip, plan.length)
        positions = starts[:, None] + 1 + column[None, :]  # where each target sits in the stream
        scored = column[None, :] >= first[:, None]
        if learned is not None:
            scored &= learned[positions]
        scored = scored.to(device)
        part = (torch.searchsorted(bounds, positions, right=True) - 1).clamp(0, n_parts - 1).to(device)
        lengths = byte_lengths[targets]
        is_text = scored & (lengths > 0)
        part, scored_part = part.flatten(), scored.flatten()
        sums[0].index_add_(0, part, (losses * scored).flatten())
        sums[1].index_add_(0, part, (losses * is_text).flatten())
        sums[2].index_add_(0, part, (lengths * is_text).flatten().double())
        counts.index_add_(0, part, scored_part.long())
        done += len(batch)
        if on_progress is not None:
            on_progress(done, len(chosen))
    per_part = [Score(int(counts[p]), float(sums[0, p]), float(sums[1, p]), int(sums[2, p])) for p in range(n_parts)]
    total = Score(sum(s.tokens for s in per_part), sum(s.nats for s in per_part),
                  sum(s.text_nats for s in per_part), sum(s.text_bytes for s in per_part))
    return Scores(total, per_part if part_tokens else [], len(chosen), plan.stride, len(chosen) * plan.length)


@dataclass
class RunScore:
    """One run's scores on one text, with what is needed to compare it with other runs."""

    run: Path
    parameters: int
    vocab_size: int
    context_length: int
    files: list[Path]
    file_bytes: list[int]
    scores: Scores
    seconds: float  # scoring only (the forward passes), not loading or encoding
    bad_records: int = 0  # JSON Lines / Parquet records of the text skipped as unreadable
    first_bad_record: str = ""

    @property
    def tokens_per_s(self) -> float:
        """Ids fed through the model per second (each window's context included)."""
        return self.scores.inputs / self.seconds if self.seconds else float("nan")


def score_run(
    run_dir: Path,
    sources: TextFiles,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    stride: int | None = None,
    quantize: str = "none",
    cache_root: Path | None = None,
    on_encode: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunScore:
    """Score the model of `run_dir` on `sources`, encoded with the run's own tokenizer (and cached).

    `quantize="int8"` scores the model as `lm generate --quantize int8` runs it (int8 linear layers).
    """
    from lm.checkpoint import load_run
    from lm.data import token_byte_lengths, tokenize_corpus
    from lm.device import autocast, resolve_device, resolve_dtype

    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive whole number, got {batch_size}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if quantize not in ("none", "int8"):
        raise UsageError(f"--quantize {quantize!r} is not one of: none, int8")
    model, tokenizer, info = load_run(run_dir, torch_device)
    if quantize == "int8":
        from lm.int8 import quantize_int8

        model = quantize_int8(model.eval())
    corpus = tokenize_corpus(sources, tokenizer, on_encode, cache_root=cache_root)
    byte_lengths = token_byte_lengths(tokenizer).to(torch_device)
    started = time.perf_counter()
    with autocast(torch_device, torch_dtype):
        scores = score_tokens(model, corpus.tokens, byte_lengths, info.model.context_length,
                              eot_id=tokenizer.eot_id, part_tokens=corpus.part_tokens, stride=stride,
                              batch_size=batch_size, on_progress=on_progress)
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
    return RunScore(run_dir, model.num_parameters(), info.model.vocab_size, info.model.context_length,
                    sources.files, sources.sizes, scores, time.perf_counter() - started, corpus.bad_records,
                    corpus.first_bad_record)
