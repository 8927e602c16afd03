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

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lm import cpu_choices
from lm.config import TrainConfig
from lm.errors import UsageError

try:  # the learning-rate adjustment torch.optim.Muon applies to each matrix, by its shape
    from torch.optim._muon import _adjust_lr
except ImportError:  # a PyTorch whose Muon is laid out otherwise: BatchedMuon steps as plain Muon
    _adjust_lr = None
# torch.optim.Muon's default quintic coefficients (a, b, c), what the precision probe iterates with.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco and Gower 2025, arXiv:2505.16932): a quintic of its own for each of
# five iterations, each the best (minimax) for the range of singular values the ones before it leave,
# computed for five iterations with a safety factor of 1.02 (the values modded-nanogpt's records use).
# PyTorch's one quintic leaves singular values anywhere between about 0.7 and 1.2 (it trades accuracy for
# speed of the first iterations); these leave them much nearer 1 in the same five iterations.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
# Its first quintic is steep: a singular value rounded just above 1 would be thrown far off, so each matrix
# is divided by its norm times this.
POLAR_EXPRESS_SAFETY = 1.02
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
    """The optimizers of a run: [AdamW], or [Muon for hidden matrices, AdamW for the rest].

    AdamW's groups: the weight matrices (decayed), the embedding tables (lr x embed_lr_scale), an untied
    output head (x head_lr_scale), the speedrun techniques' scalars and gates (x scalar_lr_scale), and
    norm gains and biases. Only matrices are decayed: decaying biases, gains, tables of rows read one at a
    time by token, and scalars just hurts, so tables and scalars are left alone when they have an lr of
    their own. A group's `lr_scale` is its lr as a multiple of the schedule's (`set_lr`).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    tables = {id(p) for p in getattr(model, "lookup_tables", list)()}
    scalars = {id(p) for p in getattr(model, "scalar_parameters", list)()}
    head = getattr(model, "lm_head", None)
    head_id = id(head.weight) if head is not None and not model.config.tie_embeddings else None
    hidden = ([p for name, p in named if p.dim() == 2 and name.startswith("blocks.")
               and id(p) not in tables and id(p) not in scalars] if config.optimizer == "muon" else [])
    chosen = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in chosen]

    def group(params: list[nn.Parameter], weight_decay: float, lr_scale: float = 1.0) -> dict:
        return {"params": params, "weight_decay": weight_decay, "lr_scale": lr_scale}

    def own(scale: float, ids: set[int]) -> list[nn.Parameter]:  # parameters given an lr of their own
        return [p for p in rest if id(p) in ids] if scale != 1.0 else []

    embed = own(config.embed_lr_scale, tables)
    head_params = own(config.head_lr_scale, {head_id} if head_id is not None else set())
    scalar = own(config.scalar_lr_scale, scalars)
    apart = {id(p) for p in (*embed, *head_params, *scalar)}
    plain = [p for p in rest if id(p) not in apart]
    groups = [
        group([p for p in plain if p.dim() >= 2 and id(p) not in scalars], config.weight_decay),
        group([p for p in plain if p.dim() < 2 or id(p) in scalars], 0.0),
        group(embed, 0.0, config.embed_lr_scale),
        group(head_params, config.weight_decay, config.head_lr_scale),
        group(scalar, 0.0, config.scalar_lr_scale),
    ]
    # The fused kernel updates all parameters in one pass (CUDA, and CPUs since torch 2.4).
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
        fused=device.type in ("cuda", "cpu"))]
    for adamw_group in optimizers[0].param_groups:
        adamw_group["lr"] = config.lr * adamw_group["lr_scale"]
    if hidden:
        optimizers.insert(0, BatchedMuon(hidden, lr=config.lr * config.muon_lr_scale,
                                          weight_decay=config.weight_decay, momentum=config.muon_momentum,
                                          ns_steps=config.muon_ns_steps, adjust_lr_fn="match_rms_adamw",
                                          cautious_weight_decay=config.muon_cautious_wd,
                                          polar_express=config.muon_polar_express,
                                          normuon_beta2=config.normuon_beta2))
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

    def __init__(self, params: Any, *args: Any, cautious_weight_decay: bool = False, polar_express: bool = False,
                 normuon_beta2: float = 0.0, **kwargs: Any) -> None:
        """`cautious_weight_decay`: decay each weight only where its update points the same way as the weight
        (shrinking it already), as modded-nanogpt and nanochat do; the rest are left alone (Chen et al. 2025).
        `polar_express`: orthogonalise with Polar Express's quintics (`POLAR_EXPRESS`) instead of PyTorch's one.
        `normuon_beta2` > 0: NorMuon's per-neuron normalisation of each update (`normalize_neurons`), its
        running mean of squares decaying by this much per step."""
        super().__init__(params, *args, **kwargs)
        asked = [flag for flag, on in (("--muon-cautious-wd", cautious_weight_decay),
                                       ("--muon-polar-express", polar_express), ("--normuon-beta2", normuon_beta2 > 0))
                 if on]
        if asked and not _BATCHABLE:
            raise UsageError(f"{asked[0]} needs the Muon of PyTorch 2.9 or later (torch.optim.Muon's _init_group); "
                             "upgrade torch or leave the option off")
        self.cautious_weight_decay, self.polar_express, self.normuon_beta2 = (
            cautious_weight_decay, polar_express, normuon_beta2)
        self.own_arithmetic = bool(asked)  # off the CPU too, this step (not torch.optim.Muon's) computes them

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        params = [p for group in self.param_groups for p in group["params"]]
        on_cpu = all(p.device.type == "cpu" for p in params)
        if not _BATCHABLE or not (on_cpu or self.own_arithmetic):
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
            orthogonal = newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       # off the CPU in bfloat16, as torch.optim.Muon's own iterations run
                                       None if on_cpu else lambda *_: torch.bfloat16, self.polar_express)
            if self.normuon_beta2 > 0:
                orthogonal = [normalize_neurons(update, self.state[param], self.normuon_beta2)
                              for param, update in zip(with_grad, orthogonal, strict=True)]
            lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            if self.cautious_weight_decay:
                for param, update in zip(with_grad, orthogonal, strict=True):
                    agree = (update * param) >= 0  # the update (subtracted) already pulls the weight towards 0
                    param.addcmul_(param, agree, value=-lr * group["weight_decay"])
            else:
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
                  eps: float, dtype: Callable[[int, int, int], torch.dtype] | None = None,
                  polar_express: bool = False) -> list[torch.Tensor]:
    """`torch.optim.Muon`'s orthogonalisation of each matrix, computed for each shape in one stack.

    As PyTorch does for one matrix: tall matrices turned on their side, each divided by its own norm
    (so its largest singular value is at most 1), then `steps` quintic iterations
    X <- a X + (b A + c A^2) X with A = X X^T, which push every singular value towards 1. PyTorch
    computes them in bfloat16; here each stack's precision is `dtype(count, rows, columns)` (default:
    `newton_schulz_dtype`, the one this CPU computes faster). With `polar_express` the iterations take
    Polar Express's coefficients in turn (`POLAR_EXPRESS`; past the fifth, its last) instead of `coefficients`.
    """
    schedule = ([POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)] if polar_express
                else [coefficients] * steps)
    safety = POLAR_EXPRESS_SAFETY if polar_express else 1.0
    choose = dtype or newton_schulz_dtype
    tall = [u.size(0) > u.size(1) for u in updates]
    orthogonal: list[torch.Tensor] = list(updates)
    for (rows, columns), indices in stacks([u.shape for u in updates]).items():
        precision = choose(len(indices), rows, columns)
        lowered = [updates[i].to(precision) for i in indices]
        norms = torch._foreach_norm(lowered)  # each in its own layout, as torch.optim.Muon takes it
        x = torch.stack([u.mT if tall[i] else u for u, i in zip(lowered, indices, strict=True)])
        x.div_((torch.stack(norms) * safety).clamp(min=eps).view(-1, 1, 1))
        for a, b, c in schedule:
            x = _newton_schulz_iteration(x, a, b, c)
        for i, matrix in zip(indices, x, strict=True):
            orthogonal[i] = matrix.mT if tall[i] else matrix
    return orthogonal


def normalize_neurons(update: torch.Tensor, state: dict[str, Any], beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv:2510.05491): the orthogonalised update with each neuron's share evened out.

    Orthogonalising makes every direction of a matrix move alike, but not every neuron (a row of a tall
    matrix, a column of a wide one: the units along its longer side): some still get much larger updates
    than others. NorMuon keeps a running mean of each neuron's mean squared update (`state`'s
    "normuon_second_moment", decaying by `beta2` per step, as Adam's second moment does per weight), divides
    each neuron's update by its root, and scales the whole matrix back to the norm it had, so the step's
    size (and Muon's learning rate) is unchanged. In float32 whatever the update's precision: the running
    mean outlives a step whose iterations ran in bfloat16, and a resumed run may measure another precision.
    """
    update = update.float()
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    mean_square = update.square().mean(dim=dim, keepdim=True)
    second_moment = state.setdefault("normuon_second_moment", torch.zeros_like(mean_square))
    second_moment.lerp_(mean_square, 1 - beta2)
    evened = update * second_moment.clamp(min=1e-10).rsqrt()
    return evened * (update.norm() / evened.norm().clamp(min=1e-10))


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


