"""Serving speed against llama.cpp: `lm serve` and llama.cpp's `llama-server`, over HTTP, on one run.

Both servers serve the same weights: an lm run (by default GPT-2 small's shape at vocab 8192, 12 x 768,
random weights through lm's own initialisation, the run bench/llama_cpp.py measures decoding on; speed
does not depend on the weights) and its float32 GGUF export (`lm export --format gguf`); with --weights int8,
`lm serve --quantize int8` against the Q8_0 export (both 8-bit weights with a scale per row or block). Each listens on
127.0.0.1 on a free port with the same thread count (`lm serve` through OMP_NUM_THREADS, llama-server
through `-t`/`-tb`), room for 8 sequences at once (`lm serve --max-batch 8`; llama-server `-np 8`
slots and `-c` 8 x the model's context, so each slot holds one context) and no prompt cache
(llama-server `--no-cache-prompt --cache-ram 0` and "cache_prompt": false in every request; lm serve
keeps none). Otherwise llama-server runs with its defaults (an f16 KV cache, flash attention "auto";
lm's cache is float32). One client drives both: streamed
`POST /v1/completions` with the same body (the prompt as token ids, <|endoftext|> first as `lm generate`
starts, so both read the same tokens; "temperature": 0, greedy; "max_tokens"; "ignore_eos": true, which
llama-server honours and lm serve ignores, so a stream of lm's that meets <|endoftext|> ends early and
its speed is counted over the tokens it produced; the table says how many each produced).

Measured, in alternating turns (lm, llama-server, lm, llama-server ...), median of --rounds:
1. One stream: time to first token (request sent to the first text) and decode tokens/s (the tokens
   after the first, over the time from the first to the last). Target: lm >= 0.9x llama-server's speed.
2. 8 concurrent streams (8 different prompts, sent together): aggregate tokens/s (all tokens over the
   time from the first request to the last token). Targets: lm >= 0.8x llama-server, and >= 2x lm's own
   one-stream rate counted the same way (tokens over the time from request to last token): batching works.

On a machine busy with other work, give the servers fewer threads than the cores left free: a thread
descheduled mid-step holds up the others, and llama.cpp's threads, which wait for each other spinning,
then lose most of their speed (on 2 shared cores at load 3-4, llama-bench -t 2 decoded 10 tokens/s
where -t 1 decoded 41); the table names the load average before and after, and warns.

llama-server is built once from llama-cpp-python's sources in the build folder of bench/llama_cpp.py
(several minutes on 2 cores; the binaries built there already are kept). Needs `lm[serve]` and httpx.

    python bench/serve.py [--rounds 5] [--threads 2] [--streams 8] [--max-tokens 64] [--prompt-tokens 48]
                          [--weights f32|int8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import httpx
from _measure import write_summary
from llama_cpp import (
    FAMILY_FLAGS,
    LLAMA_CPP_PYTHON,
    LLAMA_CPP_PYTHON_VERSION,
    LM,
    SERVER,
    TARGETS,
    build_llama_cpp,
    gguf_of,
    random_run,
    tokenizer_and_corpus,
)
from rich.console import Console
from rich.table import Table

from lm import rundir
from lm.cache import cache_dir
from lm.tokenizer import Tokenizer

HOST = "127.0.0.1"
# --weights: lm serve's --quantize, the GGUF export's type, and how the table names the pair
QUANTIZE = {"f32": "none", "int8": "int8"}
GGUF_TYPE = {"f32": "f32", "int8": "q8_0"}
WEIGHTS = {"f32": "float32 weights", "int8": "int8 weights (lm's per-row int8 against Q8_0)"}
STARTUP_S = 300  # loading a model and (lm) importing torch, on a busy machine
console = Console(width=130)


# the two servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    base_url: str
    model: str  # the `model` of requests
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_lm(run: Path, threads: int, slots: int, weights: str, log: Path) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("wb") as out:
        process = subprocess.Popen([LM, "serve", str(run), "--host", HOST, "--port", str(port), "--device", "cpu",
                                    "--dtype", "float32", "--quantize", QUANTIZE[weights], "--max-batch", str(slots)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server("lm serve", f"http://{HOST}:{port}/v1", run.resolve().name, process, log)


def start_llama(bin_dir: Path, gguf: Path, threads: int, slots: int, context: int, log: Path) -> Server:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([bin_dir / SERVER, "-m", str(gguf), "--host", HOST, "--port", str(port),
                                    "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                                    "-c", str(slots * context), "--no-cache-prompt", "--cache-ram", "0", "--no-webui",
                                    "--alias", gguf.stem],
                                   stdout=out, stderr=subprocess.STDOUT)
    return Server("llama-server", f"http://{HOST}:{port}/v1", gguf.stem, process, log)


def wait_until_up(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            sys.exit(f"{server.name} stopped (exit {server.process.returncode}):\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/models", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"{server.name} did not answer within {STARTUP_S} s; its log: {server.log}")


@contextlib.contextmanager
def running(servers: Sequence[Server]) -> Iterator[None]:
    try:
        for server in servers:
            wait_until_up(server)
        yield
    finally:
        for server in servers:
            server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


# the client (the same for both) ------------------------------------------------------------------


@dataclass
class Stream:
    sent: float  # perf_counter seconds
    first: float  # the first text arrived
    last: float  # the last event before [DONE]
    prompt_tokens: int
    tokens: int
    text: str
    finish_reason: str | None

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.last - self.first  # none when the first token was the only one (lm stopped at <|endoftext|>)
        return (self.tokens - 1) / span if span > 0 else float("nan")


async def stream_once(client: httpx.AsyncClient, server: Server, prompt: list[int], max_tokens: int) -> Stream:
    """One streamed /v1/completions request, timed from sending it to its last token."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "cache_prompt": False}
    sent = time.perf_counter()
    first = last = 0.0
    pieces: list[str] = []
    usage: dict[str, int] = {}
    finish_reason = None
    async with client.stream("POST", f"{server.base_url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name} answered {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{server.name} failed mid-stream: {event['error']}")
            now = time.perf_counter()
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    pieces.append(choice["text"])
                    first = first or now
                    last = now
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = event.get("usage") or usage
    if not usage or not first:
        raise RuntimeError(f"{server.name} sent no {'usage' if not usage else 'text'} for a streamed completion")
    return Stream(sent, first, last, usage["prompt_tokens"], usage["completion_tokens"], "".join(pieces),
                  finish_reason)


