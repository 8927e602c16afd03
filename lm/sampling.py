"""Choosing the next token from the model's scores: pure functions on logits.

The model gives a score (logit) to every token in the vocabulary; softmax turns scores into
probabilities. Sampling draws from them; the controls below reshape them first, in this order:

1. repetition penalty: tokens already in the text lose some of their score (divided by the penalty
   when positive, multiplied when negative, as in the CTRL paper), discouraging loops;
2. temperature: scores are divided by it: below 1 sharpens the distribution, above 1 flattens it, and 0
   means always take the most likely token (exact argmax, no division);
3. top-k: only the k highest-scoring tokens stay candidates;
4. top-p (nucleus): only the most likely tokens whose probabilities add up to p stay;
5. min-p: only tokens at least min_p times as likely as the most likely one stay.

Ties at a cut-off are kept together, so the result never depends on an arbitrary order among equal
scores. Removed tokens get a score of -inf (probability 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    def validate(self) -> SamplingConfig:
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be 0 or more (0: always the likeliest token), got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UsageError(f"--min-p must be in [0, 1) (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UsageError(f"--repetition-penalty must be positive (1 = off), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Lower the scores of tokens marked in `seen` (a boolean mask shaped like `logits`)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores in each row (and any tied with the k-th); k <= 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    sorted_probs, _ = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    kept = before < p
    # The least likely probability still kept; everything at least that likely stays (ties together).
    threshold = sorted_probs.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the likeliest token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def shape_logits(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the controls in order (see the module docstring); the result is for softmax and sampling."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = logits / config.temperature
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of (batch, vocab) `logits`."""
    shaped = shape_logits(logits, config, seen)
    if config.greedy:
        return shaped.argmax(dim=-1)
    return torch.multinomial(shaped.softmax(dim=-1), 1, generator=generator).squeeze(-1)
