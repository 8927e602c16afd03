"""Linear layers on x86 CPUs through oneDNN's matrix multiply, in float32 as before.

PyTorch computes `nn.Linear` on a CPU with MKL's sgemm. On the AMD EPYC machines we develop on, MKL
runs about half as fast as oneDNN (also bundled with PyTorch) on the same float32 inputs: a 1024² matrix
product reaches 175 GFLOP/s with MKL and 370 with oneDNN, and the 768 x 128 x 8192 output head of the
`tiny` preset takes 10.7 ms against 4.2. `linear(layer, x)` sends the forward product and both
backward products (input and weight gradients) to oneDNN when that helps and falls back to the
layer itself everywhere else: GPUs, autocast, torch.compile (which picks its own kernels),
quantized layers, and weights kept in the transposed decoding layout.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn


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
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t())  # dL/dx = g W
        if ctx.needs_input_grad[1] or ctx.has_bias:
            grad_2d, x_2d = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
            if ctx.needs_input_grad[1]:
                # dL/dW = gᵀ x. oneDNN is fastest when the wider of the two matrices is the weight
                # operand, so a wide layer (more outputs than inputs) computes (xᵀ g)ᵀ instead.
                wide = weight.size(0) > weight.size(1)
                grad_weight = _onednn(x_2d.t(), grad_2d.t()).t() if wide else _onednn(grad_2d.t(), x_2d.t())
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, by oneDNN for a float32 `nn.Linear` on an x86 CPU (the same values to rounding)."""
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
    return onednn_available()

