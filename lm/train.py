"""The training loop: next-token prediction with AdamW (or Muon), a warmup + decay schedule, and checkpoints.

Each step shows the model windows of text and asks it, at every position, for the next token; the
loss is the cross-entropy of its predicted distribution against the token that really came next.
Backpropagation gives every weight's gradient and AdamW moves the weights a little against it.

`Trainer.run` is the loop, and `Trainer._train_step` the step (batch, forward, loss, backward, optimiser
step). The pieces they lean on follow the trainer, each on its own: `RunLength` (when the run ends: its
steps or its time budget, and the clock the learning-rate schedule follows), `Validation` (scoring the
held-out text and sampling, and when), `Checkpoints` (what a checkpoint holds, when one is written,
restoring it) and `TrainingMeter` (the loss and speed between log lines).

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
from collections.abc import Callable, Iterator
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
from lm.chat import ChatFormat, save_chat_format
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
from lm.eval import Scores, plan_windows, score_tokens
from lm.generate import complete
from lm.heads import HeadTracking, in_context_windows, track_heads, tracking_text
from lm.inspect import repeated_random_ids
from lm.linear import kernel_for, onednn_available, requested_kernel
from lm.model import GPT
from lm.optim import (
    BatchedMuon,
    WeightAverage,
    adopt_newton_schulz_choices,
    lr_at,
    make_optimizers,
    muon_weight_decay_at,
    requested_newton_schulz_dtype,
    set_lr,
    set_muon_weight_decay,
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
    heads: HeadTracking | None = None  # with --track-heads: head detectors and the in-context score


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
    chat_format: ChatFormat | None = None  # conversations: the format the run learns (saved as chat_format.json)


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
    for table in model.lookup_tables():  # positions, value and bigram tables, an untied embedding: lookups
        if table is not model.lm_head.weight:
            matmul_params -= table.numel()
    return 6 * matmul_params + 12 * config.n_layer * config.d_model * config.context_length


class Trainer:
    """Holds the model, optimiser, data sampler and counters of one run, and runs its loop (`run`).

    The loop's pieces, below the class: `length` (RunLength), `validation` (Validation), `checkpoints`
    (Checkpoints), and a TrainingMeter per call of `run`.
    """

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup
        self.config = config = setup.train_config
        self.dist = setup.distributed
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)  # each process on its own GPU
        self.dtype = resolve_dtype(config.dtype, self.device)
        configure_matmul(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(config.seed)
        self.model = GPT(setup.model_config).to(self.device)
        self.flops_per_token = flops_per_token(self.model)  # before sharding: it counts whole matrices
        if self.dist.is_main:
            write_run_files(setup, self.model.num_parameters())
        resumed = checkpoint.load_training_state(setup.run_dir) if setup.resume else None
        if resumed is not None:
            checkpoint.load_weights(self.model, resumed[0] / rundir.WEIGHTS)
        elif setup.init_weights is not None:
            checkpoint.load_weights(self.model, setup.init_weights, shorter_context=True, grow_vocab=True)
        check_batch_split(config.batch_size, self.dist.world_size)
        check_splits(setup.splits, setup.model_config.context_length)
        self.fsdp = config.fsdp and self.dist.enabled
        # The module the training step runs: DDP around the model, or the model itself, sharded.
        self.network = distributed.wrap(self.model, self.dist, self.fsdp, self.device)
        if self.fsdp and config.optimizer == "muon":
            raise UsageError(MUON_UNDER_FSDP)
        if self.fsdp and config.track_heads:
            raise UsageError("--track-heads reads every head's whole attention weights, which --fsdp shards; "
                             "train with DDP (--ddp, the default) or drop --track-heads")
        self.optimizers = make_optimizers(self.model, config, self.device)
        # --ema-decay: the average starts from the weights the run starts from (a resumed run's saved average).
        self.average = WeightAverage(self.model, config.ema_decay) if config.ema_decay else None
        # A gradient scaler keeps small fp16 gradients from underflowing; bf16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.sampler = BatchSampler(setup.splits.train, setup.model_config.context_length, config.seed,
                                    learned=setup.splits.train_mask, repeat_share=config.repeat_windows,
                                    order=config.windows)
        self.checkpoints = Checkpoints(self, config.checkpoint_every)
        self.step, self.elapsed_s, self.tokens_seen = 0, 0.0, 0
        if resumed is not None:
            self.step, self.elapsed_s, self.tokens_seen = self.checkpoints.restore(resumed[1])
        self.forward = torch.compile(self.network) if config.compile else self.network
        self.validation = Validation(self.model, setup, self.device, self.dtype)
        self.length = RunLength(config, self.dist, self.device, self.validation, self.checkpoints)
        self.peak = peak_flops(self.device, self.dtype)

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
        config, length, validation, checkpoints = self.config, self.length, self.validation, self.checkpoints
        if self.step > 0 and length.finished(self.step, self.elapsed_s):  # a new run takes at least one step
            return TrainOutcome("already-done", self.step, length.max_steps, self.elapsed_s)
        self.model.train()
        meter = TrainingMeter(self.dist, self.device, self.tokens_per_step, self.flops_per_token, self.peak, config.lr)
        evaluation = None
        length.start(self.elapsed_s)
        if self.step == 0 and self.setup.evaluate_at_start and not self.setup.resume:
            evaluation = self._evaluate_at_start(on_update)
        final = False
        while not final:
            if distributed.any_process(self.dist, should_stop is not None and should_stop(), self.device):
                meter.check_finite(self.step, checkpoints.last_step)
                checkpoints.save(self.step, self.elapsed_s, self.tokens_seen)
                self.elapsed_s = length.elapsed()
                return TrainOutcome("interrupted", self.step, length.max_steps, self.elapsed_s, evaluation)
            lr = lr_at(self.step, config, length.progress())
            started = time.perf_counter()
            with collective_failures(self.dist, self.step + 1, checkpoints.last_step):
                meter.add(self._train_step(lr))  # batch, forward, loss, backward, optimiser step
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            final = length.finished(self.step)
            update = TrainUpdate(self.step, length.max_steps, lr)
            if self.step % config.log_every == 0 or validation.due(self.step, final):
                update.loss, update.tokens_per_s, update.mfu = meter.read(started, self.step, checkpoints.last_step)
            else:
                meter.lap(started)
            if validation.due(self.step, final):
                evaluation = update.evaluation = self.evaluate(meter.mean_since_evaluation(), complete=final)
            self.elapsed_s = update.elapsed_s = length.elapsed()
            if update.loss is not None:
                self._log(update)
            if checkpoints.due(self.step, final):
                checkpoints.save(self.step, self.elapsed_s, self.tokens_seen)
                update.saved = True
            if on_update is not None:
                on_update(update)
        self.elapsed_s = length.elapsed()
        return TrainOutcome("finished", self.step, length.max_steps, self.elapsed_s, evaluation)

    def _train_step(self, lr: float) -> torch.Tensor:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss (on the device)."""
        set_lr(self.optimizers, lr)
        if self.config.muon_cautious_wd:
            set_muon_weight_decay(self.optimizers, muon_weight_decay_at(self.step, self.config, self.length.progress()))
        total = torch.zeros((), device=self.device)
        for micro in range(self.config.grad_accum):
            inputs, targets = self._batch()
            with self._gradient_sync(last_micro_batch=micro == self.config.grad_accum - 1):
                with self.autocast():  # the forward only: the AMP docs advise against backward under autocast
                    _, loss = self.forward(inputs, targets)
                loss = loss / self.config.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        self._step_optimizers()
        if self.average is not None:
            self.average.update(self.step + 1)
        return total

    def _step_optimizers(self) -> None:
        """Clip the gradients, move the weights and clear the gradients (through the fp16 scaler when there is one)."""
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
        """Loss and bits per byte on the validation text, and a sample, at the current step (see `Validation`):
        of the weights' average where the run keeps one, as that is what it saves."""
        with self.average.swapped_in() if self.average is not None else contextlib.nullcontext():
            return self.validation.evaluate(self.step, train_loss, complete)

    def _evaluate_at_start(self, on_update: Callable[[TrainUpdate], None] | None) -> Evaluation:
        """Where a run that starts from trained weights stands before it moves them: all of the validation text."""
        update = TrainUpdate(0, self.length.max_steps, lr_at(0, self.config, self.length.progress(0.0)))
        evaluation = update.evaluation = self.evaluate(complete=True)
        self.elapsed_s = update.elapsed_s = self.length.elapsed()
        self._log(update)
        if on_update is not None:
            on_update(update)
        return evaluation

    def _log(self, update: TrainUpdate) -> None:
        """One line of metrics.jsonl (written by the first process)."""
        if self.dist.is_main:
            rundir.append_metrics(self.setup.run_dir, metrics_record(update))

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


