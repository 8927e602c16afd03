"""Serving many requests at once: continuous batching over one KV cache, with no I/O.

A `Scheduler` owns a model and a static `KVCache` with one row per slot (`max_batch` rows). Requests
(`GenerationRequest`: prompt ids, sampling, seed, stops, a token budget) are submitted from any
thread and wait in a bounded queue; a worker thread (`start`, or `run` in a thread of the caller's
own) repeats `step`:

1. sequences that finished or were cancelled leave the batch: the last row's cache is copied into
   the freed row, so the active sequences always fill rows 0..k-1 and a step reads only those;
2. waiting requests join while there are free rows: each prompt is prefilled into its row alone
   (one forward over the prompt through a one-row `KVCache.view`), and its first token is sampled
   from that pass;
3. one decode step: every active sequence's last token, at its own position, in one batched step:
   through lm's C kernels where they apply (a float32 model on a CPU: `CpuDecoder.step_at`, one call
   for the whole batch), else one forward of the model.

Sequences sit at different positions, so the decode step gives the cache per-row positions
(`positions` of shape (batch, 1)): each row writes its token's keys and values at its own position
and attends to its own earlier positions only (the cache's per-row mask); positions past a row's own
hold whatever an earlier occupant left and are masked out. The view reads the first max(position)+1
positions, not the whole context. Nobody waits for the batch to drain: a sequence leaves the step it
finishes, and a waiting one takes its row at the next step.

Each request has its own seeded `torch.Generator`, so a `seed` gives the same text whoever else is in
the batch, and greedy decoding (temperature 0) gives what the request decoded alone gives (up to the
float rounding of a different batch shape, which only a near tie between the top two tokens would
show). Tokens are turned into text as `lm.generate` does: whole UTF-8 characters only
(`TokenTextDecoder`), nothing from a stop string on (`StopScanner`). A sequence stops at a token in
`stop_ids` (`<|endoftext|>`, a chat's end-of-turn token), at a stop string (finish reason "stop"), or
after `max_tokens` ("length").

What a request produced arrives as `Update`s through the callback given to `submit`, called on the
worker thread: a front end hands them to its own threads or event loop (the HTTP server puts them on
an asyncio queue with `call_soon_threadsafe`). After `Ticket.cancel` the sequence takes no more
tokens (an update already being delivered may still arrive), and its row is free at the next step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lm.cpu_decode import CpuDecoder, cpu_decoder_for
from lm.errors import InputError, LmError, UsageError
from lm.generate import StopScanner, random_seed
from lm.model import GPT, KVCache
from lm.sampling import SamplingConfig, sample_next
from lm.tokenizer import Tokenizer, TokenTextDecoder

STOP, LENGTH = "stop", "length"  # finish reasons, as OpenAI's API names them
# OpenAI's defaults: temperature 1, the whole distribution (no top-k, no top-p).
DEFAULT_SAMPLING = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)


class QueueFull(LmError):
    """Every row is busy and the waiting queue is full: the request was not taken (try again later)."""


class ContextOverflow(InputError):
    """The prompt and the tokens asked for do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        super().__init__(f"the prompt has {prompt_tokens:,} tokens and {max_tokens:,} more were asked for, "
                         f"{prompt_tokens + max_tokens:,} in all; the model's context holds {context_length:,}")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a continuation of `prompt`, at most `max_tokens` long."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig = DEFAULT_SAMPLING
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()  # texts that end the sequence (not included in its text)
    stop_ids: frozenset[int] = frozenset()  # tokens that end the sequence (counted, their text not included)


@dataclass(frozen=True)
class Update:
    """New text of one request (whole characters), and where it stands."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens sampled so far, a stop token included
    finish_reason: str | None = None  # STOP or LENGTH once finished
    error: str | None = None  # the step failed (out of memory, a bug); the request is over

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Ticket:
    """A submitted request's handle: `cancel` it to stop its generation and free its row."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.cancelled = False
        self.done = False  # finished, failed or cancelled: no more updates come

    def cancel(self) -> None:
        """Stop generating for this request (nothing happens when it is done already)."""
        self._scheduler.cancel(self)


@dataclass
class SchedulerCounts:
    """What a scheduler holds and has done, at one moment."""

    active: int  # sequences holding a row of the batch
    waiting: int  # submitted, not yet in the batch
    finished: int  # ended by a stop or their token budget
    cancelled: int
    failed: int
    peak_batch: int  # the most sequences one decode step has carried


@dataclass
class _Sequence:
    request: GenerationRequest
    on_update: Callable[[Update], None]
    ticket: Ticket
    generator: torch.Generator
    text: TokenTextDecoder
    scanner: StopScanner
    position: int = 0  # tokens in its cache row: where the next token's keys and values go
    last_token: int = -1  # sampled, not yet in the cache
    generated: int = 0
    finished: bool = False


