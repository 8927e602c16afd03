"""Benchmark: the ratios the README claims, on this CPU and on an AVX2-only CPU emulated on it, in one table.

A lead measured on one CPU may not hold on another: bfloat16 products are native on CPUs with AVX-512
BF16 or AMX and emulated (41x slower than float32) on CPUs with AVX2 only; oneDNN and MKL trade places
from one CPU to the next. So each claim is measured twice, each time in fresh processes with an empty
cache folder (so lm's run-time choices, lm/cpu_choices.py, are measured under that CPU mode):

- native: this CPU as it is;
- AVX2 (emulated): PyTorch's kernels held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`), oneDNN's too
  (`ONEDNN_MAX_CPU_ISA=AVX2`: no AVX-512, no native bfloat16) and MKL's (`MKL_ENABLE_INSTRUCTIONS=AVX2`;
  on an AMD CPU MKL takes its generic path anyway), lm's C kernels and llama.cpp built for `x86-64-v3`
  (`LM_CPU_MARCH`). Checked to reproduce an AVX2 machine's slow bfloat16 products: the
  `bf16 / fp32 Newton-Schulz` row (an AMD EPYC with AVX2 only measured 41x).

The checks, each an existing benchmark run with `--summary`:
- muon: Muon's training step against AdamW's, tiny preset (bench/optimizer.py; target <= 1.10x);
- train: lm's training step against transformers' GPT2LMHeadModel, 4 x 128 (bench/train.py; >= 1.15x);
- quality: tinyshakespeare at nanoGPT's wall-clock, both on all of train.txt and scored on val.txt
  (bench/sweep.py --nanogpt, the tiny preset's defaults; <= 0.80x nanoGPT's bits per byte);
- decode: decoding against transformers' generate (bench/generate.py: 4 x 128 >= 2x; 124M float32
  >= 1.0x, int8 >= 1.6x);
- llama.cpp: decoding against llama.cpp, float32 / F32 and int8 / Q8_0 (bench/llama_cpp.py; >= 1.0x;
  builds llama.cpp once per mode, about 7 minutes each).

    python bench/cpu_matrix.py --tinyshakespeare ../shared/data/tinyshakespeare/input.txt \\
        --nanogpt NANOGPT_CHECKOUT [--only muon train quality decode llama.cpp] [--modes native avx2]

The whole matrix takes about 40 minutes on 2 cores (quality: two nanoGPT runs and two lm runs of
~2 minutes each; llama.cpp's builds the first time). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
MODES = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "LM_CPU_MARCH": "x86-64-v3"},
}
QUALITY_RECIPE = "defaults (the tiny preset)"


@dataclass
class Claim:
    """One figure of one benchmark summary, its target and which way is better."""

    check: str
    label: str
    key: str
    target: float
    higher_is_better: bool

    def met(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


CLAIMS = [
    Claim("muon", "Muon step / AdamW step, tiny preset", "muon_vs_adamw", 1.10, False),
    Claim("muon", "bf16 / fp32 Newton-Schulz, 10 x 128 x 512 stack", "ns_bf16_vs_fp32", 0, False),
    Claim("train", "training step vs transformers, 4 x 128", "lm_vs_transformers", 1.15, True),
    Claim("quality", "bits/byte vs nanoGPT at its wall-clock", "vs_nanogpt", 0.80, False),
    Claim("decode", "decode vs transformers, 4 x 128 float32", "small_float32_vs_transformers", 2.0, True),
    Claim("decode", "decode vs transformers, 124M float32", "gpt2_float32_vs_transformers", 1.0, True),
    Claim("decode", "decode vs transformers, 124M int8", "gpt2_int8_vs_transformers", 1.6, True),
    Claim("llama.cpp", "decode vs llama.cpp, 12 x 768 float32 / F32", "gpt2 float32 vs llama.cpp", 1.0, True),
    Claim("llama.cpp", "decode vs llama.cpp, 12 x 768 int8 / Q8_0", "gpt2 int8 vs llama.cpp", 1.0, True),
]


def run_bench(script: str, args: list[str], env: dict[str, str], log: Path, summary_flag: str = "--summary",
              ) -> dict[str, Any]:
    """Run one benchmark, its output appended to `log`; the JSON it wrote where `summary_flag` said."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        with log.open("a", encoding="utf-8") as out:
            out.write(f"\n$ {' '.join(f'{k}={v}' for k, v in env.items())} {script} {' '.join(args)}\n")
            out.flush()
            done = subprocess.run([sys.executable, str(BENCH / script), *args, summary_flag, str(summary)],
                                  stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=BENCH.parent)
        if done.returncode != 0 or not summary.is_file():
            raise RuntimeError(f"{script} failed (exit {done.returncode}); its output is in {log}")
        return json.loads(summary.read_text(encoding="utf-8"))


