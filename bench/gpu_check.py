"""Does lm's CUDA path work, and how fast is it? One command for the day a GPU is at hand (`make gpu-check`).

Without a CUDA device it says so in one line and exits 0: nothing is checked. With one it runs, each step
in its own process under a time limit (so a CUDA bug shows up as a failed row with its cause, not a
hang), within a total budget (`--budget-s`, 9.5 minutes by default):

1. the CUDA-marked tests, tests/test_cuda.py (bf16 and fp16 training, attention kernels in bf16, cached
   and CUDA-graph decoding, checkpoints across devices, NCCL and FSDP2 at world size 1);
2. training speed: the `gpt2` preset's shape at GPT-2's vocabulary (124M parameters), context 1024,
   bf16 autocast, torch.compile, fused AdamW, gradient clipping, the largest micro-batch that fits
   (estimated from two eager steps' peak memory): tokens/s, MFU against lm/device.py's peak table,
   peak memory; target MFU >= 45% on an H100;
3. decoding speed, same shape, batch 1, bf16 weights, a 128-token prompt and 256 new tokens, greedy:
   eager and `--compile` (CUDA graphs), decode tokens/s and time to first token; target >= 1,500
   tokens/s compiled on an H100;
4. the same two measurements for transformers' GPT2LMHeadModel (SDPA attention, bf16; compiled for
   training; for decoding eager, then its static cache with the compile generate() applies to it),
   side by side with lm's, as ratios.

It prints one table and writes the same facts as JSON (`--out`, default runs/gpu-check.json). The exit
code is 1 if a test or a measurement failed; a speed target missed is reported, not a failure.

    make gpu-check                                    (a .venv, as for the other targets)
    make gpu-check VENV=                              (the python3 already there: no venv, no installs)
    python bench/gpu_check.py --budget-s 900 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_check.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "GPU-CHECK-RESULT "
GPT2_VOCAB = 50257
TARGET_MFU = 0.45
TARGET_DECODE_TOKENS_PER_S = 1500.0


# --- the parent: runs each step in a child process with a time limit ------------------------------------


@dataclass
class Outcome:
    """What one child process gave: its JSON result, or why there is none."""

    ok: bool
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    cause: str = ""  # one line: the exception, the timeout, the exit code
    output_tail: str = ""


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "LM_DIST_TIMEOUT": "120"}


def run_limited(argv: list[str], timeout_s: float) -> tuple[int | None, str, float]:
    """Run `argv` in its own process group; on timeout stop the whole group. Returns (exit code or None
    if it timed out, stdout and stderr together, seconds)."""
    started = time.monotonic()
    child = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout_s)
        return child.returncode, output, time.monotonic() - started
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(child.pid, sig)  # torchrun's workers too
            except ProcessLookupError:
                break
            try:
                output, _ = child.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                output = ""
        return None, output or "", time.monotonic() - started


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last exception line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["no output"])[-1][:300]


def run_worker(task: str, timeout_s: float, *options: str) -> Outcome:
    code, output, seconds = run_limited([sys.executable, str(Path(__file__).resolve()), "--worker", task, *options],
                                        timeout_s)
    tail = output[-4000:]
    results = [line[len(RESULT_PREFIX):] for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if code is None:
        return Outcome(False, seconds, cause=f"timed out after {timeout_s:.0f} s; last line: {last_error_line(output)}",
                       output_tail=tail)
    if code != 0 or not results:
        return Outcome(False, seconds, cause=f"exit code {code}: {last_error_line(output)}", output_tail=tail)
    return Outcome(True, seconds, result=json.loads(results[-1]), output_tail=tail)


def run_tests(timeout_s: float) -> tuple[list[dict[str, str]], Outcome]:
    """pytest on tests/test_cuda.py; one record per test (name, status, message)."""
    argv = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-v", "-rfE", "--tb=line",
            "-p", "no:cacheprovider", "-o", "addopts="]
    code, output, seconds = run_limited(argv, timeout_s)
    tests: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M):
        tests[match.group(1)] = {"test": match.group(1), "status": match.group(2), "message": ""}
    for match in re.finditer(r"^(?:FAILED|ERROR) tests/test_cuda\.py::(\S+)(?: - (.*))?$", output, re.M):
        record = tests.setdefault(match.group(1), {"test": match.group(1), "status": "FAILED", "message": ""})
        record["message"] = (match.group(2) or "").strip()[:300]
    outcome = Outcome(code == 0, seconds, output_tail=output[-6000:])
    if code is None:
        outcome.cause = f"pytest timed out after {timeout_s:.0f} s (tests not listed did not finish)"
    elif code != 0:
        outcome.cause = f"pytest exit code {code}" + ("" if tests else f": {last_error_line(output)}")
    return list(tests.values()), outcome


def main_parent(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError as err:
        print(f"gpu-check: torch cannot be imported ({err}); install it, or run `make gpu-check` (which does)")
        return 1
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__} sees none): nothing was checked")
        return 0

    from rich.console import Console

    console = Console(width=140)
    deadline = time.monotonic() + args.budget_s
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "transformers": _transformers_version(),
                              "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "budget_s": args.budget_s, "steps": {}}
    console.print(f"gpu-check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}, "
                  f"transformers {report['transformers']}), budget {args.budget_s:.0f} s")

    def time_for(limit: float) -> float:
        return min(limit, deadline - time.monotonic() - 5)

    def step(name: str, limit: float, run) -> Outcome:
        available = time_for(limit)
        if available < 20:
            outcome = Outcome(False, 0.0, cause="skipped: the time budget is spent (raise --budget-s)")
        else:
            console.print(f"[dim]{name} (at most {available:.0f} s)...[/]")
            outcome = run(available)
        report["steps"][name] = asdict(outcome)
        return outcome

    tests: list[dict[str, str]] = []
    if not args.skip_tests:
        def tests_step(limit: float) -> Outcome:
            found, outcome = run_tests(limit)
            tests.extend(found)
            return outcome
        step("tests", args.tests_limit_s, tests_step)
        report["tests"] = tests

    # lm's own figures first: if the budget runs out, what is left out is the comparison.
    train_lm = step("train lm", args.step_limit_s, lambda limit: run_worker("train-lm", limit))
    decode_lm = step("decode lm", args.step_limit_s, lambda limit: run_worker("decode-lm", limit))
    batch = str(train_lm.result.get("batch", 8))
    train_hf = step("train transformers", args.step_limit_s,
                    lambda limit: run_worker("train-transformers", limit, "--batch", batch))
    decode_hf = step("decode transformers", args.step_limit_s, lambda limit: run_worker("decode-transformers", limit))
    report["total_s"] = round(args.budget_s - (deadline - time.monotonic()), 1)

    failed = print_report(console, report, tests, train_lm, train_hf, decode_lm, decode_hf)
    report["failed"] = failed
    out = Path(args.out)
    from lm.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    console.print(f"{'[red]FAILED[/]: ' + ', '.join(failed) if failed else '[green]all checks passed[/]'}; "
                  f"{report['total_s']:.0f} s; the facts are in {out}")
    return 1 if failed else 0


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def print_report(console, report: dict[str, Any], tests: list[dict[str, str]], train_lm: Outcome,
                 train_hf: Outcome, decode_lm: Outcome, decode_hf: Outcome) -> list[str]:
    """One table; returns the names of what failed."""
    from rich.markup import escape
    from rich.table import Table

    failed: list[str] = []
    table = Table(title=f"gpu-check, {report['device']}, torch {report['torch']}", title_justify="left")
    for column in ("check", "result", "target / comparison", "status"):
        table.add_column(column, overflow="fold")
    verdict = {True: "[green]met[/]", False: "[yellow]missed[/]"}

    def failure(name: str, outcome: Outcome) -> None:
        failed.append(name)
        table.add_row(name, f"[red]{escape(outcome.cause)}[/]", "", "[red]FAILED[/]")

    tests_outcome = report["steps"].get("tests")
    for record in tests:
        status = {"PASSED": "[green]passed[/]", "SKIPPED": "[yellow]skipped[/]"}.get(record["status"],
                                                                                   "[red]FAILED[/]")
        if record["status"] not in ("PASSED", "SKIPPED"):
            failed.append(f"test {record['test']}")
        readable = record["test"].removeprefix("test_").replace("_", " ")
        table.add_row(f"test: {escape(readable)}", escape(record["message"]), "", status)
    if tests_outcome is not None and not tests_outcome["ok"] and (tests_outcome["cause"] or not tests):
        failed.append("tests")
        cause = escape(tests_outcome["cause"] or "failed")
        table.add_row("tests/test_cuda.py", f"[red]{cause}[/]", "", "[red]FAILED[/]")

    trained = {}
    for name, outcome in (("training, lm", train_lm), ("training, transformers", train_hf)):
        if not outcome.ok:
            failure(name, outcome)
            continue
        r = trained[name] = outcome.result
        mfu = r.get("mfu")
        result = (f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%}, " if mfu is not None
                  else f"{r['tokens_per_s']:,.0f} tokens/s, MFU unknown (GPU not in the peak table), ")
        result += f"peak {r['peak_memory_gib']:.1f} GiB, micro-batch {r['batch']} x {r['context']}"
        target = f"MFU >= {TARGET_MFU:.0%} (H100)" if name.endswith("lm") else ""
        status = verdict[mfu >= TARGET_MFU] if name.endswith("lm") and mfu is not None else ""
        if name.endswith("transformers") and "training, lm" in trained:
            ours = trained["training, lm"]["tokens_per_s"]
            target = f"lm / transformers: {ours / r['tokens_per_s']:.2f}x"
            if r["batch"] != trained["training, lm"]["batch"]:
                target += f" (at micro-batch {r['batch']}: {trained['training, lm']['batch']} did not fit)"
        table.add_row(name, result, target, status)

    decoded = {}
    for name, outcome in (("decoding, lm", decode_lm), ("decoding, transformers", decode_hf)):
        if not outcome.ok:
            failure(name, outcome)
            continue
        for variant, r in outcome.result["variants"].items():
            label = f"{name}, {variant}"
            if "error" in r:
                table.add_row(label, f"[yellow]{escape(r['error'])}[/]", "", "[yellow]not measured[/]")
                continue
            decoded[label] = r
            result = (f"{r['decode_tokens_per_s']:,.0f} tokens/s, first token {1000 * r['first_token_s']:.1f} ms"
                      + (f", compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""))
            target, status = "", ""
            if label == "decoding, lm, compiled (CUDA graphs)":
                target = f">= {TARGET_DECODE_TOKENS_PER_S:,.0f} tokens/s (H100)"
                status = verdict[r["decode_tokens_per_s"] >= TARGET_DECODE_TOKENS_PER_S]
                if r.get("cudagraph_skips"):
                    result += f" [yellow](CUDA graphs skipped {r['cudagraph_skips']} times)[/]"
            table.add_row(label, result, target, status)
    pairs = (("eager", "decoding, lm, eager", "decoding, transformers, eager"),
             ("compiled", "decoding, lm, compiled (CUDA graphs)", "decoding, transformers, static cache + compile"))
    for what, ours, theirs in pairs:
        if ours in decoded and theirs in decoded:
            ratio = decoded[ours]["decode_tokens_per_s"] / decoded[theirs]["decode_tokens_per_s"]
            ttft = decoded[theirs]["first_token_s"] / decoded[ours]["first_token_s"]
            table.add_row(f"decoding, lm / transformers, {what}",
                          f"{ratio:.2f}x tokens/s, first token {ttft:.2f}x sooner", "", "")
    console.print(table)
    return failed


# --- the children: one measurement each ------------------------------------------------------------------


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def gpt2_config(args: argparse.Namespace):
    from lm.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, context_length=args.context, n_layer=args.layers, n_head=args.heads,
                       d_model=args.width)


def hf_gpt2(config):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
                           n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    hf_config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_config)


def train_speed(args: argparse.Namespace, impl: str) -> dict[str, Any]:
    import contextlib

    import torch

    from lm.config import preset
    from lm.device import configure_matmul, peak_flops
    from lm.model import GPT
    from lm.optim import make_optimizers
    from lm.train import flops_per_token

    device = torch.device(args.device)
    configure_matmul(device)
    dtype = torch.bfloat16
    config = gpt2_config(args)
    torch.manual_seed(0)
    model = (GPT(config) if impl == "lm" else hf_gpt2(config)).to(device).train()
    flops = flops_per_token(GPT(config))  # the same shape: the same FLOPs per token
    if impl == "lm":
        (optimizer,) = make_optimizers(model, preset("gpt2").train, device)  # AdamW, as the preset trains
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                      fused=device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()

    def make_step(network, batch: int):
        def step() -> None:
            ids = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), device=device)
            with autocast():
                if impl == "lm":
                    loss = network(ids[:, :-1], ids[:, 1:])[1]
                else:  # transformers shifts the labels itself
                    loss = network(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    estimate: dict[str, float] = {}
    batch = args.batch
    if batch is None:  # the largest candidate that fits, from two eager steps' peak memory
        make_step(model, 1)()  # optimizer state exists from here on
        peaks = {}
        for size in (1, 2):
            sync()
            torch.cuda.reset_peak_memory_stats(device)
            make_step(model, size)()
            sync()
            peaks[size] = torch.cuda.max_memory_allocated(device)
        per_sample = max(1, peaks[2] - peaks[1])
        fixed = peaks[1] - per_sample
        free, total = torch.cuda.mem_get_info(device)
        # What this process holds (reserved) plus what is free, less a margin for compiled kernels'
        # workspaces and fragmentation. Compiled steps keep fewer activations than eager ones: safe side.
        usable = 0.85 * (free + torch.cuda.memory_reserved(device)) - fixed
        fits = max(1, int(usable // per_sample))
        batch = max([b for b in (64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1) if b <= fits])
        estimate = {"per_sample_gib": per_sample / 2**30, "fixed_gib": fixed / 2**30, "fits": fits,
                    "total_gib": total / 2**30}
    network = torch.compile(model, dynamic=False) if args.compile else model
    started = time.perf_counter()
    while True:
        try:
            step = make_step(network, batch)
            for _ in range(3):  # compile, then settle
                step()
            sync()
            break
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2
    warmup_s = time.perf_counter() - started
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * batch * config.context_length / seconds
    peak = peak_flops(device, dtype)
    return {"impl": impl, "batch": batch, "context": config.context_length, "steps": args.steps,
            "ms_per_step": 1000 * seconds / args.steps, "tokens_per_s": tokens_per_s,
            "mfu": flops * tokens_per_s / peak if peak else None, "flops_per_token": flops,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else 0.0,
            "warmup_s": warmup_s,
            "parameters": sum(p.numel() for p in model.parameters()), "memory_estimate": estimate,
            "compiled": args.compile}


def decode_lm(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from lm.generate import CompiledDecoder, GenerationStats, generate_tokens, prepare_for_generation
    from lm.model import GPT
    from lm.sampling import SamplingConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = gpt2_config(args)
    model = prepare_for_generation(GPT(config).to(device), torch.bfloat16)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    greedy = SamplingConfig(temperature=0.0)

    def run(decoder=None) -> GenerationStats:
        stats = GenerationStats()
        for _ in generate_tokens(model, prompt, args.new_tokens, greedy, seed=0, stats=stats, decoder=decoder):
            pass
        return stats

    def measure(decoder=None) -> dict[str, float]:
        runs = [run(decoder) for _ in range(args.rounds)]
        return {"decode_tokens_per_s": median(s.decode_tokens_per_s for s in runs),
                "first_token_s": median(s.first_token_s for s in runs)}

    variants: dict[str, dict[str, Any]] = {}
    run()  # warm up: kernels, allocator
    variants["eager"] = measure()
    try:
        started = time.perf_counter()
        decoder = CompiledDecoder(model)
        for _ in generate_tokens(model, prompt, 4, greedy, seed=0, decoder=decoder):  # compile, record the graph
            pass
        compile_s = time.perf_counter() - started
        variants["compiled (CUDA graphs)"] = {**measure(decoder), "compile_s": compile_s,
                                              "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    except Exception as err:  # reported in the table: the eager figures still stand
        variants["compiled (CUDA graphs)"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {"impl": "lm", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "variants": variants}


class FirstTokenClock:
    """A transformers streamer (put/end) that notes when the prompt and the first new token arrive."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.puts: list[float] = []
        self.finished = 0.0

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        self.finished = time.perf_counter()


