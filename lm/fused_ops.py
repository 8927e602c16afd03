"""RMSNorm and rotary positions with hand-written backward passes, for a CPU's training step.

At the `tiny` preset a training step is about half matrix products and half element-wise work, and
two layers of the block do most of the latter: RMSNorm (seven over the width and six over each head's
queries and keys, as QK-norm asks) and the rotation of queries and keys by position. PyTorch's CPU
RMSNorm is a chain of small operations (square, mean, rsqrt, two products, with type conversions), and
its backward a longer one; rotary positions written as `x·cos + rotate_half(x)·sin` make five passes
forward and as many back. The functions here compute the same values in fewer passes over memory:

- RMSNorm, y = x · r · w with r = 1/sqrt(mean(x²) + eps): forward is one norm per row and one product;
  backward needs only two sums, and both are matrix-vector products of g·x (with g the gradient of
  y): w's gradient is rᵀ(g·x) and each row's Σ g·w·x is (g·x)w, so dx = r·(g·w) - x·r³·((g·x)w)/d.
- Rotary positions rotate each pair (x_i, x_{i+d/2}) by its position's angle; the backward is the
  rotation by the opposite angle: two multiply-adds per half, forward and back.

Same arithmetic as the textbook forms to float rounding (tests hold them to a tolerance, not bit for
bit: the sums run in another order). Used on a CPU while training (lm/model.py); elsewhere, and under
torch.compile, which fuses the textbook forms itself, the model keeps PyTorch's own.
"""

from __future__ import annotations

import torch


def applies(x: torch.Tensor) -> bool:
    """Whether the passes here stand in for PyTorch's: float32 training on a CPU, outside autocast and torch.compile
    (where they were measured; inference keeps PyTorch's own, so scores and exports are computed as before)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        width = x.size(-1)
        inverse_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, inverse_rms)
        return x * inverse_rms * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, inverse_rms = ctx.saved_tensors
        width = x.size(-1)
        grad_x_product = (grad * x).reshape(-1, width)  # g·x, (rows, width)
        grad_weight = inverse_rms.reshape(1, -1) @ grad_x_product if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            coefficient = (grad_x_product @ weight).view_as(inverse_rms).mul_(inverse_rms.pow(3)).div_(width)
            grad_x = (grad * weight).mul_(inverse_rms).sub_(x * coefficient)
        return grad_x, grad_weight.view_as(weight) if grad_weight is not None else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (d,), weight, eps)` over the last dimension, in fewer passes (float32, CPU)."""
    return _RMSNorm.apply(x, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, direction: float = 1.0) -> torch.Tensor:
    """Each pair (x_i, x_{i+d/2}) rotated by its position's angle (`direction` -1: by the opposite angle);
    cos and sin are lm.model.rope_tables', whose two halves are equal."""
    half = x.size(-1) // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = cos[..., :half], sin[..., :half]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(first, cos, out=out[..., :half]).addcmul_(second, sin, value=-direction)
    torch.mul(second, cos, out=out[..., half:]).addcmul_(first, sin, value=direction)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, direction=-1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions as lm.model.apply_rope computes them (the tables' two halves are equal), in fewer passes."""
    return _Rope.apply(x, cos, sin)