async def streams_together(client: httpx.AsyncClient, server: Server, prompts: Sequence[list[int]],
                           max_tokens: int) -> list[Stream]:
    return list(await asyncio.gather(*(stream_once(client, server, prompt, max_tokens) for prompt in prompts)))


def aggregate_tokens_per_s(streams: Sequence[Stream]) -> float:
    """All tokens over the wall time from the first request sent to the last token received."""
    return sum(s.tokens for s in streams) / (max(s.last for s in streams) - min(s.sent for s in streams))


@dataclass
class Figures:
    ttft: list[float]  # one stream, seconds
    decode: list[float]  # one stream, tokens/s after the first token
    single: list[float]  # one stream, tokens over request-to-last-token
    together: list[float]  # n streams, aggregate tokens/s
    together_ttft: list[float]  # n streams, the median stream's time to first token
    tokens_single: list[int]
    tokens_together: list[int]
    texts: dict[int, str]  # prompt index: greedy text (from the concurrent turns)
    prompt_tokens: set[int]


async def measure(servers: Sequence[Server], prompts: list[list[int]], streams: int, rounds: int,
                  max_tokens: int) -> dict[str, Figures]:
    figures = {s.name: Figures([], [], [], [], [], [], [], {}, set()) for s in servers}
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for server in servers:  # warm-up: load pages, pick kernels, open the connections
            await stream_once(client, server, prompts[0], max_tokens)
            await streams_together(client, server, prompts[:streams], max_tokens)
        for round_ in range(rounds):
            prompt = prompts[round_ % len(prompts)]
            for server in servers:
                f = figures[server.name]
                one = await stream_once(client, server, prompt, max_tokens)
                f.ttft.append(one.ttft)
                f.decode.append(one.decode_tokens_per_s)
                f.single.append(aggregate_tokens_per_s([one]))
                f.tokens_single.append(one.tokens)
                f.prompt_tokens.add(one.prompt_tokens)
            for server in servers:
                f = figures[server.name]
                together = await streams_together(client, server, prompts[:streams], max_tokens)
                f.together.append(aggregate_tokens_per_s(together))
                f.together_ttft.append(median(s.ttft for s in together))
                f.tokens_together.extend(s.tokens for s in together)
                f.prompt_tokens.update(s.prompt_tokens for s in together)
                f.texts.update(enumerate(s.text for s in together))
            console.print(f"round {round_ + 1}/{rounds}: " + ", ".join(
                f"{name} {f.decode[-1]:.1f} tok/s at 1, {f.together[-1]:.1f} at {streams}"
                for name, f in figures.items()), highlight=False)
    return figures


