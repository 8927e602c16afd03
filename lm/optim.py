"""Optimizers and the learning-rate schedule, over steps or over a time budget.

AdamW (the default) moves every weight by its gradient's running mean over the square root of its
running variance. Muon (`--optimizer muon`, PyTorch's `torch.optim.Muon`) treats each hidden weight
matrix as a whole: it orthogonalises the momentum of the gradient (a few Newton-Schulz iterations)
so that every direction of the matrix moves by a similar amount, which trains transformers' hidden
layers in fewer steps. Muon applies only to 2-D matrices inside the blocks; embeddings, the output
head, norms and biases stay on AdamW, as is standard. Its learning rate is adjusted to match AdamW's
update size (`adjust_lr_fn="match_rms_adamw"`), so one `--lr` serves both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lm.config import TrainConfig


def make_optimizers(model: nn.Module, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers of a run: [AdamW], or [Muon for hidden matrices, AdamW for the rest]."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = ([p for name, p in named if p.dim() == 2 and name.startswith("blocks.")]
              if config.optimizer == "muon" else [])
    chosen = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in chosen]
    # Weight decay on matrices only: decaying biases and norm gains just hurts.
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass (CUDA, and CPUs since torch 2.4).
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
        fused=device.type in ("cuda", "cpu"))]
    if hidden:
        optimizers.insert(0, torch.optim.Muon(hidden, lr=config.lr * config.muon_lr_scale,
                                              weight_decay=config.weight_decay, momentum=0.95,
                                              adjust_lr_fn="match_rms_adamw"))
        optimizers[0].param_groups[0]["lr_scale"] = config.muon_lr_scale
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over `warmup_steps` to `lr`, then a decay to `lr x min_lr_ratio` at the end.

    The end is `max_steps`, or with a time budget the moment training must stop (`progress` is then the
    share of that time spent, 0..1). The decay is a cosine, or with `warmdown` > 0 a constant `lr`
    followed by a straight line down over that last share of the run.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if progress is None:
        span = max(1, config.max_steps - config.warmup_steps)
        progress = (step - config.warmup_steps) / span
    progress = min(1.0, max(0.0, progress))
    floor = config.lr * config.min_lr_ratio
    if config.warmdown > 0:
        down = min(1.0, (1.0 - progress) / config.warmdown)
        return floor + (config.lr - floor) * down
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))