def set_muon_weight_decay(optimizers: list[torch.optim.Optimizer], weight_decay: float) -> None:
    """Muon's weight decay for the next step (the AdamW groups keep theirs)."""
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.Muon):
            for group in optimizer.param_groups:
                group["weight_decay"] = weight_decay


def muon_weight_decay_at(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Muon's weight decay: `weight_decay` throughout, or with `muon_cautious_wd` a cosine from it to 0 over the
    run (nanochat's schedule: the decay that keeps weights small early is not wanted at the end)."""
    if not config.muon_cautious_wd:
        return config.weight_decay
    if progress is None:
        progress = step / max(1, config.max_steps)
    return config.weight_decay * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class WeightAverage:
    """An exponential moving average of a model's weights: after each step, avg ← avg + (1 - d)(w - avg).

    Averaging the last few hundred steps' weights smooths out the noise of the latest ones, which helps
    most when a run sees its data several times. The decay d of the n-th update is min(decay,
    (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with num_updates): with `decay` alone the
    random starting weights would still weigh 0.99^100 = 37% after 100 steps at 0.99, so a short run's
    average would be mostly its start. `swapped_in` lends the average to the model (for evaluation and
    saving) and puts the trained weights back.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]  # a tied matrix once
        self.params = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, count: int) -> None:
        """Take in the weights after the `count`-th step (1 for the first)."""
        decay = min(self.decay, (1 + count) / (10 + count))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    def load(self, named: dict[str, torch.Tensor]) -> None:
        """Take the average from `named` tensors (a saved state dict's), by parameter name."""
        with torch.no_grad():
            for name, average in zip(self.names, self.average, strict=True):
                average.copy_(named[name])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its trained weights again after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)


def lr_at(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over `warmup_steps` to `lr`, then a decay to `lr x min_lr_ratio` at the end.

    The end is `max_steps`, or with a time budget the moment training must stop (`progress` is then the
    share of that time spent, 0..1). The decay is a cosine, or with `warmdown` > 0 a constant `lr`
    followed by a straight line down over that last share of the run (`warmdown_shape` "1-sqrt": the
    multiplier falls as 1 - sqrt(t) over the warmdown, t from 0 to 1, instead of 1 - t).
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if progress is None:
        span = max(1, config.max_steps - config.warmup_steps)
        progress = (step - config.warmup_steps) / span
    progress = min(1.0, max(0.0, progress))
    floor = config.lr * config.min_lr_ratio
    if config.warmdown > 0:
        down = min(1.0, (1.0 - progress) / config.warmdown)  # 1 until the warmdown starts, 0 at the end
        if config.warmdown_shape == "1-sqrt":  # stays higher longer, then falls steeply (Hägele et al. 2024)
            down = 1.0 - math.sqrt(1.0 - down)
        return floor + (config.lr - floor) * down
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))