class RunLength:
    """When the run ends, and the clock the learning-rate schedule follows.

    Without a time budget the run ends at `max_steps`. With one it ends when the budget, less what the
    closing evaluation (every validation window, and a sample) and checkpoint will take, is spent; the
    schedule then runs over that time. The clock counts across resumes.
    """

    def __init__(self, config: TrainConfig, dist: Distributed, device: torch.device, validation: Validation,
                 checkpoints: Checkpoints) -> None:
        self.steps, self.budget_s = config.max_steps, config.time_budget
        self.dist, self.device = dist, device
        self.validation, self.checkpoints = validation, checkpoints
        self._started = time.perf_counter()

    @property
    def max_steps(self) -> int:
        """The run's steps as reported: with a time budget unknown in advance, 0."""
        return 0 if self.budget_s else self.steps

    def start(self, elapsed_s: float) -> None:
        """Start the clock, `elapsed_s` already spent (by the run this one resumes)."""
        self._started = time.perf_counter() - elapsed_s

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def finished(self, step: int, elapsed_s: float | None = None) -> bool:
        """Whether `step`, just taken, is the last (`elapsed_s`: the clock's by default). Every process
        decides alike."""
        if not self.budget_s:
            return step >= self.steps
        spent = (self.elapsed() if elapsed_s is None else elapsed_s) + self.closing_seconds() >= self.budget_s
        return distributed.any_process(self.dist, spent, self.device)

    def progress(self, elapsed_s: float | None = None) -> float | None:
        """With a time budget, the share of the training time spent (the schedule's clock); else None."""
        if not self.budget_s:
            return None
        elapsed_s = self.elapsed() if elapsed_s is None else elapsed_s
        return elapsed_s / max(1e-9, self.budget_s - self.closing_seconds())

    def closing_seconds(self) -> float:
        """An estimate of the closing evaluation plus the checkpoint, with a margin for the evaluation."""
        return 1.1 * self.validation.closing_seconds() + self.checkpoints.save_seconds