class Scheduler:
    """Continuous batching of generation requests for one model (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise UsageError(f"--max-queue must be 0 or more, got {max_queue}")
        param = next(model.parameters())
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = param.device
        self.context_length = model.config.context_length
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = KVCache(model.config, max_batch, param.device, param.dtype, static=True)
        self._cpu_decoder: CpuDecoder | None = cpu_decoder_for(model)
        if self._cpu_decoder is not None:
            self._cpu_decoder.prepare(max_batch)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()  # guarded by the lock
        self._active: list[_Sequence] = []  # the worker's own: sequence i holds cache row i
        self._occupied = 0  # len(_active) as other threads may read it (under the lock)
        self._closed = False
        self._finished = self._cancelled = self._failed = self._peak_batch = 0

    @property
    def kernels(self) -> str:
        """What runs the decode step, for start-up lines: lm's C kernels (and their build) or PyTorch."""
        if self._cpu_decoder is None:
            return "PyTorch"
        return self._cpu_decoder.kernels(1)

    # Any thread --------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_update: Callable[[Update], None]) -> Ticket:
        """Queue `request`; `on_update` gets its text as it comes, on the worker thread.

        Raises `ContextOverflow` when the prompt and `max_tokens` do not fit the context, `InputError`
        for an empty prompt or a token outside the vocabulary, `UsageError` for a budget under 1, and
        `QueueFull` when every row is busy and `max_queue` requests wait already.
        """
        self._check(request)
        ticket = Ticket(self)
        sequence = _Sequence(request, on_update, ticket,
                             torch.Generator(device=self.device).manual_seed(
                                 request.seed if request.seed is not None else random_seed()),
                             TokenTextDecoder(self.tokenizer), StopScanner(request.stop))
        with self._wakeup:
            if self._closed:
                raise QueueFull("the server is shutting down")
            free_rows = self.max_batch - self._occupied
            if len(self._waiting) >= free_rows + self.max_queue:
                raise QueueFull(f"all {self.max_batch} sequences of the batch are busy and {len(self._waiting)} "
                                "requests wait already; try again shortly")
            self._waiting.append(sequence)
            self._wakeup.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop the request of `ticket`: it leaves the queue now, or the batch at the next step."""
        with self._wakeup:
            if ticket.done or ticket.cancelled:
                return
            ticket.cancelled = True
            self._cancelled += 1
            for sequence in self._waiting:
                if sequence.ticket is ticket:
                    self._waiting.remove(sequence)
                    ticket.done = True
                    break
            self._wakeup.notify()

    def counts(self) -> SchedulerCounts:
        with self._lock:
            return SchedulerCounts(self._occupied, len(self._waiting), self._finished, self._cancelled,
                                   self._failed, self._peak_batch)

    def start(self) -> threading.Thread:
        """Run the worker loop in a new daemon thread (stopped by `close`)."""
        thread = threading.Thread(target=self.run, name="lm-scheduler", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the worker loop after its current step; requests still held get an error update."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()

    # The worker thread -------------------------------------------------------------------------------

    def run(self) -> None:
        """Step while there is work, sleep while there is none, until `close`."""
        while True:
            with self._wakeup:
                while not self._closed and not self._waiting and not self._active:
                    self._wakeup.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as err:  # a failed step (out of memory, a bug) ends the requests it held, not the loop
                self._fail_all(f"generation failed: {type(err).__name__}: {err}")
        self._fail_all("the server is shutting down")

    @torch.inference_mode()
    def step(self) -> bool:
        """Release finished and cancelled sequences, admit waiting ones, decode one token for each.

        Returns whether any sequence is active or waiting afterwards.
        """
        self._release()
        self._admit()
        if self._active:
            self._decode()
            self._release()
        with self._lock:
            return bool(self._active or self._waiting)

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                sequence = self._waiting.popleft()
                self._active.append(sequence)
                self._occupied = len(self._active)
            self._prefill(sequence, row=len(self._active) - 1)
            if sequence.finished:  # its first token ended it (a stop, or a budget of one): the row is free again
                self._release()

    def _prefill(self, sequence: _Sequence, row: int) -> None:
        """Read the prompt into `row` of the cache and sample the first token from the last position's logits."""
        prompt = sequence.request.prompt
        view = self.cache.view(slice(row, row + 1), len(prompt))
        view.positions = torch.arange(len(prompt), device=self.device)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=view, logits_from=len(prompt) - 1)[0][:, -1]
        sequence.position = len(prompt)
        self._take(sequence, self._sample(logits, [sequence])[0])

    def _decode(self) -> None:
        """One token for every active sequence, each at its own position, in one forward."""
        active = self._active
        positions = torch.tensor([[s.position] for s in active], dtype=torch.long, device=self.device)
        ids = torch.tensor([[s.last_token] for s in active], dtype=torch.long, device=self.device)
        if self._cpu_decoder is not None:
            logits = self._cpu_decoder.step_at(ids, self.cache, positions)
        else:
            view = self.cache.view(slice(0, len(active)), max(s.position for s in active) + 1)
            view.positions = positions
            logits = self.model(ids, cache=view)[0][:, -1]
        self._peak_batch = max(self._peak_batch, len(active))
        for sequence in active:
            sequence.position += 1
        for sequence, token in zip(active, self._sample(logits, active), strict=True):
            if not sequence.finished and not sequence.ticket.cancelled:
                self._take(sequence, token)

    def _sample(self, logits: torch.Tensor, sequences: Sequence[_Sequence]) -> list[int]:
        """The next token of each row: greedy rows by one argmax, sampled rows each with its own generator."""
        greedy = [row for row, s in enumerate(sequences) if s.request.sampling.greedy]
        if len(greedy) == len(sequences):  # what sample_next does for greedy rows, without its copies
            return logits.argmax(dim=-1).tolist()
        tokens = torch.empty(len(sequences), dtype=torch.long, device=logits.device)
        if greedy:
            tokens[greedy] = sample_next(logits[greedy], sequences[greedy[0]].request.sampling)
        for row, sequence in enumerate(sequences):
            if not sequence.request.sampling.greedy:
                tokens[row] = sample_next(logits[row:row + 1], sequence.request.sampling, sequence.generator)[0]
        return tokens.tolist()  # waits for the device: the step is done

    def _take(self, sequence: _Sequence, token: int) -> None:
        """Account for a sampled token: its text, and whether the sequence ends with it."""
        request = sequence.request
        sequence.generated += 1
        sequence.last_token = token
        if token in request.stop_ids:
            shown, stopped = sequence.scanner.push(sequence.text.finish())
            self._finish(sequence, shown + ("" if stopped else sequence.scanner.finish()), STOP)
            return
        shown, stopped = sequence.scanner.push(sequence.text.push(token))
        if stopped:
            self._finish(sequence, shown, STOP)
        elif sequence.generated >= request.max_tokens:
            rest, stopped = sequence.scanner.push(sequence.text.finish())
            self._finish(sequence, shown + rest + ("" if stopped else sequence.scanner.finish()),
                         STOP if stopped else LENGTH)
        elif shown:
            self._notify(sequence, Update(shown, len(request.prompt), sequence.generated))

    def _finish(self, sequence: _Sequence, text: str, reason: str) -> None:
        with self._lock:  # done before the last update goes out: a cancel after it changes nothing
            sequence.finished = sequence.ticket.done = True
            self._finished += 1
        self._notify(sequence, Update(text, len(sequence.request.prompt), sequence.generated, reason))

    def _notify(self, sequence: _Sequence, update: Update) -> None:
        try:
            sequence.on_update(update)
        except Exception:  # whoever listened is gone (its event loop closed): nobody wants the rest
            sequence.ticket.cancel()

    def _release(self) -> None:
        """Drop finished and cancelled sequences from the batch, moving the last rows into the freed ones."""
        leaving = [row for row, s in enumerate(self._active) if s.finished or s.ticket.cancelled]
        if not leaving:
            return
        with self._lock:
            for row in reversed(leaving):  # from the end, so the last row is never one still to leave
                sequence, last = self._active[row], len(self._active) - 1
                if row != last:
                    self._move_row(last, row)
                    self._active[row] = self._active[last]
                self._active.pop()
                sequence.ticket.done = True
            self._occupied = len(self._active)

    def _move_row(self, source: int, target: int) -> None:
        """Copy the filled positions of cache row `source` into row `target`."""
        self.cache.copy_row(source, target, self._active[source].position)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            held = [*self._active, *self._waiting]
            self._active.clear()
            self._waiting.clear()
            self._occupied = 0
            for sequence in held:
                if not sequence.ticket.done and not sequence.ticket.cancelled:
                    self._failed += 1
                sequence.ticket.done = True
        for sequence in held:
            if not sequence.finished and not sequence.ticket.cancelled:
                self._notify(sequence, Update("", len(sequence.request.prompt), sequence.generated, error=message))

    def _check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise InputError("the prompt has no tokens; give some text")
        if request.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.context_length:
            raise ContextOverflow(len(request.prompt), request.max_tokens, self.context_length)
        vocab = self.model.config.vocab_size
        outside = [token for token in request.prompt if not 0 <= token < vocab]
        if outside:
            raise InputError(f"prompt token {outside[0]} is outside the vocabulary (0..{vocab - 1})")
        request.sampling.validate()
