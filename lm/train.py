"""The training loop: next-token prediction with AdamW (or Muon), a warmup + decay schedule, and checkpoints.

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
from lm.config import MUON_UNDER_FSDP, ModelConfig, TrainConfig
from lm.data import BatchSampler, Splits, check_splits, token_byte_lengths
from lm.device import (
    autocast,
    configure_matmul,
    cpu_name,
    keep_freed_memory,
    peak_flops,
    resolve_device,
    resolve_dtype,
)
from lm.distributed import Distributed, DistributedError
from lm.errors import LmError, UsageError
from lm.eval import plan_windows, score_tokens
from lm.generate import complete
from lm.linear import kernel_for, onednn_available, requested_kernel
from lm.model import GPT
from lm.optim import (
    BatchedMuon,
    adopt_newton_schulz_choices,
    lr_at,
    make_optimizers,
    requested_newton_schulz_dtype,
    set_lr,
)
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
    max_steps: int  # with a time budget: unknown in advance, 0
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
class CpuChoices:
    """What a run on a CPU computes with, each measured on this machine (lm/cpu_choices.py) or forced."""

    cpu: str
    vector_kernels: str  # PyTorch's own kernels: 'AVX512', 'AVX2', ...
    threads: int
    matmul: dict[str, str]  # training layer shape ('1024x128x384') -> 'onednn' or 'default'
    matmul_forced: bool  # by LM_CPU_MATMUL
    newton_schulz: dict[str, str]  # Muon's stack shape ('16x128x384') -> 'bfloat16' or 'float32'; {} without Muon
    newton_schulz_forced: bool  # by LM_MUON_NS_DTYPE


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
    init_weights: Path | None = None  # --init-from: weights a new run starts from (its optimizer starts afresh)
    evaluate_at_start: bool = False  # score the validation text before the first step (logged as step 0)


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Each process takes an equal share of every batch: the batch must divide by the process count."""
    if batch_size % world_size:
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")


