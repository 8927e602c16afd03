"""Text generation: run the model, pick a next token, append it, repeat, over a KV cache.

The prompt is processed in one pass (prefill) that fills the cache with every prompt token's keys and
values; each new token then costs one step (decode): only its own keys and values are computed, and
it attends to the cached ones. Without the cache (`use_cache=False`) every step re-reads the window.

Past the context length the window slides: the last 3/4 of the context is kept, the cache is rebuilt
from it (one prefill), and generation continues. Cached and uncached generation slide at the same
tokens, so they compute the same logits.

`generate_tokens` yields token ids; `stream_completions` turns them into text pieces that are safe to
show as they come: whole UTF-8 characters only, nothing after a stop string or <|endoftext|>.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lm import cpu_kernels
from lm.cpu_decode import cpu_decoder_for, use_huge_pages
from lm.errors import InputError
from lm.int8 import quantize_int8
from lm.model import GPT, KVCache, use_decoding_layout
from lm.sampling import SamplingConfig, sample_next
from lm.tokenizer import Tokenizer, TokenTextDecoder


@dataclass
class GenerationStats:
    """Filled in while generating; read it when the iterator is exhausted (or closed)."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # steps taken: new tokens per sample
    samples: int = 1
    first_token_s: float = 0.0  # prefill and the first sampled token
    decode_s: float = 0.0  # every later step
    window_slides: int = 0  # times the context was full and the window moved on
    kept_tokens: int = 0  # tokens the window keeps when it slides
    seed: int = 0
    device: str = ""
    cached: bool = True
    kernels: str = "PyTorch"  # what ran the decode steps: PyTorch's operations or lm's C kernels

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps * self.samples / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class Step:
    ids: torch.Tensor  # (samples,) the new token of each sample, on the CPU
    logits: torch.Tensor  # (samples, vocab) the scores they were drawn from


def prepare_for_generation(model: GPT, dtype: torch.dtype = torch.float32, quantize: str = "none") -> GPT:
    """The model in eval mode, in `dtype`, weights laid out for decoding, optionally with int8 linear layers.

    lm's C kernels (lm/cpu_decode.py) read float32 weights in their own row layout; PyTorch's
    matrix-vector kernels, used everywhere else, prefer the transposed one (`use_decoding_layout`).
    """
    model = model.to(dtype).eval()
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not (on_cpu and dtype == torch.float32 and cpu_kernels.load() is not None):
        model = use_decoding_layout(model)
        return quantize_int8(model) if quantize == "int8" else model
    return use_huge_pages(quantize_int8(model) if quantize == "int8" else model)


class CompiledDecoder:
    """A torch.compile'd one-token decode step over a static KV cache.

    Every decode step has the same shapes (the cache is read whole, through a mask), so the step is
    compiled once and reused for every token, by every `generate_tokens` call given this decoder; on
    CUDA it is also captured as a CUDA graph ("reduce-overhead"), which removes the per-kernel launch
    cost that dominates batch-1 decoding on a GPU. The prompt (prefill) runs uncompiled.
    """

    def __init__(self, model: GPT, batch_size: int = 1, compile: bool = True) -> None:
        param = next(model.parameters())
        self.model = model
        self.cache = KVCache(model.config, batch_size, param.device, param.dtype, static=True)
        # The step writes into the cache's buffers. CUDA graphs replay fixed addresses and skip (fall
        # back to plain compiled code) a step that mutates an input they were not told is fixed:
        # these buffers are allocated once, so say so (what transformers' static cache does too).
        torch._dynamo.mark_static_address(self.cache.keys)
        torch._dynamo.mark_static_address(self.cache.values)
        if self.cache.ids is not None:
            torch._dynamo.mark_static_address(self.cache.ids)
        mode = "reduce-overhead" if param.device.type == "cuda" else None
        # compile=False runs the same static-shape step eagerly (for checking it, or where compiling fails).
        self._compiled = (torch.compile(self._decode, mode=mode, fullgraph=True, dynamic=False) if compile
                          else self._decode)

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=self.cache)[0][:, -1]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.positions = torch.arange(ids.size(1), device=ids.device)
        return self._decode(ids)

    def step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        self.cache.positions = torch.tensor([position], device=ids.device)
        # A CUDA graph's output lives in memory the next replay overwrites (torch raises if it is read
        # after that): the copy lets callers keep each step's logits. One vocabulary-sized row.
        return self._compiled(ids).clone()


@dataclass(frozen=True)
class TokenStep:
    """How one new token per sample runs through a model over a default (non-static) `KVCache`."""

    run: Callable[[torch.Tensor, KVCache], torch.Tensor]  # (ids (batch, 1), cache) -> logits (batch, vocab)
    kernels: str  # what runs it, for stats: PyTorch's operations or lm's C kernels


def token_step(model: GPT, batch: int = 1) -> TokenStep:
    """The fastest step for `model` at `batch` samples: lm's C kernels where they apply (a CPU, float32),
    else `GPT.decode_step`, else the forward pass.

    decode_step skips the model's own __call__: only for a plain GPT, not one whose forward hooks do
    work (FSDP2 gathers its sharded parameters there) or a compiled wrapper.
    """
    cpu_decoder = cpu_decoder_for(model)
    if cpu_decoder is not None:
        return TokenStep(cpu_decoder.step, cpu_decoder.kernels(batch))
    if type(model) is GPT:
        return TokenStep(model.decode_step, "PyTorch")
    return TokenStep(lambda ids, cache: model(ids, cache=cache)[0][:, -1], "PyTorch")


