"""`lm generate`: continue a prompt with a trained model, streaming the text as it comes."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lm.generate import CompiledDecoder, GenerationStats
    from lm.model import GPT
    from lm.sampling import SamplingConfig

SAMPLING = "Sampling (applied in this order: repetition penalty, temperature, top-k, top-p, min-p)"
HARDWARE = "Hardware"


def check_decoding_options(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                           max_new_tokens: int, dtype: str, quantize: str) -> SamplingConfig:
    """The sampling settings, every decoding option checked (`lm generate` and `lm chat` share them)."""
    from lm.config import DTYPES
    from lm.errors import UsageError
    from lm.sampling import SamplingConfig

    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).validate()
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if quantize not in ("none", "int8"):
        raise UsageError(f"--quantize {quantize!r} is not one of: none, int8")
    return sampling


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", metavar="TEXT", show_default=False,
        help="Text to continue; without it (or --prompt-file) a new document starts.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", metavar="FILE", show_default=False, help="Read the prompt from a UTF-8 file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", "-n", metavar="N", help="Tokens to generate at most, per sample.")] = 200,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", metavar="T", rich_help_panel=SAMPLING,
        help="Below 1 sharpens, above 1 flattens; 0 always takes the likeliest token.")] = 0.8,
    top_k: Annotated[int, typer.Option(
        "--top-k", metavar="K", rich_help_panel=SAMPLING, help="Sample among the K likeliest tokens (0: off).")] = 50,
    top_p: Annotated[float, typer.Option(
        "--top-p", metavar="P", rich_help_panel=SAMPLING,
        help="Sample among the likeliest tokens holding probability P (1: off).")] = 1.0,
    min_p: Annotated[float, typer.Option(
        "--min-p", metavar="P", rich_help_panel=SAMPLING,
        help="Drop tokens less than P times as likely as the likeliest (0: off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", metavar="R", rich_help_panel=SAMPLING,
        help="Divide the scores of tokens already in the text by R (1: off; 1.1-1.3 typical).")] = 1.0,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="S", rich_help_panel=SAMPLING, show_default=False,
        help="Seed for sampling: the same seed gives the same text [default: random, shown by --stats].")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", metavar="TEXT", show_default=False,
        help="Stop when this text appears (not printed); repeatable. <|endoftext|> always stops.")] = None,
    num_samples: Annotated[int, typer.Option(
        "--num-samples", metavar="N", help="Continuations to generate, in one batch from one prefill.")] = 1,
    device: Annotated[str, typer.Option(
        "--device", metavar="DEV", rich_help_panel=HARDWARE, help="auto | cpu | cuda | mps.")] = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", metavar="TYPE", rich_help_panel=HARDWARE,
        help="auto | float32 | bfloat16 | float16: the weights' precision (auto: bf16 on GPUs, fp32 on CPU).")
    ] = "auto",
    quantize: Annotated[str, typer.Option(
        "--quantize", metavar="KIND", rich_help_panel=HARDWARE,
        help="none | int8: int8 weights in linear layers (CPU), ~4x less to read per token.")] = "none",
    kv_cache: Annotated[bool, typer.Option(
        "--kv-cache/--no-kv-cache", rich_help_panel=HARDWARE, show_default=False,
        help="Cache keys and values so each token costs one step [default: on].")] = True,
    compile: Annotated[bool, typer.Option(
        "--compile", metavar="", rich_help_panel=HARDWARE,
        help="Compile the decode step (static shapes; CUDA graphs on GPUs): a slow start, faster steps.")] = False,
    stats: Annotated[bool, typer.Option(
        "--stats", metavar="", help="Print token counts, time to first token and tokens/s to stderr.")] = False,
) -> None:
    """Generate text from a trained model, streamed as it is produced.

    Standard output gets the prompt and its continuation and nothing else; notices and --stats go to
    standard error.
    """
    from lm.errors import UsageError

    # Every value is checked before the model is loaded.
    sampling = check_decoding_options(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, dtype,
                                      quantize)
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    if compile and not kv_cache:
        raise UsageError("--compile compiles the cached decode step; drop it or drop --no-kv-cache")
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        from lm.textfiles import read_text_option

        prompt = read_text_option(prompt_file, "--prompt-file")
    if prompt is not None and not prompt:
        raise UsageError("the prompt is empty; give some text, or leave out --prompt to start a new document")

    from lm.checkpoint import load_run
    from lm.device import resolve_device, resolve_dtype
    from lm.generate import GenerationStats, encode_prompt, prepare_for_generation, stream_completions

    torch_device = resolve_device(device)
    model, tokenizer, _ = load_run(run_dir, torch_device)
    model = prepare_for_generation(model, resolve_dtype(dtype, torch_device), quantize)
    prompt_ids = encode_prompt(tokenizer, prompt or "")
    decoder = _compiled_decoder(model, prompt_ids, sampling, num_samples) if compile else None
    generation = GenerationStats()
    texts = [""] * num_samples
    out = sys.stdout
    out.write(prompt or "")
    out.flush()
    for piece in stream_completions(model, tokenizer, prompt_ids, max_new_tokens, sampling, stops=stop or (),
                                    num_samples=num_samples, seed=seed, use_cache=kv_cache, stats=generation,
                                    decoder=decoder):
        texts[piece.sample] += piece.text
        if piece.sample == 0:  # the first sample streams; the others are printed when all are done
            out.write(piece.text)
            out.flush()
    shown = [(prompt or "") + text for text in texts]
    # The stats table must not start mid-line when it shares the stream (2>&1, make demo's log).
    end_last = stats and _stderr_joins_stdout()
    for index, text in enumerate(shown):
        if index > 0:
            _rule()
            out.write(text)
        _end_line(text, always=index < num_samples - 1 or end_last)
    out.flush()
    if stats:
        _print_stats(generation, str(next(iter(model.parameters())).dtype).removeprefix("torch."), quantize)


def _compiled_decoder(model: GPT, prompt_ids: list[int], sampling: SamplingConfig,
                      num_samples: int) -> CompiledDecoder:
    """Compile the decode step and run it once, so that compiling (seconds, once) is not counted as
    generating."""
    from lm.cli.render import stderr
    from lm.generate import CompiledDecoder, generate_tokens

    decoder = CompiledDecoder(model, num_samples)
    with stderr().status("compiling the decode step (once)"):
        for _ in generate_tokens(model, prompt_ids, 2, sampling, num_samples=num_samples, seed=0, decoder=decoder):
            pass
    return decoder


def _end_line(text: str, always: bool = False) -> None:
    # In a terminal (or before a rule) finish the line; into a pipe or file, write exactly the text.
    if (always or sys.stdout.isatty()) and not text.endswith("\n"):
        sys.stdout.write("\n")


def _stderr_joins_stdout() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):  # replaced streams (tests) have no descriptor
        return False


def _rule() -> None:
    from lm.cli.render import stdout

    stdout().rule(style="dim")


def _print_stats(stats: GenerationStats, dtype: str, quantize: str) -> None:
    from rich.table import Table

    from lm.cli.render import stderr
    from lm.int8 import kernel_name

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("prompt tokens", f"{stats.prompt_tokens:,} (with the <|endoftext|> it starts after)")
    table.add_row("new tokens", f"{stats.new_tokens:,}" + (f" x {stats.samples} samples" if stats.samples > 1 else ""))
    table.add_row("time to first token", f"{stats.first_token_s * 1000:,.1f} ms")
    table.add_row("decode", f"{stats.decode_tokens_per_s:,.1f} tokens/s"
                  + (f" (KV cache, {stats.kernels})" if stats.cached
                     else " (no KV cache: each step re-reads the context)"))
    precision = dtype + (f", int8 linear layers ({kernel_name()} kernel)" if quantize == "int8" else "")
    table.add_row("device", f"{stats.device}, {precision}")
    table.add_row("seed", str(stats.seed))
    if stats.window_slides:
        table.add_row("context", f"full {stats.window_slides} time(s): the window slid to the last "
                                 f"{stats.kept_tokens} tokens and generation went on")
    stderr().print(table)
