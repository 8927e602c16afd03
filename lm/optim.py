"""Optimizers and the learning-rate schedule, over steps or over a time budget.

AdamW (the default) moves every weight by its gradient's running mean over the square root of its
running variance. Muon (`--optimizer muon`, PyTorch's `torch.optim.Muon`) treats each hidden weight
matrix as a whole: it orthogonalises the momentum of the gradient (a few Newton-Schulz iterations)
so that every direction of the matrix moves by a similar amount, which trains transformers' hidden
layers in fewer steps. Muon applies only to 2-D matrices inside the blocks; embeddings, the output
head, norms and biases stay on AdamW, as is standard. Its learning rate is adjusted to match AdamW's
update size (`adjust_lr_fn="match_rms_adamw"`), so one `--lr` serves both. On a CPU its matrices are
orthogonalised in batches of same-shaped matrices (`BatchedMuon`), in bfloat16 where this CPU
multiplies bfloat16 faster than float32 and in float32 elsewhere (`newton_schulz_dtype`, measured).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from lm import cpu_choices
from lm.config import TrainConfig

try:  # the learning-rate adjustment torch.optim.Muon applies to each matrix, by its shape
    from torch.optim._muon import _adjust_lr
except ImportError:  # a PyTorch whose Muon is laid out otherwise: BatchedMuon steps as plain Muon
    _adjust_lr = None
# torch.optim.Muon's default quintic coefficients (a, b, c), what the precision probe iterates with.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# BatchedMuon's step uses these two parts of torch.optim.Muon's own; without either it is plain Muon.
_BATCHABLE = _adjust_lr is not None and hasattr(torch.optim.Muon, "_init_group")

NS_DTYPE_ENV = "LM_MUON_NS_DTYPE"
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# bfloat16 must win by this much to be chosen: float32 is the more exact of the two, so a near tie goes to it.
NS_BFLOAT16_MARGIN = 0.8
# A probe times one iteration over at most this many FLOPs' worth of the stack (at least one matrix).
NS_PROBE_FLOPS = 2**28
_ns_choices = cpu_choices.MeasuredChoices("cpu-newton-schulz.json", NS_DTYPE_ENV, tuple(NS_DTYPES))


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
    adjustment, coefficients and state, so checkpoints and resumes are unchanged. The iterations run
    in bfloat16, as PyTorch's do, only where this CPU multiplies bfloat16 fast (`newton_schulz_dtype`):
    a CPU with AVX2 only has no bfloat16 arithmetic and ran them 41x slower than float32. On a GPU, or
    with a PyTorch whose Muon is laid out otherwise, it is plain `torch.optim.Muon`.
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

    def choose_precisions(self) -> dict[str, str]:
        """Each stack's Newton-Schulz precision ('20x128x384' -> 'float32'), decided now (measured where not yet
        known); {} where the step is torch.optim.Muon's own (bfloat16)."""
        if not _BATCHABLE or any(p.device.type != "cpu" for group in self.param_groups for p in group["params"]):
            return {}
        chosen = {}
        for group in self.param_groups:
            for (rows, columns), indices in stacks([p.shape for p in group["params"]]).items():
                dtype = newton_schulz_dtype(len(indices), rows, columns)
                chosen[f"{len(indices)}x{rows}x{columns}"] = str(dtype).removeprefix("torch.")
        return chosen