def window_keep(context_length: int) -> int:
    """How many of the latest tokens a full window keeps when it slides."""
    return max(1, context_length * 3 // 4)


def random_seed() -> int:
    return secrets.randbits(31)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    *,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    decoder: CompiledDecoder | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per new token (for all samples at once), up to `max_new_tokens`.

    The same `seed` gives the same tokens. Stop early by leaving the loop. With a `decoder`, decode
    steps run its compiled step over its static cache.
    """
    if decoder is not None and decoder.cache.keys.size(1) != num_samples:
        raise ValueError(f"the decoder was built for batch {decoder.cache.keys.size(1)}, not {num_samples}")
    if not prompt:
        raise InputError("the prompt has no tokens; give some text (or start from <|endoftext|>)")
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    context, keep = model.config.context_length, window_keep(model.config.context_length)
    stats.prompt_tokens, stats.samples, stats.cached = len(prompt), num_samples, use_cache
    stats.seed = seed if seed is not None else random_seed()
    stats.device, stats.kept_tokens = str(device), keep
    generator = torch.Generator(device=device).manual_seed(stats.seed)
    history = torch.empty(num_samples, len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    history[:, :len(prompt)] = torch.tensor(list(prompt), device=device)
    filled = len(prompt)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(num_samples, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[:, history[0, :filled]] = True
    cache = KVCache(model.config, num_samples, device, next(model.parameters()).dtype) if use_cache else None
    cached_step = token_step(model, num_samples) if cache is not None and decoder is None else None
    if cached_step is not None:
        stats.kernels = cached_step.kernels

    def run_window() -> torch.Tensor:
        """Logits after reading the whole current window (a prefill when caching)."""
        if decoder is not None:
            return decoder.prefill(history[:, start:filled])
        if cache is not None:
            cache.length = 0
        return model(history[:, start:filled], cache=cache)[0][:, -1]

    started = time.perf_counter()
    start = 0 if filled <= context else filled - keep
    stats.window_slides += start > 0
    logits = run_window()
    for step in range(max_new_tokens):
        ids = sample_next(logits, sampling, generator, seen)
        history[:, filled] = ids
        filled += 1
        if seen is not None:
            seen[torch.arange(num_samples, device=device), ids] = True
        cpu_ids = ids.cpu()  # waits for the device: the step is done
        now = time.perf_counter()
        if step == 0:
            stats.first_token_s = now - started
        else:
            stats.decode_s += now - started
        stats.new_tokens = step + 1
        yield Step(cpu_ids, logits)
        if step == max_new_tokens - 1:
            return
        started = time.perf_counter()
        if filled - start > context:  # the window is full: slide it
            start = filled - keep
            stats.window_slides += 1
            logits = run_window()
        elif decoder is not None:
            logits = decoder.step(ids[:, None], filled - 1 - start)
        elif cached_step is not None:
            logits = cached_step.run(ids[:, None], cache)
        else:
            logits = model(history[:, start:filled])[0][:, -1]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids, after <|endoftext|>: the model saw each training document start after one."""
    start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    ids = start + tokenizer.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty and this tokenizer has no <|endoftext|> to start from; "
                         "give a --prompt")
    return ids


class StopScanner:
    """Holds back text that could be the beginning of a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to show now, and whether a stop string was reached (its text is never shown)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            shown, self.pending = self.pending[:min(found)], ""
            return shown, True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        shown, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return shown, False

    def finish(self) -> str:
        shown, self.pending = self.pending, ""
        return shown


@dataclass
class Piece:
    sample: int
    text: str


def stream_completions(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    *,
    stops: Sequence[str] = (),
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    decoder: CompiledDecoder | None = None,
) -> Iterator[Piece]:
    """Continuations of the prompt as text pieces, per sample, as they are generated.

    A sample ends at <|endoftext|>, at a stop string (not included) or after `max_new_tokens`.
    """
    decoders = [TokenTextDecoder(tokenizer) for _ in range(num_samples)]
    scanners = [StopScanner(stops) for _ in range(num_samples)]
    done = [False] * num_samples
    for step in generate_tokens(model, prompt_ids, max_new_tokens, sampling, num_samples=num_samples,
                                seed=seed, use_cache=use_cache, stats=stats, decoder=decoder):
        for sample, token in enumerate(step.ids.tolist()):
            if done[sample]:
                continue
            if token == tokenizer.eot_id:
                text, stopped = scanners[sample].push(decoders[sample].finish())
                text += "" if stopped else scanners[sample].finish()
                done[sample] = True
            else:
                text, done[sample] = scanners[sample].push(decoders[sample].push(token))
            if text:
                yield Piece(sample, text)
        if all(done):
            return
    for sample in range(num_samples):
        if not done[sample]:
            text, stopped = scanners[sample].push(decoders[sample].finish())
            text += "" if stopped else scanners[sample].finish()
            if text:
                yield Piece(sample, text)


def complete(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
             sampling: SamplingConfig | None = None, seed: int | None = None) -> str:
    """The continuation of `prompt` as one string (sample 0)."""
    pieces = stream_completions(model, tokenizer, encode_prompt(tokenizer, prompt), max_new_tokens,
                                sampling or SamplingConfig(), seed=seed)
    return "".join(piece.text for piece in pieces)
