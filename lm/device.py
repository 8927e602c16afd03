"""Choosing where and in what precision to compute, and what the hardware can do at best."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys

import torch

from lm.errors import UsageError

# Dense bf16/fp16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name(). Used only
# to report model FLOPs utilisation; a GPU not listed gets no MFU rather than a wrong one.
PEAK_FLOPS_16BIT = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),  # after L40S, before L4: names are matched by substring, first hit wins
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; asking for one that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but this torch sees no CUDA GPU; use --device cpu (or auto), or "
                         "install a CUDA build of torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision: 'auto' is bfloat16 on GPUs that support it, float16 on older GPUs, else float32.

    On a CPU, float32: bfloat16 matrix kernels are slow on CPUs without AMX/AVX-512 BF16.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bfloat16 support; use --dtype float16 (or auto)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for 16-bit dtypes (weights stay float32, products run in `dtype`); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense 16-bit peak, or None when it is unknown or the compute is not 16-bit."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS_16BIT if key in name), None)


def configure_matmul(device: torch.device) -> None:
    """Let float32 matrix products use TF32 tensor cores on CUDA (about 8x faster, ~1e-3 relative error).

    Through `torch.set_float32_matmul_precision`, the documented switch in every torch we support:
    since torch 2.9 the older `torch.backends.cuda.matmul.allow_tf32` flag warns that it is deprecated,
    and mixing it with the newer per-backend `fp32_precision` flags can make torch.compile fail.
    cuDNN's own TF32 flag is on by default and only concerns convolutions, which a GPT has none of.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8488C"), or the machine type where it is unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default glibc serves each large block (the logits and their gradients: 25-35 MB at the `tiny`
    preset's sizes) with a fresh mmap and hands it back to the kernel when freed, so every step
    page-faults its way through the same memory again: a third of the wall time of `lm train
    --preset tiny` on the development machine went to the kernel (13.5 s of 26 s for 200 steps;
    18 s with this, 0.5 s of it in the kernel). Allocating from the heap and never trimming it keeps
    the pages mapped; the process then holds its peak memory until it exits, which a training run
    does anyway. Returns whether the setting took (Linux with glibc only; elsewhere nothing changes).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
