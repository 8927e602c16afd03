"""Optimizers and the learning-rate schedule, over steps or over a time budget.

AdamW (the default) moves every weight by its gradient's running mean over the square root of its
running variance. Muon (`--optimizer muon`, PyTorch's `torch.optim.Muon`) treats each hidden weight
matrix as a whole: it orthogonalises the momentum of the gradient (a few Newton-Schulz iterations)
so that every direction of the matrix moves by a similar amount, which trains transformers' hidden
layers in fewer steps. Muon applies only to 2-D matrices inside the blocks; embeddings, the output
head, norms and biases stay on AdamW, as is standard. Its learning rate is adjusted to match AdamW's
update size (`adjust_lr_fn="match_rms_adamw"`), so one `--lr` serves both. On a CPU its matrices are
orthogonalised in batches of same-shaped matrices (`BatchedMuon`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lm.config import TrainConfig

try:  # the learning-rate adjustment torch.optim.Muon applies to each matrix, by its shape
    from torch.optim._muon import _adjust_lr
except ImportError:  # a PyTorch whose Muon is laid out otherwise: BatchedMuon steps as plain Muon
    _adjust_lr = None
# BatchedMuon's step uses these two parts of torch.optim.Muon's own; without either it is plain Muon.
_BATCHABLE = _adjust_lr is not None and hasattr(torch.optim.Muon, "_init_group")


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
        optimizers.insert(0, BatchedMuon(hidden, lr=config.lr * config.muon_lr_scale,
                                          weight_decay=config.weight_decay, momentum=0.95,
                                          ns_steps=config.muon_ns_steps, adjust_lr_fn="match_rms_adamw"))
        optimizers[0].param_groups[0]["lr_scale"] = config.muon_lr_scale
    return optimizers


class BatchedMuon(torch.optim.Muon):
    """PyTorch's Muon whose Newton-Schulz iterations run, on a CPU, over all same-shaped matrices at once.

    On a CPU Muon's cost is its Newton-Schulz iterations: fifteen bfloat16 products per matrix, which at
    the small presets' sizes cost PyTorch more in calling than in arithmetic (a 128 x 384 product: 50-60
    us, of which oneDNN's own kernel is ~20 us, measured). The tiny preset's 20 matrices come in two
    shapes once the tall ones are turned on their side, so this step stacks each shape's updates and
    runs the iterations as batched products: the same products matrix by matrix (a batched product
    rounds each matrix exactly as a single one does, measured on this CPU), in a twentieth of the calls.
    Everything else is `torch.optim.Muon`'s own: its momentum, Nesterov, weight decay, learning-rate
    adjustment, coefficients and state, so checkpoints and resumes are unchanged. On a GPU, or with a
    PyTorch whose Muon is laid out otherwise, it is plain `torch.optim.Muon`.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        params = [p for group in self.param_groups for p in group["params"]]
        if not _BATCHABLE or any(p.device.type != "cpu" for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            momentum_buffers: list[torch.Tensor] = []
            self._init_group(group, with_grad, grads, momentum_buffers)
            if not with_grad:
                continue
            momentum = group["momentum"]
            torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, momentum_buffers, momentum) if group["nesterov"] else momentum_buffers
            orthogonal = newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            torch._foreach_mul_(with_grad, 1 - lr * group["weight_decay"])
            for param, update in zip(with_grad, orthogonal, strict=True):
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def newton_schulz(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> list[torch.Tensor]:
    """`torch.optim.Muon`'s orthogonalisation of each matrix, computed for each shape in one stack.

    As PyTorch does for one matrix: in bfloat16, tall matrices turned on their side, each divided by its
    own norm (so its largest singular value is at most 1), then `steps` quintic iterations
    X <- a X + (b A + c A^2) X with A = X X^T, which push every singular value towards 1.
    """
    a, b, c = coefficients
    lowered = [u.bfloat16() for u in updates]
    norms = torch._foreach_norm(lowered)  # each in its own layout, as torch.optim.Muon takes it
    tall = [u.size(0) > u.size(1) for u in updates]
    wide = [u.mT if turn else u for u, turn in zip(lowered, tall, strict=True)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, matrix in enumerate(wide):
        by_shape.setdefault(tuple(matrix.shape), []).append(index)
    orthogonal: list[torch.Tensor] = list(wide)
    for indices in by_shape.values():
        x = torch.stack([wide[i] for i in indices])
        x.div_(torch.stack([norms[i] for i in indices]).clamp(min=eps).view(-1, 1, 1))
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, matrix in zip(indices, x, strict=True):
            orthogonal[i] = matrix.mT if tall[i] else matrix
    return orthogonal


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