class Validation:
    """Scores the held-out text (`lm.eval`'s scoring, as `lm eval` does) and samples a continuation.

    It is due every `eval_every` steps and after the last: the last scores every validation id, the
    others an evenly spread subset of the windows (eval_batches x batch_size of them, the same ones every
    time). With `track_heads` it also measures the heads (`lm.heads.track_heads`: previous-token scores on
    the validation text's first window, induction scores, the in-context score on up to IN_CONTEXT_WINDOWS
    validation windows, the same ones every time). It remembers what scoring a window, sampling and
    tracking took, for a time budget to leave room for the closing evaluation.
    """

    def __init__(self, model: GPT, setup: TrainingSetup, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.config, self.tokenizer = model, setup.train_config, setup.tokenizer
        self.tokens, self.context_length = setup.splits.val, setup.model_config.context_length
        self.learned = setup.splits.val_mask  # conversations: only the assistant's tokens are scored
        self.device, self.dtype = device, dtype
        self.byte_lengths = token_byte_lengths(setup.tokenizer).to(device)
        self.windows = len(plan_windows(len(self.tokens) + 1, self.context_length).starts)
        self.window_seconds: float | None = None
        self.sample_seconds = 0.0
        self.track_seconds = 0.0
        if self.config.track_heads:
            repeated_random_ids(model, setup.tokenizer)  # raises now if the context is too short for induction
            self.track_text = tracking_text(setup.tokenizer, self.tokens, self.context_length)
            self.track_windows = in_context_windows(self.tokens, self.context_length)

    def due(self, step: int, final: bool) -> bool:
        return step % self.config.eval_every == 0 or final

    def evaluate(self, step: int, train_loss: float | None = None, complete: bool = True) -> Evaluation:
        """Loss and bits per byte on the validation text, and a sample; `complete` scores every id."""
        config = self.config
        started = time.perf_counter()
        scores = self._score(config.batch_size, None if complete else config.eval_batches * config.batch_size)
        scored = time.perf_counter()
        self.window_seconds = (scored - started) / scores.windows
        sample = self.sample(step)
        self.sample_seconds = time.perf_counter() - scored
        heads = self.track() if config.track_heads else None
        self.model.train()
        total = scores.total
        return Evaluation(val_loss=total.loss, val_bpb=total.bits_per_byte, train_loss=train_loss, sample=sample,
                          val_tokens=total.tokens, val_complete=complete, heads=heads)

    def track(self) -> HeadTracking:
        """The heads' detector scores and the in-context score (the model in evaluation mode; the caller puts
        it back)."""
        started = time.perf_counter()
        self.model.eval()
        with autocast(self.device, self.dtype):
            tracked = track_heads(self.model, self.tokenizer, self.track_text, self.track_windows,
                                  self.config.batch_size)
        self.track_seconds = time.perf_counter() - started
        return tracked

    def sample(self, step: int) -> str:
        """A short continuation of <|endoftext|> (the start of a new document), seeded: the same at a given step."""
        if self.config.sample_tokens == 0:
            return ""
        return complete(self.model, self.tokenizer, "", self.config.sample_tokens, seed=self.config.seed + step)

    def closing_seconds(self) -> float:
        """What scoring every window and sampling take, as last measured (a batch of windows is timed once
        if no evaluation has run yet)."""
        if self.window_seconds is None:
            self._time_windows()
        assert self.window_seconds is not None
        return self.windows * self.window_seconds + self.sample_seconds + self.track_seconds

    def _time_windows(self) -> None:
        """Time a batch of validation windows (after a first, untimed one: the first pass through a model
        pays for its kernels' one-time set-up)."""
        windows = self.config.batch_size
        self._score(windows, windows)
        started = time.perf_counter()
        scores = self._score(windows, windows)
        self.window_seconds = (time.perf_counter() - started) / scores.windows
        if self.config.track_heads:
            self.track()
        self.model.train()

    def _score(self, batch_size: int, max_windows: int | None) -> Scores:
        """`score_tokens` on the validation text, the model in evaluation mode (the caller puts it back)."""
        self.model.eval()
        with autocast(self.device, self.dtype):
            return score_tokens(self.model, self.tokens, self.byte_lengths, self.context_length,
                                eot_id=self.tokenizer.eot_id, batch_size=batch_size, max_windows=max_windows,
                                learned=self.learned)


class Checkpoints:
    """What a checkpoint holds (weights, optimiser state, sampler position, random states, the fp16 scaler's
    scale and the run's counters), when one is written (every `every` steps and after the last), and
    restoring one. It remembers the last step saved and what saving took."""

    def __init__(self, trainer: Trainer, every: int) -> None:
        self.trainer, self.every = trainer, every
        self.last_step = 0
        self.save_seconds = 0.0

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def save(self, step: int, elapsed_s: float, tokens_seen: int) -> None:
        """Write a checkpoint (with FSDP every process must call this: it gathers); all wait for it."""
        started = time.perf_counter()
        t = self.trainer
        weights = (checkpoint.deduplicate(get_model_state_dict(t.model, options=FULL_ON_CPU), t.model.config)
                   if t.fsdp else checkpoint.model_state_dict(t.model))
        trained = None
        if t.average is not None:  # the average is the run's weights; the trained ones are kept to resume from
            trained = {name: tensor.clone() for name, tensor in weights.items()}
            with t.average.swapped_in():
                weights = {name: tensor.clone() for name, tensor in checkpoint.model_state_dict(t.model).items()}
        state: dict[str, Any] = {
            "step": step, "elapsed_s": elapsed_s, "tokens_seen": tokens_seen,
            "optimizer": get_optimizer_state_dict(t.model, t.optimizers, options=FULL_ON_CPU),
            "sampler": t.sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
        }
        if t.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(t.device)
        if t.scaler is not None:
            state["scaler"] = t.scaler.state_dict()
        if trained is not None:
            state["trained_weights"] = trained
        if t.dist.is_main:
            checkpoint.save_checkpoint(t.setup.run_dir, weights, state, step)
        distributed.barrier(t.dist)  # nobody runs ahead of a checkpoint being written
        self.last_step = step
        self.save_seconds = time.perf_counter() - started

    def restore(self, state: dict[str, Any]) -> tuple[int, float, int]:
        """Put the optimiser, sampler, random states and scaler back as saved; returns the step, elapsed seconds
        and tokens seen. The metrics logged after the checkpoint are dropped: the run takes those steps again."""
        t = self.trainer
        if "trained_weights" in state:  # the weights file held the average (already taken as its start)
            t.model.load_state_dict(state["trained_weights"], strict=False)
        # Every process read the same full checkpoint; FSDP keeps its own shard of each tensor.
        set_optimizer_state_dict(t.model, t.optimizers, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=t.fsdp))
        t.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if t.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], t.device)
        if t.scaler is not None and "scaler" in state:
            t.scaler.load_state_dict(state["scaler"])
        if t.dist.is_main:
            rundir.truncate_metrics(t.setup.run_dir, state["step"])
        self.last_step = state["step"]
        return state["step"], state["elapsed_s"], state["tokens_seen"]


