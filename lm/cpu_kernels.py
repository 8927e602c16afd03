"""lm's C kernels for decoding on a CPU (lm/cpu_kernels.c): built on first use, loaded with ctypes.

The file is compiled for this machine's CPU (`cc -O3 -march=native -fopenmp`: AVX-512 VNNI, AVX2 or
plain C, whichever the CPU has) into the cache folder, keyed by the source, the compiler and the CPU,
so the build (about a second) happens once per machine. The build is written atomically: a process
loading the library sees the whole file or none. Where there is no C compiler, or the build fails,
`load()` is None (with a warning) and lm decodes with PyTorch's operations instead, as it would
with LM_CPU_KERNELS=off.

The widest instructions are not always the fastest for decoding, which streams every weight once per
token: on a 2-core AMD EPYC (Zen 4) the AVX2 build read a 12 x 768 model's float32 matrices in 0.80x
the AVX-512 build's time and its int8 ones in 0.66x, while the AVX-512 build's way of reading four
weight rows at once was tuned on an Intel Xeon, where it was the faster. So on an x86-64 CPU with more
than AVX2 the decoder times both builds on the model's own weights, once per machine, model shape and
batch (`decode_march`, kept in `cpu-decode.json` in the cache folder). Reading a prompt, many rows per
weight, is arithmetic-bound, and there the CPU's own build is used (int8 at 64 rows: 0.42x the AVX2
build's time on the Zen 4).
LM_CPU_MARCH forces a build: `native`, `x86-64-v3` (the AVX2 build an older CPU gets) or `x86-64`
(plain C), to measure or test those paths on a newer machine.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch  # (imported before the kernels load: they then share PyTorch's libgomp and its threads)

from lm.cache import cache_dir
from lm.cpu_choices import MeasuredChoices, fastest
from lm.device import cpu_name

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENV = "LM_CPU_KERNELS"
MARCH_ENV = "LM_CPU_MARCH"
MARCHES = ("native", "x86-64-v3", "x86-64")  # the builds LM_CPU_MARCH may force; the first two are timed
CACHE_FILE = "cpu-decode.json"
COMPILE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
ALIGN = 64  # int8 rows are read 64 bytes at a time: they are zero-padded to a multiple of this

_pointer, _i64 = ctypes.c_void_p, ctypes.c_int64


class LinearSpec(ctypes.Structure):
    """lm_linear_t: one linear layer, float32 (`weight`) or int8 (`quantized`, `scale`, `row_sum`)."""

    _fields_ = [("weight", _pointer), ("quantized", _pointer), ("scale", _pointer), ("row_sum", _pointer),
                ("bias", _pointer), ("in_features", _i64), ("out_features", _i64), ("padded_in", _i64)]


class BlockSpec(ctypes.Structure):
    """lm_block_t: one transformer block's shape, design and weights."""

    _fields_ = [("d_model", _i64), ("n_head", _i64), ("d_head", _i64), ("d_ff", _i64), ("context", _i64),
                ("norm", ctypes.c_int32), ("mlp", ctypes.c_int32), ("eps", ctypes.c_float),
                ("norm1_weight", _pointer), ("norm1_bias", _pointer), ("norm2_weight", _pointer),
                ("norm2_bias", _pointer), ("q_norm_weight", _pointer), ("k_norm_weight", _pointer),
                ("qkv", LinearSpec), ("proj", LinearSpec), ("gate", LinearSpec), ("fc", LinearSpec),
                ("down", LinearSpec)]


class ModelSpec(ctypes.Structure):
    """lm_model_t: the embeddings, positions, blocks, final norm and output head of a model."""

    _fields_ = [("n_layer", _i64), ("d_model", _i64), ("vocab", _i64), ("context", _i64), ("n_head", _i64),
                ("d_head", _i64), ("norm", ctypes.c_int32), ("eps", ctypes.c_float),
                ("token_embedding", _pointer), ("position_embedding", _pointer), ("rope_cos", _pointer),
                ("rope_sin", _pointer), ("norm_weight", _pointer), ("norm_bias", _pointer),
                ("blocks", ctypes.POINTER(BlockSpec)), ("head", LinearSpec)]