def _kept(last_checkpoint: int) -> str:
    if last_checkpoint == 0:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_checkpoint}) is kept"


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
        elif setup.init_weights is not None:
            checkpoint.load_weights(self.model, setup.init_weights, shorter_context=True)
        check_batch_split(self.config.batch_size, self.dist.world_size)
        check_splits(setup.splits, setup.model_config.context_length)
        self.fsdp = self.config.fsdp and self.dist.enabled
        # The module the training step runs: DDP around the model, or the model itself, sharded.
        self.network = distributed.wrap(self.model, self.dist, self.fsdp, self.device)
        if self.fsdp and self.config.optimizer == "muon":
            raise UsageError(MUON_UNDER_FSDP)
        self.optimizers = make_optimizers(self.model, self.config, self.device)
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
        # What the closing evaluation and checkpoint cost, for a time budget to leave room for them.
        self._val_windows = len(plan_windows(len(setup.splits.val) + 1, setup.model_config.context_length).starts)
        self._window_seconds: float | None = None
        self._sample_seconds = 0.0
        self._save_seconds = 0.0
        self.peak = peak_flops(self.device, self.dtype)

    def choose_cpu_options(self) -> CpuChoices | None:
        """Settle now, before the first step, what lm/linear.py and lm/optim.py would measure during it.

        Every process of a run must orthogonalise Muon's updates in the same precision, or their weights
        part ways: the first process's choice is the one all take. None off the CPU.
        """
        if self.device.type != "cpu":
            return None
        rows = self.config.batch_size // self.dist.world_size * self.setup.model_config.context_length
        shapes = {(m.in_features, m.out_features) for m in self.model.modules() if type(m) is torch.nn.Linear}
        matmul = {f"{rows}x{n_in}x{n_out}": kernel_for(rows, n_in, n_out, training=True)
                  for n_in, n_out in sorted(shapes)} if onednn_available() else {}
        muon = next((o for o in self.optimizers if isinstance(o, BatchedMuon)), None)
        precisions = [muon.choose_precisions() if muon is not None and self.dist.is_main else {}]
        distributed.broadcast(self.dist, precisions)
        adopt_newton_schulz_choices(precisions[0])
        return CpuChoices(cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), matmul,
                          requested_kernel() != "auto", precisions[0], requested_newton_schulz_dtype() != "auto")

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.setup.model_config.context_length

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def run(self, on_update: Callable[[TrainUpdate], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
        """Train until `max_steps` (or the time budget) or until `should_stop()` says so; checkpoint on the
        way and at the end."""
        config = self.config
        max_steps = 0 if config.time_budget else config.max_steps
        if self.step > 0 and self._finished(self.elapsed_s):  # a new run takes at least one step
            return TrainOutcome("already-done", self.step, max_steps, self.elapsed_s)
        self.model.train()
        interval_loss = torch.zeros((), device=self.device)
        interval_steps, interval_seconds = 0, 0.0
        since_eval: list[float] = []
        last_checkpoint = self.step
        evaluation = None
        run_started = time.perf_counter() - self.elapsed_s
        if self.step == 0 and self.setup.evaluate_at_start and not self.setup.resume:
            evaluation = self._evaluate_at_start(on_update, run_started)
        final = False
        while not final:
            if distributed.any_process(self.dist, should_stop is not None and should_stop(), self.device):
                self._check_finite(interval_loss, interval_steps, last_checkpoint)
                self._save()
                self.elapsed_s = time.perf_counter() - run_started
                return TrainOutcome("interrupted", self.step, max_steps, self.elapsed_s, evaluation)
            lr = lr_at(self.step, config, self._time_progress(time.perf_counter() - run_started))
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
            final = self._finished(time.perf_counter() - run_started)
            update = TrainUpdate(self.step, max_steps, lr)
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
                saving = time.perf_counter()
                self._save()
                self._save_seconds = time.perf_counter() - saving
                last_checkpoint = self.step
                update.saved = True
            if on_update is not None:
                on_update(update)
        self.elapsed_s = time.perf_counter() - run_started
        return TrainOutcome("finished", self.step, max_steps, self.elapsed_s, evaluation)

    def _finished(self, elapsed_s: float) -> bool:
        """Whether the step just taken is the last: `max_steps` reached, or the time budget (less what the
        closing evaluation and checkpoint will take) spent. Every process decides alike."""
        if not self.config.time_budget:
            return self.step >= self.config.max_steps
        spent = elapsed_s + self._closing_seconds() >= self.config.time_budget
        return distributed.any_process(self.dist, spent, self.device)

    def _time_progress(self, elapsed_s: float) -> float | None:
        """With a time budget, the share of the training time spent (the schedule's clock); else None."""
        if not self.config.time_budget:
            return None
        return elapsed_s / max(1e-9, self.config.time_budget - self._closing_seconds())

    def _closing_seconds(self) -> float:
        """An estimate of the closing evaluation (every validation window, and a sample) plus the checkpoint."""
        if self._window_seconds is None:
            self._time_scoring()
        assert self._window_seconds is not None
        return 1.1 * (self._val_windows * self._window_seconds + self._sample_seconds) + self._save_seconds

    def _time_scoring(self) -> None:
        """Time a batch of validation windows once, before evaluations have measured it (after a first,
        untimed call: the first pass through a model pays for its kernels' one-time set-up)."""
        self.model.eval()
        with self.autocast():
            for windows in (self.config.batch_size, self.config.batch_size):
                started = time.perf_counter()
                scores = score_tokens(self.model, self.setup.splits.val, self.byte_lengths,
                                      self.setup.model_config.context_length, eot_id=self.setup.tokenizer.eot_id,
                                      batch_size=windows, max_windows=windows)
        self.model.train()
        self._window_seconds = (time.perf_counter() - started) / scores.windows

    def _evaluate_at_start(self, on_update: Callable[[TrainUpdate], None] | None, run_started: float) -> Evaluation:
        """Where a run that starts from trained weights stands before it moves them: all of the validation text."""
        max_steps = 0 if self.config.time_budget else self.config.max_steps
        update = TrainUpdate(0, max_steps, lr_at(0, self.config, self._time_progress(0.0)),
                             evaluation=self.evaluate(complete=True))
        self.elapsed_s = update.elapsed_s = time.perf_counter() - run_started
        self._log(update)
        if on_update is not None:
            on_update(update)
        return update.evaluation

    def _train_step(self, lr: float) -> torch.Tensor:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss (on the device)."""
        set_lr(self.optimizers, lr)
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
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)  # skipped (by the scaler) when the gradients overflowed
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
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
        started = time.perf_counter()
        self.model.eval()
        with self.autocast():
            scores = score_tokens(
                self.model, self.setup.splits.val, self.byte_lengths, self.setup.model_config.context_length,
                eot_id=self.setup.tokenizer.eot_id, batch_size=config.batch_size,
                max_windows=None if complete else config.eval_batches * config.batch_size)
        scored = time.perf_counter()
        self._window_seconds = (scored - started) / scores.windows
        sample = self.sample()
        self._sample_seconds = time.perf_counter() - scored
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
        record: dict[str, Any] = {"step": update.step}
        if update.loss is not None:  # None only at step 0, before any training
            record["loss"] = round(update.loss, 6)
        record["lr"] = update.lr
        if update.tokens_per_s is not None:
            record["tokens_per_s"] = round(update.tokens_per_s, 1)
        record["time_s"] = round(update.elapsed_s, 3)
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
            "optimizer": get_optimizer_state_dict(self.model, self.optimizers, options=FULL_ON_CPU),
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
        set_optimizer_state_dict(self.model, self.optimizers, optim_state_dict=state["optimizer"],
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
