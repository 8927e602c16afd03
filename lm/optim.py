"""Optimizers and the learning-rate schedule, over steps or over a time budget.

AdamW (the default) moves every weight by its gradient's running mean over the square root of its
running variance. Muon (`--optimizer muon`, PyTorch's `torch.optim.Muon`) treats each hidden weight
matrix as a whole: it orthogonalises the momentum of the gradient (a few Newton-Schulz iterations)
so that every direction of the matrix moves by a similar amount, which trains transformers' hidden
layers in fewer steps. Muon applies only to 2-D matrices inside the blocks; embeddings, the output
head, norms and biases stay on AdamW, as is standard. Its learning rate is adjusted to match AdamW's
update size (`adjust_lr_fn="match_rms_adamw"`), so one `--lr` serves both. On a CPU its matrices are
stepped on several threads at once (`ThreadedMuon`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

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
        optimizers.insert(0, ThreadedMuon(hidden, lr=config.lr * config.muon_lr_scale,
                                          weight_decay=config.weight_decay, momentum=0.95,
                                          ns_steps=config.muon_ns_steps, adjust_lr_fn="match_rms_adamw"))
        optimizers[0].param_groups[0]["lr_scale"] = config.muon_lr_scale
    return optimizers


class ThreadedMuon(torch.optim.Muon):
    """PyTorch's Muon whose matrices, on a CPU, are stepped on all intra-op threads at once.

    On a CPU Muon's cost is its Newton-Schulz iterations: fifteen bfloat16 products per matrix, which
    at the small presets' sizes are too small to keep two cores busy (a 128 x 384 product: 50-60 us in
    PyTorch, of which oneDNN's own kernel is ~20 us; one thread or two take the same time, measured).
    The matrices are independent, so the step is split into shards, each a `torch.optim.Muon` over some
    of the matrices, run side by side, one OpenMP thread each. The shards are handed this optimizer's
    state and hyperparameters at every step, so the arithmetic, the state and the checkpoints are
    exactly those of one `torch.optim.Muon`. With one thread, or on a GPU, it is plain Muon.
    """

    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, **options)
        self._options = options
        self._shards: list[tuple[torch.optim.Muon, list[int]]] = []
        self._sharded: tuple[int, int] = (0, 0)  # (shards, matrices) the shards were made for

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        threads = torch.get_num_threads()
        params = [p for group in self.param_groups for p in group["params"]]
        if threads < 2 or len(params) < 2 or any(p.device.type != "cpu" for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sharded != (min(threads, len(params)), len(params)):  # first step, new threads or groups
            self._sharded = (min(threads, len(params)), len(params))
            self._shards = self._make_shards(self._sharded[0])
        for shard, group_of in self._shards:
            shard.state = self.state  # loading a state dict replaces the dict, so it is handed over every step
            for shard_group, index in zip(shard.param_groups, group_of, strict=True):
                shard_group.update({k: v for k, v in self.param_groups[index].items() if k != "params"})
        pool = _single_thread_pool(len(self._shards))
        for future in [pool.submit(shard.step) for shard, _ in self._shards]:
            future.result()
        return loss

    def _make_shards(self, count: int) -> list[tuple[torch.optim.Muon, list[int]]]:
        """`count` Muons over this one's matrices, balanced by Newton-Schulz cost (largest first)."""
        def cost(p: torch.Tensor) -> int:  # one iteration's multiply-adds, plus its fixed cost (measured)
            small, large = sorted(p.shape)
            return 2 * small * small * large + small ** 3 + 128 ** 3
        work = sorted(((cost(p), index, p) for index, group in enumerate(self.param_groups) for p in group["params"]),
                      key=lambda item: -item[0])
        loads = [0] * count
        assigned: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(count)]
        for weight, index, p in work:
            lightest = loads.index(min(loads))
            loads[lightest] += weight
            assigned[lightest].setdefault(index, []).append(p)
        shards = []
        for groups in assigned:
            order = sorted(groups)
            shards.append((torch.optim.Muon([{"params": groups[index]} for index in order], **self._options), order))
        return shards


@cache
def _single_thread_pool(workers: int) -> ThreadPoolExecutor:
    # One OpenMP thread per worker: a worker with a team of its own would leave threads spinning that
    # slow the main thread's next products (measured: twice as slow).
    return ThreadPoolExecutor(workers, thread_name_prefix="muon", initializer=torch.set_num_threads,
                              initargs=(1,))


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