def newton_schulz_ratio(env: dict[str, str]) -> float:
    """bfloat16 over float32 time of 5 Newton-Schulz iterations on a 10 x 128 x 512 stack, in a fresh process."""
    code = ("import torch, time\n"
            "from lm.optim import NS_COEFFICIENTS, _newton_schulz_iteration\n"
            "x = torch.randn(10, 128, 512); x /= torch.linalg.matrix_norm(x, keepdim=True)\n"
            "best = {}\n"
            "for dtype in (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32):\n"
            "    y = x.to(dtype); _newton_schulz_iteration(y, *NS_COEFFICIENTS)\n"
            "    started = time.perf_counter()\n"
            "    for _ in range(5): y = _newton_schulz_iteration(y, *NS_COEFFICIENTS)\n"
            "    best[dtype] = min(best.get(dtype, 1e9), time.perf_counter() - started)\n"
            "print(best[torch.bfloat16] / best[torch.float32])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}, cwd=BENCH.parent)
    return float(done.stdout.strip())


def checks(args: argparse.Namespace, log: Path) -> dict[str, Callable[[dict[str, str]], dict[str, float]]]:
    def muon(env: dict[str, str]) -> dict[str, float]:
        figures = run_bench("optimizer.py", ["--rounds", str(args.rounds)], env, log)
        return {**figures, "ns_bf16_vs_fp32": newton_schulz_ratio(env)}

    def quality(env: dict[str, str]) -> dict[str, float]:
        if args.nanogpt is None or args.tinyshakespeare is None:
            raise RuntimeError("quality needs --nanogpt and --tinyshakespeare")
        sweep = run_bench("sweep.py", ["--tinyshakespeare", str(args.tinyshakespeare), "--nanogpt", str(args.nanogpt),
                                       "--only", QUALITY_RECIPE], env, log, summary_flag="--json")
        if not sweep["recipes"]:
            raise RuntimeError(f"lm's run in sweep.py failed; its output is in {log}")
        ours, peer = sweep["recipes"][0], sweep["nanogpt"]
        return {"vs_nanogpt": ours["bits_per_byte"] / peer["bits_per_byte"], "lm_bits_per_byte": ours["bits_per_byte"],
                "lm_steps": ours["steps"], "nanogpt_bits_per_byte": peer["bits_per_byte"],
                "nanogpt_seconds": peer["seconds"]}

    return {
        "muon": muon,
        "train": functools.partial(run_bench, "train.py", ["--rounds", str(args.rounds)], log=log),
        "quality": quality,
        "decode": functools.partial(run_bench, "generate.py", ["--rounds", str(args.rounds), "--skip-quality"],
                                    log=log),
        "llama.cpp": functools.partial(run_bench, "llama_cpp.py", ["--rounds", str(args.rounds)], log=log),
    }


def cpu_line(env: dict[str, str]) -> str:
    """'AMD EPYC, PyTorch AVX2 kernels' as seen by a fresh process under `env`."""
    code = "import torch; from lm.device import cpu_name; print(cpu_name() + ', PyTorch ' + " \
           "torch.backends.cpu.get_cpu_capability() + ' kernels')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}, cwd=BENCH.parent).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted({c.check for c in CLAIMS}), help="checks to run")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each speed benchmark")
    parser.add_argument("--tinyshakespeare", type=Path, metavar="INPUT_TXT")
    parser.add_argument("--nanogpt", type=Path, metavar="CHECKOUT")
    parser.add_argument("--log", type=Path, default=Path("runs/cpu-matrix.log"))
    parser.add_argument("--json", type=Path, help="also write the table's figures here")
    args = parser.parse_args()
    wanted = args.only or [check for check in dict.fromkeys(c.check for c in CLAIMS)
                           if check != "quality" or args.nanogpt is not None]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    runs = checks(args, args.log)
    console = Console(width=140)
    results: dict[str, dict[str, float | str]] = {}
    cpus: dict[str, str] = {}
    for mode in args.modes:
        cpus[mode] = cpu_line(MODES[mode])
        for check in wanted:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="lm-cpu-matrix-") as cache:
                # torch.compile's cache on disk does not tell kernels for AVX2 from AVX-512 ones: one per mode.
                env = {**MODES[mode], "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor"}
                if check != "llama.cpp":  # (llama.cpp's build is cached in LM_CACHE_DIR: keep it)
                    env["LM_CACHE_DIR"] = cache
                try:
                    figures: dict[str, float | str] = dict(runs[check](env))
                except (RuntimeError, subprocess.CalledProcessError) as error:
                    figures = {"error": str(error)}
            results[f"{mode} {check}"] = figures
            console.print(f"{mode} / {check}: {time.perf_counter() - started:.0f} s", style="dim")

    table = Table(title="The README's claims on two kinds of CPU (bench/cpu_matrix.py)", title_justify="left")
    table.add_column("claim")
    table.add_column("target", justify="right")
    for mode in args.modes:
        table.add_column(f"{mode}: {cpus[mode]}", justify="right")
    for claim in CLAIMS:
        if claim.check not in wanted:
            continue
        cells = []
        for mode in args.modes:
            figures = results[f"{mode} {claim.check}"]
            value = figures.get(claim.key)
            if isinstance(value, (int, float)):
                mark = "" if claim.target == 0 else (" [green]met[/]" if claim.met(value) else " [red]missed[/]")
                cells.append(f"{value:.3f}x{mark}")
            else:
                cells.append(f"[red]{figures.get('error', 'not measured')}[/]")
        target = "" if claim.target == 0 else f"{'>=' if claim.higher_is_better else '<='} {claim.target:.2f}x"
        table.add_row(claim.label, target, *cells)
    console.print(table)
    console.print(f"Each benchmark's own tables: {args.log}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": cpus, "results": results}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
