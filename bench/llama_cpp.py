"""Interop and speed against llama.cpp: lm's GGUF files run in llama.cpp, and lm decodes as fast as it.

For a GPT-2-family and a Llama-family run:
1. Greedy text: `lm generate --temperature 0` and llama.cpp's `llama-simple` (greedy) continue the same
   prompt for 50 tokens, from the f32 GGUF of a briefly trained `tiny` run; the texts must be identical.
2. Tokenization: llama.cpp's tokenizer (`llama-tokenize`) and lm's (`Tokenizer.encode`, what
   `lm tokenize` shows) give the same ids for a Unicode-heavy text.
3. Decode speed: batch 1, the same thread count, GPT-2 small's shape at vocab 8192 (12 x 768, random
   weights through lm's own initialisation: speed does not depend on them). lm float32 against
   llama.cpp F32, `lm generate --quantize int8` against Q8_0; `llama-bench -p 0 -n N` against lm's
   decode loop (generate_tokens, what `lm generate` runs), alternating, median of --rounds. Target: lm
   >= 1.0x llama.cpp at the same precision. Both read every weight once per token; the machine's
   memory bandwidth (measured here, reading a buffer bigger than the last-level cache) says how close
   each gets.

llama.cpp is built once from the sources inside the llama-cpp-python 0.3.36 source distribution (the
package index's copy; CMake and a C++ compiler needed: `apt-get install cmake g++`) and cached in
$LM_CACHE_DIR/llama.cpp/0.3.36 (about 7 minutes on 2 cores, the first time only). bench/serve.py adds
`llama-server` to the same build folder (only what it lacks is compiled).

    python bench/llama_cpp.py [--rounds 5] [--threads N] [--skip-speed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from _measure import write_summary
from quality import design_flags
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from lm import rundir
from lm.cache import cache_dir
from lm.checkpoint import load_run, model_state_dict
from lm.config import FAMILY_DESIGNS, TrainConfig, preset, with_overrides
from lm.cpu_kernels import MARCH_ENV
from lm.generate import GenerationStats, generate_tokens, prepare_for_generation
from lm.model import GPT
from lm.sampling import SamplingConfig
from lm.tokenizer import Tokenizer

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
TARGETS = ("llama-simple", "llama-bench", "llama-tokenize")
SERVER = "llama-server"  # bench/serve.py's; the configuration enables it, a build compiles it when asked
LM = str(Path(sys.executable).parent / "lm")
ROOT = Path(__file__).resolve().parents[1]
FAMILY_FLAGS = {family: design_flags(design) for family, design in FAMILY_DESIGNS.items()}
PROMPT = "ROMEO:"
UNICODE = ("Ünïcödé façade, naïve café — “quotes” ‘and’ «guillemets»; 日本語のテキストと中文，한국어 텍스트; "
           "Ελληνικά, русский, العربية, עברית, हिन्दी; emoji 🕯️🔥👩‍👩‍👧 and flags 🇫🇷; "
           "numbers 1234567 ١٢٣ ½ ²; tabs\tand\r\nnewlines\n\n\n  indented   spaces  \u00a0nbsp\u2009thin; "
           "contractions I'm, you'RE, they'll, it's; code: x+=1; if(a<b){return a**2;} // done")
console = Console(width=130)


# building llama.cpp -------------------------------------------------------------------------------


def build_llama_cpp(root: Path, targets: tuple[str, ...] = TARGETS) -> Path:
    """The folder holding llama.cpp's binaries, built from llama-cpp-python's sdist on the first call.

    `targets` are the binaries wanted; those missing from the build folder are built in it (the
    ones there already are kept, and what they share is not compiled again).
    """
    # With LM_CPU_MARCH=x86-64-v3 (lm's kernels built for AVX2 CPUs), llama.cpp is built for the same ones.
    avx2_only = os.environ.get(MARCH_ENV, "").strip() == "x86-64-v3"
    build = root / ("build-x86-64-v3" if avx2_only else "build")
    bin_dir = build / "bin"
    missing_targets = [target for target in targets if not (bin_dir / target).is_file()]
    if not missing_targets:
        return bin_dir
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"building llama.cpp needs {' and '.join(missing)}: apt-get install cmake g++")
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        downloads = root / "downloads"
        console.print(f"Downloading the {LLAMA_CPP_PYTHON} source distribution (77 MB) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(downloads)], check=True, stdout=subprocess.DEVNULL)
        archive = next(downloads.glob("llama_cpp_python-*.tar.gz"))
        staging = root / "src.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(staging, members=members, filter="data")
        shutil.rmtree(source, ignore_errors=True)
        os.replace(next(staging.glob("*/vendor/llama.cpp")), source)
        shutil.rmtree(staging)
    console.print(f"Building {', '.join(missing_targets)} of llama.cpp (several minutes on 2 cores, once) ...")
    isa = (["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
           if avx2_only else ["-DGGML_NATIVE=ON"])
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *isa,
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    # The server, without its web page (no npm build, no download of a prebuilt one).
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *missing_targets],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


# the runs ----------------------------------------------------------------------------------------


def lm(*args: str | Path) -> str:
    result = subprocess.run([LM, *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"lm {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout


def tokenizer_and_corpus(work: Path) -> tuple[Path, Path]:
    """Shakespeare (lm corpus) and a vocab-8192 tokenizer trained on it, both cached in `work`."""
    corpus = Path(lm("corpus", "shakespeare", "--out", work / "shakespeare").strip().splitlines()[-1])
    tokenizer = work / "tokenizer.json"
    if not tokenizer.is_file():
        lm("train-tokenizer", corpus, "--vocab-size", "8192", "--out", tokenizer)
    return corpus, tokenizer


def trained_run(work: Path, family: str, corpus: Path, tokenizer: Path, steps: int) -> Path:
    """A `tiny` run of the family trained briefly on Shakespeare (its greedy text is still repetitive)."""
    run = work / f"tiny-{family}-{steps}"
    if not (run / rundir.WEIGHTS).is_file():
        console.print(f"Training a tiny {family} run for {steps} steps ...")
        lm("train", corpus, "--tokenizer", tokenizer, "--preset", "tiny", "--max-steps", steps, "--batch-size", "8",
           "--eval-every", steps, "--sample-tokens", "0", "--out", run, "--force",
           *FAMILY_FLAGS[family])
    return run


def random_run(work: Path, family: str, tokenizer: Path, preset_name: str, std: float | None = None) -> Path:
    """A run of the preset's shape (the family's design) with random weights: lm's initialisation, or
    every parameter drawn with `std` (large weights make greedy text varied, a stricter check than the
    repetitive text of a briefly trained model)."""
    run = work / f"random-{preset_name}-{family}-{std or 'init'}"
    if not (run / rundir.WEIGHTS).is_file():
        tok = Tokenizer.from_file(tokenizer)
        config = preset(preset_name).model
        config.vocab_size = tok.vocab_size
        config = with_overrides(config, FAMILY_DESIGNS[family])
        torch.manual_seed(0)
        model = GPT(config)
        if std is not None:
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_(std=std)
        run.mkdir(parents=True, exist_ok=True)
        save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
        tok.save(run / rundir.TOKENIZER, overwrite=True)
        rundir.write_config(run, config, TrainConfig(), {"parameters": model.num_parameters()})
    return run


def gguf_of(run: Path, dtype: str) -> Path:
    out = run.parent / f"{run.name}-{dtype}.gguf"
    if not out.is_file() or out.stat().st_mtime < (run / rundir.WEIGHTS).stat().st_mtime:
        lm("export", run, "--format", "gguf", "--dtype", dtype, "--out", out, "--force")
    return out


# the checks --------------------------------------------------------------------------------------


def greedy_texts(bin_dir: Path, run: Path, new_tokens: int) -> tuple[str, str]:
    """The continuations of PROMPT by `lm generate --temperature 0` and by llama-simple (greedy)."""
    ours = lm("generate", run, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", new_tokens)
    result = subprocess.run([bin_dir / "llama-simple", "-m", gguf_of(run, "f32"), "-n", str(new_tokens), PROMPT],
                            capture_output=True, check=True)
    # llama-simple writes each token's bytes as they are: a token ending inside a character leaves bytes
    # that are not UTF-8 on their own, which lm shows as U+FFFD; decoded the same way here.
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    # llama-simple prints the prompt's pieces (the <|endoftext|> BOS among them), the text, a newline.
    theirs = result.stdout.removeprefix("<|endoftext|>").removesuffix("\n")
    # Into a pipe `lm generate` writes exactly the text, with no newline of its own.
    return ours.removeprefix(PROMPT), theirs.removeprefix(PROMPT)


def token_ids(bin_dir: Path, run: Path, text: str) -> tuple[list[int], list[int]]:
    ours = Tokenizer.from_file(run / rundir.TOKENIZER).encode(text)
    text_file = run.parent / "unicode.txt"
    text_file.write_bytes(text.encode("utf-8"))
    result = subprocess.run([bin_dir / "llama-tokenize", "-m", gguf_of(run, "f32"), "-f", text_file, "--ids",
                             "--no-bos", "--no-escape", "--log-disable"], capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    return ours, theirs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class Speeds:
    lm_f32: list[float]
    cpp_f32: list[float]
    lm_int8: list[float]
    cpp_q8: list[float]


def lm_decode_tokens_per_s(model: GPT, new_tokens: int, eot: int) -> float:
    stats = GenerationStats()
    for _ in generate_tokens(model, [eot], new_tokens, SamplingConfig(temperature=0.0), stats=stats):
        pass
    return stats.decode_tokens_per_s


def llama_bench_tokens_per_s(bin_dir: Path, gguf: Path, threads: int, new_tokens: int) -> float:
    result = subprocess.run([bin_dir / "llama-bench", "-m", gguf, "-t", str(threads), "-p", "0", "-n",
                             str(new_tokens), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout)[0]["avg_ts"])


def measure_speed(bin_dir: Path, run: Path, threads: int, rounds: int, new_tokens: int) -> Speeds:
    torch.set_num_threads(threads)
    model, tokenizer, _ = load_run(run)
    f32 = prepare_for_generation(model)
    model, _, _ = load_run(run)
    int8 = prepare_for_generation(model, quantize="int8")
    eot = tokenizer.eot_id
    contenders = {
        "lm_f32": lambda: lm_decode_tokens_per_s(f32, new_tokens, eot),
        "cpp_f32": lambda: llama_bench_tokens_per_s(bin_dir, gguf_of(run, "f32"), threads, new_tokens),
        "lm_int8": lambda: lm_decode_tokens_per_s(int8, new_tokens, eot),
        "cpp_q8": lambda: llama_bench_tokens_per_s(bin_dir, gguf_of(run, "q8_0"), threads, new_tokens),
    }
    for measure in contenders.values():  # warm-up: page the weights in, let each pick its kernels
        measure()
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, measure in contenders.items():
            results[name].append(measure())
    return Speeds(**results)


def weight_bytes_per_token(run: Path, bytes_per_weight: float) -> float:
    """Bytes of weight matrices read to decode one token (vectors and the one embedding row are noise)."""
    model, _, _ = load_run(run)
    matrices = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(matrices.values()) * bytes_per_weight


def memory_bandwidth(threads: int, gib: float = 2.0) -> float:
    """Read bandwidth in GB/s: the best of 5 sums over a float32 buffer bigger than the last-level cache."""
    torch.set_num_threads(threads)
    buffer = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


# the table ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating speed rounds (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both (default: all)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per speed round")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the tiny runs for the text check")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--summary", type=Path, help="also write the speed ratios here, as JSON")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    root = cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    bin_dir = build_llama_cpp(root)
    work = cache_dir() / "bench-llama-cpp"
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = tokenizer_and_corpus(work)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    bandwidth = memory_bandwidth(args.threads) if not args.skip_speed else float("nan")

    table = Table(title=f"lm and llama.cpp ({LLAMA_CPP_PYTHON}'s sources), {cpu}, {args.threads} threads, "
                        f"read bandwidth {bandwidth:.1f} GB/s", title_justify="left")
    for column in ("check", "GPT-2 family (llama.cpp gpt2)", "Llama family (llama.cpp llama)",
                   "Qwen3 family (llama.cpp qwen3)"):
        table.add_column(column)
    rows: dict[str, list[str]] = {}
    passed = True
    for family in FAMILY_FLAGS:
        run = trained_run(work, family, corpus, tokenizer, args.steps)
        for label, greedy_run in ((f"trained tiny run ({args.steps} steps)", run),
                                  ("tiny shape, random weights (std 0.3)",
                                   random_run(work, family, tokenizer, "tiny", 0.3))):
            ours, theirs = greedy_texts(bin_dir, greedy_run, 50)
            same = ours == theirs
            passed &= same
            rows.setdefault(f"greedy 50 tokens, f32, {label}", []).append(
                f"[green]identical[/] ({len(set(ours.split()))} distinct words)" if same else
                f"[red]differ[/] lm {ours!r} / llama.cpp {theirs!r}")
        ids, their_ids = token_ids(bin_dir, run, UNICODE)
        same = ids == their_ids
        passed &= same
        rows.setdefault(f"token ids, {len(UNICODE)}-character Unicode text", []).append(
            f"[green]identical[/] ({len(ids)} tokens)" if same else
            f"[red]differ[/] from token {first_difference(ids, their_ids)}")
        if args.skip_speed or family == "qwen3":  # speed: the Llama family's shape has the same matrices
            for label in ("float32 / F32", "int8 / Q8_0"):
                for row in (f"decode tokens/s, {label}: lm / llama.cpp",
                            f"weights read, {label}: lm / llama.cpp (GB/s, share of bandwidth)"):
                    if row in rows:
                        rows[row].append("not measured")
            continue
        speed = random_run(work, family, tokenizer, family)
        s = measure_speed(bin_dir, speed, args.threads, args.rounds, args.new_tokens)
        for label, ours_ts, theirs_ts, per_weight in (("float32 / F32", s.lm_f32, s.cpp_f32, (4.0, 4.0)),
                                                      ("int8 / Q8_0", s.lm_int8, s.cpp_q8, (1.0, 34 / 32))):
            lm_ts, cpp_ts = median(ours_ts), median(theirs_ts)
            figures[f"{family} {label.split(' / ')[0]} vs llama.cpp"] = lm_ts / cpp_ts
            lm_gbs = weight_bytes_per_token(speed, per_weight[0]) * lm_ts / 1e9
            cpp_gbs = weight_bytes_per_token(speed, per_weight[1]) * cpp_ts / 1e9
            rows.setdefault(f"decode tokens/s, {label}: lm / llama.cpp", []).append(
                f"{lm_ts:.1f} / {cpp_ts:.1f} = [bold]{lm_ts / cpp_ts:.2f}x[/] (rounds: "
                + ", ".join(f"{a / b:.2f}" for a, b in zip(ours_ts, theirs_ts, strict=True)) + ")")
            rows.setdefault(f"weights read, {label}: lm / llama.cpp (GB/s, share of bandwidth)", []).append(
                f"{lm_gbs:.1f} ({lm_gbs / bandwidth:.0%}) / {cpp_gbs:.1f} ({cpp_gbs / bandwidth:.0%})")
    for name, cells in rows.items():
        table.add_row(name, *cells)
    console.print(table)
    if not args.skip_speed:
        console.print(f"Speed: 12 layers x 768, vocab 8192 (the gpt2 and llama presets' shapes), batch 1, "
                      f"{args.new_tokens} tokens from an empty context, median of {args.rounds} alternating rounds; "
                      "target lm >= 1.0x llama.cpp at each precision.")
    console.print("interop: " + ("[green]passed[/]" if passed else "[red]FAILED[/]"))
    write_summary(args.summary, **figures)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
