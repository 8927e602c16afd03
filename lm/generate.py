"""Text generation: run the model, pick a next token from its probabilities, append it, repeat.

This first version re-reads the whole (cropped) context at every step; it serves the short samples
printed during training.
"""

from __future__ import annotations

import torch

from lm.model import GPT


@torch.no_grad()
def sample_ids(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt`, sampled with a temperature from the `top_k` likeliest each time."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.config.context_length:])
        logits = logits[0, -1].float().cpu() / temperature
        if 0 < top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == stop_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new
