"""The training loop: next-token prediction with AdamW, a warmup + cosine schedule, and checkpoints.

Each step shows the model windows of text and asks it, at every position, for the next token; the
loss is the cross-entropy of its predicted distribution against the token that really came next.
Backpropagation gives every weight's gradient and AdamW moves the weights a little against it.

Speed on a GPU comes from bf16 autocast (fp16 with a gradient scaler where bf16 is missing), TF32
matrix products, fused attention kernels, the fused AdamW and, optionally, `torch.compile`. On a CPU
the same code runs in float32, its linear layers on oneDNN's matrix products (lm/linear.py).

The library never prints: progress goes to an `on_update` callback, and the caller's `should_stop`
is polled every step so Ctrl-C can end a run with a checkpoint instead of a traceback.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lm import checkpoint, distributed, rundir
from lm.config import ModelConfig, TrainConfig
from lm.data import BatchSampler, Splits, check_splits, token_byte_lengths
from lm.device import autocast, configure_matmul, keep_freed_memory, peak_flops, resolve_device, resolve_dtype
from lm.distributed import Distributed, DistributedError
from lm.errors import LmError, UsageError
from lm.eval import score_tokens
from lm.generate import complete
from lm.model import GPT
from lm.tokenizer import Tokenizer

# Whole tensors, on the CPU, in the process that asks (rank 0 with FSDP): what a checkpoint stores.
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingDiverged(LmError):
    """The loss became NaN or infinite."""


@dataclass
class Evaluation:
    val_loss: float  # mean cross-entropy per token, nats
    val_bpb: float  # bits per byte of text: comparable across tokenizers
    train_loss: float | None  # mean training loss since the previous evaluation
    sample: str
    val_tokens: int = 0  # validation ids scored: all of them at the end of a run, a spread sample before
    val_complete: bool = True  # every validation id was scored (the figure `lm eval` gives on that text)


@dataclass
class TrainUpdate:
    """What the loop reports after each step. Fields other than step/lr are None between log steps."""

    step: int
    max_steps: int
    lr: float
    loss: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None  # model FLOPs utilisation, 0..1, on known GPUs in 16-bit precision
    elapsed_s: float = 0.0
    evaluation: Evaluation | None = None
    saved: bool = False


@dataclass
class TrainOutcome:
    status: str  # "finished", "interrupted", or "already-done"
    step: int
    max_steps: int
    elapsed_s: float
    evaluation: Evaluation | None = None


@dataclass
class TrainingSetup:
    run_dir: Path
    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    splits: Splits
    resume: bool = False
    distributed: Distributed = field(default_factory=Distributed)
    extra_config: dict[str, Any] = field(default_factory=dict)


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Each process takes an equal share of every batch: the batch must divide by the process count."""
    if batch_size % world_size:
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")


def _kept(last_checkpoint: int) -> str:
    if last_checkpoint == 0:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_checkpoint}) is kept"


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then a cosine decay to `lr x min_lr_ratio` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying biases and norm gains just hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass (CUDA, and CPUs since torch 2.4).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per matrix weight (forward + backward) plus attention's score products."""
    config = model.config
    matmul_params = model.num_parameters()
    if config.pos_encoding == "learned":
        matmul_params -= model.pos_emb.weight.numel()
    if not config.tie_embeddings:
        matmul_params -= model.tok_emb.weight.numel()  # a lookup, not a product
    return 6 * matmul_params + 12 * config.n_layer * config.d_model * config.context_length