# the prompts -------------------------------------------------------------------------------------


def prompts_from(corpus: Path, tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` different passages of held-out Shakespeare, each <|endoftext|> and `length` tokens."""
    heldout = corpus.parent / "heldout"  # `lm corpus` names its train/ folder; the held-out plays lie beside it
    text = sorted(heldout.glob("*.txt"))[0].read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if len(p) > 8 * length]
    middle = paragraphs[len(paragraphs) // 4:]  # past the Gutenberg header and the list of persons
    prompts = [[tokenizer.eot_id, *tokenizer.encode(p)[:length]] for p in middle[:count]]
    if len(prompts) < count:
        sys.exit(f"only {len(prompts)} passages of {length} tokens in {corpus}; ask for fewer --prompt-tokens")
    return prompts


# the table ---------------------------------------------------------------------------------------


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rounds_of(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
    ratios = [a / b if higher_is_better else b / a for a, b in zip(ours, theirs, strict=True)]
    return ", ".join(f"{r:.2f}" for r in ratios)


def verdict(ratio: float, target: float) -> str:
    return f"[green]met[/] (>= {target:g}x)" if ratio >= target else f"[red]missed[/] (>= {target:g}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each server")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (and each server's slots)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens asked for per request")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="prompt length, after <|endoftext|>")
    parser.add_argument("--family", choices=sorted(FAMILY_FLAGS), default="gpt2", help="the model's design")
    parser.add_argument("--preset", help="the model's shape (a preset's name; default: the family's, 12 x 768)")
    parser.add_argument("--run", type=Path, help="serve this run (its own weights) instead of a random one")
    parser.add_argument("--weights", choices=sorted(QUANTIZE), default="f32",
                        help="f32: float32 on both sides; int8: lm serve --quantize int8 against the Q8_0 GGUF export")
    parser.add_argument("--summary", type=Path, help="also write the figures and ratios here, as JSON")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    root = cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    bin_dir = build_llama_cpp(root, (*TARGETS, SERVER))
    work = cache_dir() / "bench-llama-cpp"
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer_file = tokenizer_and_corpus(work)
    run = args.run or random_run(work, args.family, tokenizer_file, args.preset or args.family)
    gguf = gguf_of(run, GGUF_TYPE[args.weights])
    config = rundir.read_config(run).model
    tokenizer = Tokenizer.from_file(run / rundir.TOKENIZER)
    if args.prompt_tokens + 1 + args.max_tokens > config.context_length:
        sys.exit(f"--prompt-tokens and --max-tokens exceed the model's context of {config.context_length}")
    prompts = prompts_from(corpus, tokenizer, args.streams, args.prompt_tokens)

    logs = work / "serve-logs"
    logs.mkdir(exist_ok=True)
    servers = [start_lm(run, args.threads, args.streams, args.weights, logs / "lm-serve.log"),
               start_llama(bin_dir, gguf, args.threads, args.streams, config.context_length, logs / "llama-server.log")]
    load_before = load()
    busy = os.getloadavg()[0]
    if busy + args.threads > (os.cpu_count() or 1):
        console.print(f"[yellow]the machine is busy (load average {busy:.1f} on {os.cpu_count()} cores): "
                      f"{args.threads} threads each will be descheduled, which costs llama.cpp's spinning "
                      "threads most; figures are noisy, and --threads 1 is fairer here[/]")
    with running(servers):
        console.print(f"Serving {run.name} ({config.n_layer} x {config.d_model}, vocab {config.vocab_size}, "
                      f"context {config.context_length}): lm serve at {servers[0].base_url}, "
                      f"llama-server at {servers[1].base_url}; logs in {logs}", highlight=False)
        figures = asyncio.run(measure(servers, prompts, args.streams, args.rounds, args.max_tokens))
    load_after = load()

    ours, theirs = figures["lm serve"], figures["llama-server"]
    ratios = {
        "ttft": median(theirs.ttft) / median(ours.ttft),
        "decode": median(ours.decode) / median(theirs.decode),
        "together": median(ours.together) / median(theirs.together),
        "lm_scaling": median(ours.together) / median(ours.single),
        "llama_scaling": median(theirs.together) / median(theirs.single),
    }
    n = args.streams
    table = Table(title=f"lm serve and llama-server ({LLAMA_CPP_PYTHON}'s sources), {cpu_name()}, "
                        f"{args.threads} threads each, {WEIGHTS[args.weights]}, load average {load_before} before, "
                        f"{load_after} after",
                  title_justify="left")
    for column in ("measure (median)", "lm serve", "llama-server", "lm / llama-server (rounds)", "target"):
        table.add_column(column)
    table.add_row("time to first token, 1 stream", f"{median(ours.ttft) * 1e3:.0f} ms",
                  f"{median(theirs.ttft) * 1e3:.0f} ms",
                  f"[bold]{ratios['ttft']:.2f}x[/] as fast ({rounds_of(ours.ttft, theirs.ttft, False)})",
                  verdict(ratios["ttft"], 0.9))
    table.add_row("decode tokens/s, 1 stream", f"{median(ours.decode):.1f}", f"{median(theirs.decode):.1f}",
                  f"[bold]{ratios['decode']:.2f}x[/] ({rounds_of(ours.decode, theirs.decode)})",
                  verdict(ratios["decode"], 0.9))
    table.add_row("tokens/s, 1 stream, request to last token", f"{median(ours.single):.1f}",
                  f"{median(theirs.single):.1f}",
                  f"{median(ours.single) / median(theirs.single):.2f}x ({rounds_of(ours.single, theirs.single)})", "")
    table.add_row(f"aggregate tokens/s, {n} streams", f"{median(ours.together):.1f}", f"{median(theirs.together):.1f}",
                  f"[bold]{ratios['together']:.2f}x[/] ({rounds_of(ours.together, theirs.together)})",
                  verdict(ratios["together"], 0.8))
    table.add_row(f"{n} streams / 1 stream (request to last token)", f"[bold]{ratios['lm_scaling']:.2f}x[/]",
                  f"{ratios['llama_scaling']:.2f}x", "", "lm " + verdict(ratios["lm_scaling"], 2.0))
    table.add_row(f"time to first token, {n} streams (median stream)", f"{median(ours.together_ttft) * 1e3:.0f} ms",
                  f"{median(theirs.together_ttft) * 1e3:.0f} ms",
                  f"{median(theirs.together_ttft) / median(ours.together_ttft):.2f}x as fast", "")
    table.add_row("tokens per stream (1 stream; each of n)",
                  f"{median(ours.tokens_single):g}; {min(ours.tokens_together)}-{max(ours.tokens_together)}",
                  f"{median(theirs.tokens_single):g}; {min(theirs.tokens_together)}-{max(theirs.tokens_together)}",
                  "", "")
    same = sum(ours.texts[i] == theirs.texts[i] for i in ours.texts)
    table.add_row("greedy texts identical (the n prompts)", f"{same} of {len(ours.texts)}", "", "", "")
    console.print(table)
    prompt_tokens = ours.prompt_tokens | theirs.prompt_tokens
    console.print(f"{n} prompts of {args.prompt_tokens} held-out Shakespeare tokens after <|endoftext|> (prompt "
                  f"tokens counted by the servers: {', '.join(map(str, sorted(prompt_tokens)))}), max_tokens "
                  f"{args.max_tokens}, greedy, streamed /v1/completions over loopback, {args.rounds} alternating "
                  "rounds after a warm-up; the first two rows' ratios are speed ratios (llama-server's time over "
                  "lm's).", highlight=False)
    if min(ours.tokens_together + ours.tokens_single) < args.max_tokens:
        console.print("lm serve stopped some streams at <|endoftext|> (it has no ignore_eos): its rates count the "
                      "tokens it produced.")
    if len(prompt_tokens) > 1:
        console.print("[red]the servers read prompts of different lengths[/]")
    write_summary(args.summary, cpu=cpu_name(), threads=args.threads, weights=args.weights,
                  load_before=load_before, load_after=load_after,
                  lm_ttft_ms=median(ours.ttft) * 1e3, llama_ttft_ms=median(theirs.ttft) * 1e3,
                  lm_decode_tokens_per_s=median(ours.decode), llama_decode_tokens_per_s=median(theirs.decode),
                  lm_aggregate_tokens_per_s=median(ours.together),
                  llama_aggregate_tokens_per_s=median(theirs.together),
                  **{f"{name} ratio": value for name, value in ratios.items()})


if __name__ == "__main__":
    main()
