"""The training loss: cross-entropy of the next token, fused with the output head on a CPU.

Training asks the model, at every position, for a probability of every token in the vocabulary
(softmax of the logits) and scores the one that came next: loss = -log p(target), averaged. Its
gradient with respect to the logits is simply `softmax - onehot(target)`, divided by the count.

Written as `F.cross_entropy(hidden @ Wᵀ, targets)`, autograd keeps the (tokens x vocabulary) log
probabilities for the backward pass, then zero-fills another matrix of that size, scatters into it
and runs log-softmax's backward over it: four passes over the largest tensor of a small model's step
(2048 x 8192 at the `tiny` preset) besides the three matrix products. `head_cross_entropy` computes
the gradient in the forward pass instead (the softmax itself, one subtracted at each target; the
loss is the log of the target's share, read first) and keeps only the two small gradients (tokens x
d_model and vocabulary x d_model): fewer passes and no tensor of logits' size held between forward
and backward. Same loss, same gradients to float rounding (a test holds them equal); measured on a
2-core Xeon it took ~8% off the `tiny` preset's training step. Taking the softmax directly instead
of its logarithm and then `exp` saves another: 0.9 against 2.5 ms over 2048 x 2048 logits on a
2-core AMD EPYC (1.5 against 3.1 held to AVX2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.linear import backward_products, forward_product, kernel_for

IGNORE = -100  # a target that teaches nothing (PyTorch's ignore_index): prompt tokens of a conversation


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap·tanh(logits / cap): close to the logits while they are small, never beyond ±cap (Gemma 2,
    modded-nanogpt's 15), so that no token's score runs away early in training."""
    return cap * torch.tanh(logits / cap)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                softcap: float = 0.0) -> torch.Tensor:
        # The three products by the kernel lm/linear.py measured faster for this shape on this CPU.
        kernel = kernel_for(hidden.size(0), weight.size(1), weight.size(0), training=True)
        logits = forward_product(hidden, weight, kernel)
        gates = None
        if softcap:
            # c·tanh(z/c) = 2c·σ(2z/c) - c, and a softmax does not see the constant: the loss is that of
            # 2c·σ(2z/c) (modded-nanogpt's form). PyTorch's sigmoid is much faster than its tanh on a CPU:
            # 7 against 46 ms over the tiny preset's 2048 x 8192 logits on one thread (measured).
            gates = logits.mul_(2.0 / softcap).sigmoid_()
            logits = gates * (2.0 * softcap)
        rows = torch.arange(targets.numel(), device=targets.device)
        grad_logits = torch.softmax(logits, dim=-1)  # one pass fewer than log-softmax and exp
        loss = -_log_target_probabilities(grad_logits, logits, rows, targets).mean()
        del logits
        grad_logits[rows, targets] -= 1.0
        if gates is not None:  # through the cap: d(2c·σ(2z/c))/dz = 4σ(1 - σ); the 4 joins the final scale
            grad_logits = torch.ops.aten.sigmoid_backward.grad_input(grad_logits, gates, grad_input=grad_logits)
        ctx.chain = 4.0 if softcap else 1.0
        ctx.save_for_backward(*backward_products(grad_logits, hidden, weight, kernel, ctx.needs_input_grad[0],
                                                 ctx.needs_input_grad[1]))
        ctx.count = targets.numel()
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss * ctx.chain / ctx.count
        return (grad_hidden * scale if grad_hidden is not None else None,
                grad_weight * scale if grad_weight is not None else None, None, None)


def _log_target_probabilities(probs: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor,
                              targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row from its softmax; where that probability is too small for float32 (a target
    ranked ~87 nats below the best), from the logits instead, exactly as log-softmax gives it."""
    log_probs = probs[rows, targets].log()
    lost = log_probs < math.log(torch.finfo(probs.dtype).tiny)
    if bool(lost.any()):
        picked = rows[lost]
        log_probs[lost] = logits[picked, targets[lost]] - logits[picked].logsumexp(dim=-1)
    return log_probs


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `targets` (tokens,) under logits `hidden @ weightᵀ`; hidden (tokens, d_model).

    `F.cross_entropy(F.linear(hidden, weight).float(), targets)`, the logits soft-capped first
    (`soft_cap`) when `softcap` > 0: the fused path's gradient goes through the cap as well. The
    fused path applies on a CPU outside torch.compile, where it was measured; elsewhere the plain
    formula. Under bfloat16 autocast the fused head and loss stay in float32 (the logits' precision is
    what the loss is made of).
    Targets equal to `IGNORE` (a conversation's user and system tokens) are left out of the mean. On
    the fused path a batch with none left gives a zero loss that still reaches every parameter (no NaN
    in the step); the plain path (GPU) does not look, as looking would wait for the device every step.
    """
    fused = (hidden.device.type == "cpu" and weight.dtype == torch.float32
             and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
             and not torch.compiler.is_compiling())
    if fused:
        learned = targets != IGNORE
        if not bool(learned.all()):
            if not bool(learned.any()):
                return (hidden.sum() + weight.sum()) * 0.0
            hidden, targets = hidden[learned], targets[learned]
        _warm_vector_math()
        with torch.autocast("cpu", enabled=False):
            return _HeadCrossEntropy.apply(hidden.float(), weight, targets, softcap)
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(soft_cap(logits, softcap) if softcap else logits, targets, ignore_index=IGNORE)


_vector_math_warm = False


def _warm_vector_math() -> None:
    """One float32 `exp` on every thread before the loss's own, once per process.

    With two or more threads, the first float32 `exp_` of a process (PyTorch's vector-math path) was
    now and then computed less exactly on one thread's share of the tensor: relative error 1.5e-4
    instead of 6e-8, in 7 of 40 fresh processes measured on a 2-core Xeon, and never after one call
    like this one (0 of 50). In the loss that made a process's first gradient differ from every later
    one, so a run resumed in a new process could leave an uninterrupted run's path in the last bits.
    """
    global _vector_math_warm
    if not _vector_math_warm:
        torch.zeros(32768 * torch.get_num_threads()).exp_()  # 32768: PyTorch's grain, so every thread takes a share
        _vector_math_warm = True