class Trainer:
    """Holds the model, optimiser, data sampler and counters of one run."""

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup
        self.config = setup.train_config
        self.dist = setup.distributed
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)  # each process on its own GPU
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        configure_matmul(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(self.config.seed)
        self.model = GPT(setup.model_config).to(self.device)
        self.flops_per_token = flops_per_token(self.model)  # before sharding: it counts whole matrices
        if self.dist.is_main:
            self._write_run_files()
        resumed = checkpoint.load_training_state(setup.run_dir) if setup.resume else None
        if resumed is not None:
            checkpoint.load_weights(self.model, resumed[0] / rundir.WEIGHTS)
        check_batch_split(self.config.batch_size, self.dist.world_size)
        check_splits(setup.splits, setup.model_config.context_length)
        self.fsdp = self.config.fsdp and self.dist.enabled
        # The module the training step runs: DDP around the model, or the model itself, sharded.
        self.network = distributed.wrap(self.model, self.dist, self.fsdp, self.device)
        self.optimizer = make_optimizer(self.model, self.config, self.device)
        # A gradient scaler keeps small fp16 gradients from underflowing; bf16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.sampler = BatchSampler(setup.splits.train, setup.model_config.context_length, self.config.seed)
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0
        if resumed is not None:
            self._restore(resumed[1])
        self.forward = torch.compile(self.network) if self.config.compile else self.network
        self.byte_lengths = token_byte_lengths(setup.tokenizer).to(self.device)
        self.peak = peak_flops(self.device, self.dtype)

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.setup.model_config.context_length

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def run(self, on_update: Callable[[TrainUpdate], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
        """Train until `max_steps` or until `should_stop()` says so; checkpoint on the way and at the end."""
        config = self.config
        if self.step >= config.max_steps:
            return TrainOutcome("already-done", self.step, config.max_steps, self.elapsed_s)
        self.model.train()
        interval_loss = torch.zeros((), device=self.device)
        interval_steps, interval_seconds = 0, 0.0
        since_eval: list[float] = []
        last_checkpoint = self.step
        evaluation = None
        run_started = time.perf_counter() - self.elapsed_s
        while self.step < config.max_steps:
            if distributed.any_process(self.dist, should_stop is not None and should_stop(), self.device):
                self._check_finite(interval_loss, interval_steps, last_checkpoint)
                self._save()
                self.elapsed_s = time.perf_counter() - run_started
                return TrainOutcome("interrupted", self.step, config.max_steps, self.elapsed_s, evaluation)
            lr = lr_at(self.step, config)
            started = time.perf_counter()
            try:
                interval_loss += self._train_step(lr)
            except RuntimeError as err:
                if not self.dist.enabled:
                    raise
                # Usually another process died and the collective lost its peer.
                raise DistributedError(
                    f"a collective operation failed at step {self.step + 1} ({str(err).splitlines()[0][:120]}); "
                    f"another process has probably failed (see its message); {_kept(last_checkpoint)}") from err
            self.step += 1
            interval_steps += 1
            self.tokens_seen += self.tokens_per_step
            final = self.step == config.max_steps
            update = TrainUpdate(self.step, config.max_steps, lr)
            if self.step % config.log_every == 0 or self.step % config.eval_every == 0 or final:
                loss = self._check_finite(interval_loss, interval_steps, last_checkpoint)  # syncs the GPU
                interval_seconds += time.perf_counter() - started
                update.loss = loss
                update.tokens_per_s = interval_steps * self.tokens_per_step / interval_seconds
                if self.peak is not None:
                    update.mfu = self.flops_per_token * update.tokens_per_s / (self.peak * self.dist.world_size)
                since_eval.append(loss)
                interval_loss.zero_()
                interval_steps, interval_seconds = 0, 0.0
            else:
                interval_seconds += time.perf_counter() - started
            if self.step % config.eval_every == 0 or final:
                train_loss = sum(since_eval) / len(since_eval) if since_eval else None
                evaluation = update.evaluation = self.evaluate(train_loss, complete=final)
                since_eval = []
            self.elapsed_s = update.elapsed_s = time.perf_counter() - run_started
            if update.loss is not None:
                self._log(update)
            if self.step % config.checkpoint_every == 0 or final:
                self._save()
                last_checkpoint = self.step
                update.saved = True
            if on_update is not None:
                on_update(update)
        return TrainOutcome("finished", self.step, config.max_steps, self.elapsed_s, evaluation)

    def _train_step(self, lr: float) -> torch.Tensor:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss (on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.config.grad_accum):
            inputs, targets = self._batch()
            last = micro == self.config.grad_accum - 1
            with self._gradient_sync(last):
                with self.autocast():  # the forward only: the AMP docs advise against backward under autocast
                    _, loss = self.forward(inputs, targets)
                loss = loss / self.config.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _gradient_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Exchange gradients between processes only after the last micro-batch of a step."""
        if self.fsdp:
            self.network.set_requires_gradient_sync(last_micro_batch)  # type: ignore[operator]
        elif self.dist.enabled and not last_micro_batch:
            return self.network.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        share = self.config.batch_size // self.dist.world_size
        inputs, targets = self.sampler.next_batch(share, self.dist.rank, self.dist.world_size)
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def evaluate(self, train_loss: float | None = None, complete: bool = True) -> Evaluation:
        """Loss and bits per byte on the validation text (`lm.eval`'s scoring), and a sample.

        `complete` scores every validation id, as `lm eval` does; otherwise an evenly spread subset of
        the scoring windows (eval_batches x batch_size of them, the same ones every time) estimates it.
        """
        config = self.config
        self.model.eval()
        with self.autocast():
            scores = score_tokens(
                self.model, self.setup.splits.val, self.byte_lengths, self.setup.model_config.context_length,
                eot_id=self.setup.tokenizer.eot_id, batch_size=config.batch_size,
                max_windows=None if complete else config.eval_batches * config.batch_size)
        sample = self.sample()
        self.model.train()
        total = scores.total
        return Evaluation(val_loss=total.loss, val_bpb=total.bits_per_byte, train_loss=train_loss, sample=sample,
                          val_tokens=total.tokens, val_complete=complete)

    def sample(self) -> str:
        """A short continuation of <|endoftext|> (the start of a new document), seeded: the same at a given step."""
        if self.config.sample_tokens == 0:
            return ""
        return complete(self.model, self.setup.tokenizer, "", self.config.sample_tokens,
                        seed=self.config.seed + self.step)

    def _check_finite(self, interval_loss: torch.Tensor, steps: int, last_checkpoint: int) -> float:
        loss = distributed.mean(self.dist, interval_loss.clone()).item() / max(steps, 1)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} before step {self.step}; {_kept(last_checkpoint)}. Lower --lr (now "
                f"{self.config.lr:g}) or raise --warmup-steps, then start again or --resume")
        return loss

    def _log(self, update: TrainUpdate) -> None:
        record: dict[str, Any] = {"step": update.step, "loss": round(update.loss, 6), "lr": update.lr,
                                  "tokens_per_s": round(update.tokens_per_s, 1),
                                  "time_s": round(update.elapsed_s, 3)}
        if update.mfu is not None:
            record["mfu"] = round(update.mfu, 4)
        if update.evaluation is not None:
            record["val_loss"] = round(update.evaluation.val_loss, 6)
            record["val_bpb"] = round(update.evaluation.val_bpb, 6)
            record["val_tokens"] = update.evaluation.val_tokens
        if self.dist.is_main:
            rundir.append_metrics(self.setup.run_dir, record)

    def _write_run_files(self) -> None:
        """config.json (rewritten on resume: the schedule may have changed) and, for a new run, the tokenizer."""
        setup = self.setup
        extra = {**setup.extra_config, "parameters": self.model.num_parameters()}
        rundir.write_config(setup.run_dir, setup.model_config, self.config, extra)
        if not setup.resume:
            setup.tokenizer.save(setup.run_dir / rundir.TOKENIZER, overwrite=True)

    def _state(self) -> dict[str, Any]:
        """The training state to checkpoint (with FSDP every process must call this: it gathers)."""
        state: dict[str, Any] = {
            "step": self.step, "elapsed_s": self.elapsed_s, "tokens_seen": self.tokens_seen,
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=FULL_ON_CPU),
            "sampler": self.sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _save(self) -> None:
        weights = (checkpoint.deduplicate(get_model_state_dict(self.model, options=FULL_ON_CPU), self.model.config)
                   if self.fsdp else checkpoint.model_state_dict(self.model))
        state = self._state()
        if self.dist.is_main:
            checkpoint.save_checkpoint(self.setup.run_dir, weights, state, self.step)
        distributed.barrier(self.dist)  # nobody runs ahead of a checkpoint being written

    def _restore(self, state: dict[str, Any]) -> None:
        # Every process read the same full checkpoint; FSDP keeps its own shard of each tensor.
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=self.fsdp))
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_s, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]
        if self.dist.is_main:
            rundir.truncate_metrics(self.setup.run_dir, self.step)