def scratch_bytes(rows: int, width: int) -> int:
    """Room the int8 products need for `rows` activation rows of up to `width` values: the rows quantized
    (padded to ALIGN each), then their float scales at the next ALIGN boundary."""
    padded = -(-width // ALIGN) * ALIGN
    return -(-rows * padded // ALIGN) * ALIGN + 4 * rows


_choices = MeasuredChoices(CACHE_FILE, MARCH_ENV, MARCHES)


def kernel_name(library: ctypes.CDLL | None = None) -> str:
    """'avx512-vnni', 'avx2' or 'portable' (what `library`'s build found in this CPU; `load()`'s by default),
    or 'off'."""
    library = library or load()
    return library.lm_kernel_name().decode() if library is not None else "off"


@functools.cache
def load(march: str | None = None) -> ctypes.CDLL | None:
    """The kernels built for `march` (by default the one LM_CPU_MARCH forces, else this CPU's own),
    built into the cache folder the first time; None where they cannot be."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no"):
        return None
    try:
        return _open(march or default_march())
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"lm's CPU kernels did not build ({error}); decoding with PyTorch's operations",
                      stacklevel=2)
        return None


@functools.cache
def _open(march: str) -> ctypes.CDLL:
    return open_library(build(march))


def forget_builds() -> None:
    """Load the libraries afresh on next use (after LM_CPU_KERNELS, CC or the cache folder changed)."""
    load.cache_clear()
    _open.cache_clear()


def default_march() -> str:
    """The build used where nothing is measured: the one LM_CPU_MARCH forces, else this CPU's own."""
    requested = _choices.requested()
    return "native" if requested == "auto" else requested


def candidate_marches() -> tuple[str, ...]:
    """The builds worth timing here: this CPU's own, and the AVX2 one where this CPU has wider instructions."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("native",)
    try:
        native, avx2 = _open("native"), _open("x86-64-v3")
    except (OSError, subprocess.SubprocessError):
        return ("native",)
    return ("native",) if kernel_name(native) == kernel_name(avx2) else ("native", "x86-64-v3")


def decode_march(layers: Sequence[LinearSpec], rows: int) -> str:
    """The build that runs these layers' products for `rows` rows at a time fastest on this machine.

    Forced by LM_CPU_MARCH; otherwise measured the first time a model of this shape is decoded on this
    machine (`probe`, well under a second for a 124M model) and remembered.
    """
    if _choices.requested() != "auto":
        return default_march()
    marches = candidate_marches()
    if len(marches) == 1:
        return marches[0]
    bucket = 1 << max(0, rows - 1).bit_length()
    return _choices.choose(layers_key(layers, bucket), lambda: probe(layers, bucket, marches))


def decode_marches() -> dict[str, str]:
    """The build each measured model shape got in this process so far."""
    return _choices.chosen()


def forget_decode_marches() -> None:
    """Drop what this process knows (the cache file stays): the next decoder measures again."""
    _choices.forget()


def layers_key(layers: Sequence[LinearSpec], rows: int) -> str:
    """What a build's speed depends on: the kind and amount of weights streamed and the rows per product."""
    kinds = sorted({"float32" if layer.weight else "int8" for layer in layers})
    size = sum(layer.out_features * (layer.in_features * 4 if layer.weight else layer.padded_in) for layer in layers)
    amount = f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    return f"{' and '.join(kinds)}, {len(layers)} layers, {amount}, {rows} rows"


def probe(layers: Sequence[LinearSpec], rows: int, marches: Sequence[str], rounds: int = 15) -> str:
    """Time each build on these layers' products (their own weights, in place), alternating; the faster."""
    width = max(max(layer.in_features, layer.out_features) for layer in layers)
    x = torch.randn(rows * width, generator=torch.Generator().manual_seed(0))
    y = torch.empty(rows * width)
    scratch = torch.empty(scratch_bytes(rows, width), dtype=torch.uint8)

    def through(library: ctypes.CDLL) -> Callable[[], None]:
        def run() -> None:
            for layer in layers:
                library.lm_linear(ctypes.byref(layer), x.data_ptr(), y.data_ptr(), rows, scratch.data_ptr())
        return run

    best = fastest({march: through(_open(march)) for march in marches}, rounds, budget_s=1.0)
    return min(best, key=best.__getitem__)


def open_library(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.lm_linear.argtypes = [ctypes.POINTER(LinearSpec), _pointer, _pointer, _i64, _pointer]
    library.lm_linear.restype = None
    library.lm_decode_token.argtypes = [ctypes.POINTER(ModelSpec), _pointer, _pointer, _i64, _i64, _pointer,
                                        _pointer, _pointer, _pointer, _pointer, _pointer]
    library.lm_decode_token.restype = ctypes.c_int
    library.lm_kernel_name.restype = ctypes.c_char_p
    return library


def build(march: str = "native") -> Path:
    """The kernels compiled for `march` (this CPU by default; tests also build the AVX2 and plain-C ones)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) on the PATH")
    flags = [*COMPILE_FLAGS, f"-march={march}"]
    # A build is specific to the source, the compiler and the CPU it was built for (-march=native).
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, cpu_name()]).encode())
    target = cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        # A compiler without OpenMP (Apple's clang, for one) still builds the kernels, single-threaded.
        for attempt in (flags, [flag for flag in flags if flag != "-fopenmp"]):
            result = subprocess.run([compiler, *attempt, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(built, target)
    return target


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in memory Linux may back with 2 MiB pages; `tensor` itself elsewhere.

    Decoding streams every weight once per token: with 4 KiB pages that is a page-table walk every
    4 KiB (23,000 per token for a 92 MB int8 model, more than the TLB holds), and the hardware
    prefetchers stop at each page's end. On the 2-core Xeon the int8 products of a 12 x 768 model
    took 3.15-3.47 ms per token in 2 MiB pages against 3.47-3.82 in 4 KiB ones.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or tensor.device.type != "cpu":
        return tensor
    size = tensor.numel() * tensor.element_size()
    region = mmap.mmap(-1, max(size, 1))
    region.madvise(advice)  # before the first write: the pages are then allocated huge where possible
    # frombuffer keeps `region` alive as long as the tensor is; the copy has the same shape and values.
    copy = torch.frombuffer(region, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    return copy.copy_(tensor)