def write_run_files(setup: TrainingSetup, parameters: int) -> None:
    """config.json (rewritten on resume: the schedule may have changed) and, for a new run, the tokenizer."""
    extra = {**setup.extra_config, "parameters": parameters}
    rundir.write_config(setup.run_dir, setup.model_config, setup.train_config, extra)
    if not setup.resume:
        setup.tokenizer.save(setup.run_dir / rundir.TOKENIZER, overwrite=True)
    if setup.chat_format is not None:
        save_chat_format(setup.run_dir, setup.chat_format)


class TrainingMeter:
    """The training loss and speed between log lines, and the mean of the logged losses between evaluations.

    Losses are summed on the device, so the steps between log lines never wait for the GPU; reading them
    (with several processes, their mean over all) waits once, and checks that training has not diverged.
    """

    def __init__(self, dist: Distributed, device: torch.device, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float | None, lr: float) -> None:
        """`peak_flops`: one device's (None where unknown: no MFU); `lr`: the peak learning rate, to advise on."""
        self.dist, self.tokens_per_step, self.flops_per_token, self.lr = dist, tokens_per_step, flops_per_token, lr
        self.peak_flops = peak_flops * dist.world_size if peak_flops is not None else None  # all processes'
        self.loss = torch.zeros((), device=device)
        self.steps, self.seconds = 0, 0.0
        self.logged: list[float] = []

    def add(self, loss: torch.Tensor) -> None:
        """A step's loss, still on the device."""
        self.loss += loss
        self.steps += 1

    def lap(self, started: float) -> None:
        """Count the time since `started` as training time."""
        self.seconds += time.perf_counter() - started

    def read(self, started: float, step: int, last_checkpoint: int) -> tuple[float, float, float | None]:
        """The mean loss, tokens per second and MFU since the last read (the time since `started` counted, the
        wait for the device included); starts the next interval."""
        loss = self.check_finite(step, last_checkpoint)  # syncs the GPU
        self.lap(started)
        tokens_per_s = self.steps * self.tokens_per_step / self.seconds
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops is not None else None
        self.logged.append(loss)
        self.loss.zero_()
        self.steps, self.seconds = 0, 0.0
        return loss, tokens_per_s, mfu

    def check_finite(self, step: int, last_checkpoint: int) -> float:
        """The mean loss since the last read; raises TrainingDiverged if it is NaN or infinite."""
        loss = distributed.mean(self.dist, self.loss.clone()).item() / max(self.steps, 1)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} before step {step}; {_kept(last_checkpoint)}. Lower --lr (now "
                f"{self.lr:g}) or raise --warmup-steps, then start again or --resume")
        return loss

    def mean_since_evaluation(self) -> float | None:
        """The mean of the losses read since the last call (None if none was), for an evaluation to report."""
        logged, self.logged = self.logged, []
        return sum(logged) / len(logged) if logged else None


@contextlib.contextmanager
def collective_failures(dist: Distributed, step: int, last_checkpoint: int) -> Iterator[None]:
    """With several processes, a step that fails in a collective operation usually means another process died
    and the collective lost its peer: say so (and what is kept) instead of showing the collective's error."""
    try:
        yield
    except RuntimeError as err:
        if not dist.enabled:
            raise
        raise DistributedError(
            f"a collective operation failed at step {step} ({str(err).splitlines()[0][:120]}); another process "
            f"has probably failed (see its message); {_kept(last_checkpoint)}") from err


def metrics_record(update: TrainUpdate) -> dict[str, Any]:
    """One line of metrics.jsonl: what a step reported, rounded."""
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
        heads = update.evaluation.heads
        if heads is not None:  # per layer, per head
            record["previous_token"] = [[round(score, 4) for score in layer] for layer in heads.previous_token]
            record["induction"] = [[round(score, 4) for score in layer] for layer in heads.induction]
            record["in_context"] = round(heads.in_context, 4)
    return record
