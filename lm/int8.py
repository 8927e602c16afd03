"""int8 linear layers for decoding on a CPU: a quarter of float32's bytes to read per token.

Decoding one token multiplies one activation row by every weight matrix, so its speed is the rate at
which the CPU can stream the weights from memory, not arithmetic. Stored as int8 with one float scale
per output row, the weights are a quarter of their float32 size. Each activation row is quantized to
int8 as it arrives (one scale per row), and the products are summed in int32: what llama.cpp's Q8_0
and PyTorch's dynamic quantization compute, to the same rounding.

The products run in lm's C kernels (lm/cpu_kernels.c). PyTorch's own int8 kernels (fbgemm, through
`torch.ao` dynamic quantization) are built for matrix-matrix products: on a 2-core Xeon their layers
take 2-3x as long per token (bench/llama_cpp.py). Where lm's kernels cannot be built (no C compiler)
the layers are `torch.ao`'s, and `kernel_name()` says which ones run.
"""

from __future__ import annotations

import ctypes
import warnings

import torch
from torch import nn

from lm import cpu_kernels
from lm.errors import UsageError


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` by an int8 layer (lm's kernels, or torch.ao's where they cannot build)."""
    if next(model.parameters()).device.type != "cpu":
        raise UsageError("--quantize int8 runs on the CPU; use --device cpu, or --dtype bfloat16 on a GPU")
    if cpu_kernels.load() is None:
        return _torch_ao_quantized(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model


def kernel_name() -> str:
    """Which int8 layers `quantize_int8` makes here: 'lm avx512-vnni' (or avx2, portable) or 'torch.ao'."""
    return "torch.ao" if cpu_kernels.load() is None else f"lm {cpu_kernels.kernel_name()}"


class Int8Linear(nn.Module):
    """`nn.Linear` for inference with int8 weights, one scale per output row."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach().float()
        scale = weight.abs().amax(dim=1) / 127.0
        quantized = torch.round(weight / scale.clamp(min=1e-12)[:, None]).clamp(-127, 127).to(torch.int8)
        padded = -(-self.in_features // cpu_kernels.ALIGN) * cpu_kernels.ALIGN
        self.register_buffer("weight", torch.zeros(self.out_features, padded, dtype=torch.int8))
        self.weight[:, :self.in_features] = quantized
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("row_sum", quantized.sum(dim=1, dtype=torch.int32).contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().contiguous())
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def spec(self) -> cpu_kernels.LinearSpec:
        """This layer for the C kernels (pointers into its buffers: keep the layer alive while in use)."""
        return cpu_kernels.LinearSpec(
            None, self.weight.data_ptr(), self.scale.data_ptr(), self.row_sum.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), self.in_features, self.out_features,
            self.weight.size(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("int8 layers are for inference; train in float32")
        library = cpu_kernels.load()
        assert library is not None, "Int8Linear is only made where lm's kernels built"
        rows = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.empty(rows.size(0), self.out_features)
        library.lm_linear(ctypes.byref(self.spec()), rows.data_ptr(), out.data_ptr(), rows.size(0),
                          self.scratch(rows.size(0)))
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def scratch(self, rows: int) -> int:
        """The address of room for `rows` quantized activation rows and their scales."""
        needed = cpu_kernels.scratch_bytes(rows, self.in_features)
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed, dtype=torch.uint8)
        return self._scratch.data_ptr()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def _torch_ao_quantized(model: nn.Module) -> nn.Module:
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # pragma: no cover - removed in some future torch
        raise UsageError("this torch has no dynamic int8 quantization and lm's CPU kernels did not build "
                         "(they need a C compiler, cc); use --dtype bfloat16 instead") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
