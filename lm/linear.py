"""Linear layers on x86 CPUs through whichever float32 matrix-product kernel is faster on this machine.

PyTorch computes `nn.Linear` on a CPU with its default BLAS (MKL's sgemm on x86 builds). oneDNN, also
bundled with PyTorch, computes the same products. Which one is faster depends on the CPU: on an AMD
EPYC (Zen 5) oneDNN ran a 1024² product at 370 GFLOP/s against MKL's 175, and the `tiny` preset's
768 x 128 x 8192 output head in 4.2 ms against 10.7; on an Intel Xeon MKL was the faster one. So the
choice is measured, not assumed: the first time a layer shape is met (per machine, instruction set,
torch version and thread count), `linear` times both kernels on that shape, forward and, when training,
both backward products, and keeps the faster. The answers are stored in the cache folder
(`cpu-matmul.json`, by lm/cpu_choices.py), so the probe (well under a second for a whole model) runs
once per machine.

`LM_CPU_MATMUL` overrides the choice: `onednn` or `default` (PyTorch's own kernel) everywhere, `auto`
(the default) measures. The layer itself (PyTorch's default) is used everywhere oneDNN does not apply:
GPUs, autocast, torch.compile (which picks its own kernels), quantized layers, and weights kept in the
transposed decoding layout.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lm import cpu_choices
from lm.cpu_choices import fastest

KERNEL_ENV = "LM_CPU_MATMUL"
KERNELS = ("onednn", "default")
CACHE_FILE = "cpu-matmul.json"
# A probe times products of at most this many FLOPs (rows are cut to fit): big enough to show each
# kernel's steady rate, small enough that probing the 8192-wide output head takes milliseconds.
PROBE_FLOPS = 2**29

# Looked up through this module at each call (not bound once), so a test can swap the machine's identity.
_choices = cpu_choices.MeasuredChoices(CACHE_FILE, KERNEL_ENV, KERNELS, machine=lambda: machine_key())


@functools.cache
def onednn_available() -> bool:
    """oneDNN's fused linear op exists in this torch build and we are on an x86-64 CPU.

    Other CPUs (Apple silicon, ARM servers) keep PyTorch's default, tuned BLAS.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    # A private op: check once that this torch has it and that it computes what nn.Linear does.
    x, weight, bias = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(2, -1, 40).view(5, 8), torch.ones(5)
    try:
        return torch.allclose(_onednn(x, weight, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ (+ bias) by oneDNN; x may have any number of leading dimensions."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b, with the backward pass's two products also computed by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_2d, x_2d = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
        grad_x, grad_weight = backward_products(grad_2d, x_2d, weight, "onednn", ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[1])
        grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None if grad_x is None else grad_x.view(x.shape), grad_weight, grad_bias


def forward_product(x: torch.Tensor, weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """x @ weightᵀ by `kernel` ('onednn' or 'default'); x (rows, in)."""
    return _onednn(x, weight) if kernel == "onednn" else x @ weight.t()


def backward_products(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel: str,
                      need_x: bool = True, need_weight: bool = True) -> tuple[torch.Tensor | None, ...]:
    """dL/dx = g W and dL/dW = gᵀ x for y = x Wᵀ, by `kernel`; g (rows, out), x (rows, in)."""
    if kernel != "onednn":
        return (grad @ weight if need_x else None), (grad.t() @ x if need_weight else None)
    grad_x = _onednn(grad, weight.t()) if need_x else None
    grad_weight = None
    if need_weight:
        # oneDNN is fastest when the wider of the two matrices is the weight operand, so a wide layer
        # (more outputs than inputs) computes (xᵀ g)ᵀ instead.
        wide = weight.size(0) > weight.size(1)
        grad_weight = _onednn(x.t(), grad.t()).t() if wide else _onednn(grad.t(), x.t())
    return grad_x, grad_weight


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, by the faster kernel for a float32 `nn.Linear` on an x86 CPU (the same values to rounding)."""
    if not _use_onednn(layer, x):
        return layer(x)
    assert isinstance(layer, nn.Linear)
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return _OneDNNLinear.apply(x, layer.weight, layer.bias)
    return _onednn(x, layer.weight, layer.bias)


def _use_onednn(layer: nn.Module, x: torch.Tensor) -> bool:
    if type(layer) is not nn.Linear or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    weight = layer.weight
    # A transposed (decoding-layout) weight would be copied by oneDNN at every call: MKL's
    # matrix-vector kernel reads that layout directly and is the faster choice there.
    if weight.dtype != torch.float32 or not weight.is_contiguous() or layer._forward_hooks or layer._forward_pre_hooks:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    rows = x.numel() // max(1, x.size(-1))
    return kernel_for(rows, layer.in_features, layer.out_features, training) == "onednn"


def requested_kernel() -> str:
    """What $LM_CPU_MATMUL asks for: 'auto' (measure; the default), 'onednn' or 'default'."""
    return _choices.requested()


def kernel_for(rows: int, in_features: int, out_features: int, training: bool) -> str:
    """'onednn' or 'default': the kernel for a float32 CPU linear layer of this shape on this machine."""
    requested = requested_kernel()
    if not onednn_available():
        return "default"
    if requested != "auto":
        return requested
    return _choices.choose(shape_key(rows, in_features, out_features, training),
                           lambda: probe(rows, in_features, out_features, training))


def chosen_kernels() -> dict[str, str]:
    """The kernel each layer shape used in this process so far ('train 1024x128x8192' -> 'onednn')."""
    return _choices.chosen()


def shape_key(rows: int, in_features: int, out_features: int, training: bool) -> str:
    # Rows (tokens in the batch) vary from call to call: one decision per power of two of them.
    bucket = 1 << max(0, rows - 1).bit_length()
    return f"{'train' if training else 'infer'} {bucket}x{in_features}x{out_features}"


def machine_key() -> str:
    """`cpu_choices.machine_key()`, here so a test can give this module's choices another machine."""
    return cpu_choices.machine_key()


def probe(rows: int, in_features: int, out_features: int, training: bool, rounds: int = 3) -> str:
    """Time both kernels on one layer shape (forward, plus both backward products when training)."""
    rows = max(1, min(rows, max(64, PROBE_FLOPS // (2 * in_features * out_features))))
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.zeros(out_features)
    upstream = torch.randn(rows, out_features, generator=generator)
    runs: dict[str, Callable[[], object]]
    if training:
        for tensor in (x, weight, bias):
            tensor.requires_grad_(True)

        def step(product: Callable[..., torch.Tensor]) -> Callable[[], object]:
            def run() -> None:
                x.grad = weight.grad = bias.grad = None
                product(x, weight, bias).backward(upstream)
            return run

        runs = {"onednn": step(_OneDNNLinear.apply), "default": step(F.linear)}
    else:
        runs = {"onednn": lambda: _onednn(x, weight, bias), "default": lambda: F.linear(x, weight, bias)}
    with torch.inference_mode(False), torch.enable_grad() if training else torch.no_grad():
        best = fastest(runs, rounds)
    return min(best, key=best.__getitem__)


def forget_decisions() -> None:
    """Drop what this process knows (the cache file stays): the next layer call decides again."""
    _choices.forget()