def newton_schulz(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: Callable[[int, int, int], torch.dtype] | None = None) -> list[torch.Tensor]:
    """`torch.optim.Muon`'s orthogonalisation of each matrix, computed for each shape in one stack.

    As PyTorch does for one matrix: tall matrices turned on their side, each divided by its own norm
    (so its largest singular value is at most 1), then `steps` quintic iterations
    X <- a X + (b A + c A^2) X with A = X X^T, which push every singular value towards 1. PyTorch
    computes them in bfloat16; here each stack's precision is `dtype(count, rows, columns)` (default:
    `newton_schulz_dtype`, the one this CPU computes faster).
    """
    a, b, c = coefficients
    choose = dtype or newton_schulz_dtype
    tall = [u.size(0) > u.size(1) for u in updates]
    orthogonal: list[torch.Tensor] = list(updates)
    for (rows, columns), indices in stacks([u.shape for u in updates]).items():
        precision = choose(len(indices), rows, columns)
        lowered = [updates[i].to(precision) for i in indices]
        norms = torch._foreach_norm(lowered)  # each in its own layout, as torch.optim.Muon takes it
        x = torch.stack([u.mT if tall[i] else u for u, i in zip(lowered, indices, strict=True)])
        x.div_(torch.stack(norms).clamp(min=eps).view(-1, 1, 1))
        for _ in range(steps):
            x = _newton_schulz_iteration(x, a, b, c)
        for i, matrix in zip(indices, x, strict=True):
            orthogonal[i] = matrix.mT if tall[i] else matrix
    return orthogonal


def stacks(shapes: list[torch.Size]) -> dict[tuple[int, int], list[int]]:
    """The indices of the matrices of each shape, tall ones counted turned on their side (rows <= columns)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, (rows, columns) in enumerate(shapes):
        by_shape.setdefault((min(rows, columns), max(rows, columns)), []).append(index)
    return by_shape


def _newton_schulz_iteration(x: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    gram = x @ x.mT
    return torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)


def newton_schulz_dtype(count: int, rows: int, columns: int) -> torch.dtype:
    """bfloat16 or float32, for Newton-Schulz over a stack of `count` (rows x columns) matrices on this CPU.

    bfloat16 halves the memory traffic and runs natively on CPUs with AVX-512 BF16 or AMX, where it
    was about twice as fast as float32; a CPU with AVX2 only emulates it, 41x slower than float32.
    So it is measured (one iteration of each, at first use, cached per machine: lm/cpu_choices.py),
    and bfloat16 is taken only when it is clearly faster. $LM_MUON_NS_DTYPE forces one.
    """
    return NS_DTYPES[_ns_choices.choose(_stack_key(count, rows, columns),
                                        lambda: probe_newton_schulz(count, rows, columns))]


def requested_newton_schulz_dtype() -> str:
    """What $LM_MUON_NS_DTYPE asks for: 'auto' (measure; the default), 'bfloat16' or 'float32'."""
    return _ns_choices.requested()


def adopt_newton_schulz_choices(chosen: dict[str, str]) -> None:
    """Take another process's `BatchedMuon.choose_precisions()` as this process's own."""
    for shape, name in chosen.items():
        count, rows, columns = (int(size) for size in shape.split("x"))
        _ns_choices.adopt(_stack_key(count, rows, columns), name)


def _stack_key(count: int, rows: int, columns: int) -> str:
    # Matrices come and go from a stack only when the model changes: one decision per power of two of them.
    return f"newton-schulz {1 << max(0, count - 1).bit_length()}x{rows}x{columns}"


def probe_newton_schulz(count: int, rows: int, columns: int, rounds: int = 3) -> str:
    """'bfloat16' or 'float32': time one Newton-Schulz iteration in each, on (part of) such a stack."""
    def flops(rows: int, columns: int) -> int:  # X X^T, A A and (b A + c A^2) X
        return 4 * rows * rows * columns + 2 * rows**3

    while flops(rows, columns) > NS_PROBE_FLOPS and rows > 64:  # a large matrix: a corner of it tells as well
        rows, columns = rows // 2, columns // 2
    count = max(1, min(count, NS_PROBE_FLOPS // flops(rows, columns)))
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone
    x = torch.randn(count, rows, columns, generator=generator)
    x /= torch.linalg.matrix_norm(x, keepdim=True)
    runs = {name: functools.partial(_newton_schulz_iteration, x.to(dtype), *NS_COEFFICIENTS)
            for name, dtype in NS_DTYPES.items()}
    with torch.no_grad():
        best = cpu_choices.fastest(runs, rounds)
    return "bfloat16" if best["bfloat16"] < NS_BFLOAT16_MARGIN * best["float32"] else "float32"


def forget_newton_schulz_choices() -> None:
    """Drop what this process knows (the cache file stays): the next step decides again."""
    _ns_choices.forget()


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