def decode_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = gpt2_config(args)
    model = hf_gpt2(config).to(device, torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens)).to(device)

    def run(**options) -> dict[str, float]:
        clock = FirstTokenClock()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
                                 **options)
        assert out.shape[1] == args.prompt_tokens + args.new_tokens
        first = clock.puts[1]  # puts[0] is the prompt
        return {"decode_tokens_per_s": (args.new_tokens - 1) / (clock.finished - first),
                "first_token_s": first - clock.started}

    def measure(**options) -> dict[str, float]:
        runs = [run(**options) for _ in range(args.rounds)]
        return {key: median(r[key] for r in runs) for key in runs[0]}

    variants: dict[str, dict[str, Any]] = {}
    run()
    variants["eager"] = measure()
    try:
        started = time.perf_counter()
        run(cache_implementation="static")  # recent transformers compile the decode step themselves here
        how = "compiled by generate()"
        if not hasattr(model, "_compiled_call"):  # older ones: compile the forward as their docs say
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            run(cache_implementation="static")
            how = "forward compiled by hand"
        run(cache_implementation="static")
        compile_s = time.perf_counter() - started
        variants["static cache + compile"] = {**measure(cache_implementation="static"), "compile_s": compile_s,
                                              "how": how}
    except Exception as err:
        variants["static cache + compile"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {"impl": "transformers", "attention": getattr(model.config, "_attn_implementation", "?"),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "variants": variants}


def main_worker(args: argparse.Namespace) -> int:
    tasks = {"train-lm": lambda: train_speed(args, "lm"), "train-transformers": lambda: train_speed(args, "hf"),
             "decode-lm": lambda: decode_lm(args), "decode-transformers": lambda: decode_transformers(args)}
    emit(tasks[args.worker]())
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu-check.json"), help="where to write the JSON")
    parser.add_argument("--budget-s", type=float, default=570.0, help="total time for every step together")
    parser.add_argument("--tests-limit-s", type=float, default=270.0, help="time limit of the test run")
    parser.add_argument("--step-limit-s", type=float, default=200.0, help="time limit of each measurement")
    parser.add_argument("--skip-tests", action="store_true", help="measure speed only")
    # One measurement in this process (what the parent starts; also handy by hand, e.g. on a CPU with a
    # small shape: --worker decode-lm --device cpu --layers 2 --width 64 --heads 2 --vocab 512).
    parser.add_argument("--worker", choices=["train-lm", "train-transformers", "decode-lm", "decode-transformers"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=768, help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    return main_worker(args) if args.worker else main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
