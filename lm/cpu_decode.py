"""The decode step on a CPU in lm's C kernels: each block is one call instead of ~30 PyTorch operations.

`GPT.decode_step` computes a new token's logits with PyTorch operations; at batch 1 on a CPU each of
them costs microseconds of dispatch besides its arithmetic, 2.3-3.6 ms per token for a 12-layer model
on a 2-core Xeon, a tenth to a third of the step. `CpuDecoder.step` computes the same logits (a test
holds them equal) with one call per block into lm/cpu_kernels.c: norms, the q/k/v product, QK-norm,
rotary positions, the cache write, attention over the cached positions, the output product, the MLP,
both residual additions. Float32 weights are read in place (the model's own tensors); int8 layers
(`lm.int8.Int8Linear`) are read in their int8 form.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from lm import cpu_kernels
from lm.cpu_kernels import BlockSpec, LinearSpec
from lm.int8 import Int8Linear
from lm.model import GPT, KVCache

MLP_KINDS = {"gelu": 0, "swiglu": 1, "relu2": 2}


def use_huge_pages(model: nn.Module) -> nn.Module:
    """Move the weight matrices the decoder streams into huge-page memory (`cpu_kernels.in_huge_pages`)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = cpu_kernels.in_huge_pages(module.weight.data)  # a tied embedding follows
            elif isinstance(module, Int8Linear):
                module.weight = cpu_kernels.in_huge_pages(module.weight)
    return model


def cpu_decoder_for(model: GPT) -> CpuDecoder | None:
    """The model's CPU decoder (made once), or None where the C kernels do not apply or did not build."""
    if not CpuDecoder.supports(model):
        return None
    decoder = getattr(model, "_cpu_decoder", None)
    if decoder is None:
        decoder = CpuDecoder(model)
        object.__setattr__(model, "_cpu_decoder", decoder)  # not a submodule: no state_dict entry
    return decoder


class CpuDecoder:
    def __init__(self, model: GPT) -> None:
        library = cpu_kernels.load()
        assert library is not None
        self.library, self.model, config = library, model, model.config
        self.blocks = [self._block_spec(block) for block in model.blocks]
        self.head = _linear_spec(model.lm_head)
        self._work = torch.empty(0)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._room = max(config.d_model, config.d_ff) + cpu_kernels.ALIGN

    @staticmethod
    def supports(model: GPT) -> bool:
        param = next(model.parameters())
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
        float32 = all(isinstance(m, Int8Linear) or (m.weight.dtype == torch.float32 and m.weight.is_contiguous())
                      for m in linears)
        return (param.device.type == "cpu" and param.dtype == torch.float32 and float32
                and all(type(m) in (nn.Linear, Int8Linear) for m in linears)
                and model.config.mlp in MLP_KINDS and not model.training and cpu_kernels.load() is not None)

    def _block_spec(self, block: nn.Module) -> BlockSpec:
        config, attn, mlp = self.model.config, block.attn, block.mlp

        def pointer(tensor: torch.Tensor | None) -> int | None:
            return None if tensor is None else tensor.data_ptr()

        return BlockSpec(
            config.d_model, config.n_head, config.d_head, config.d_ff, config.context_length,
            1 if config.norm == "rmsnorm" else 0, MLP_KINDS[config.mlp], config.norm_eps,
            pointer(block.norm1.weight), pointer(getattr(block.norm1, "bias", None)),
            pointer(block.norm2.weight), pointer(getattr(block.norm2, "bias", None)),
            pointer(attn.q_norm.weight if attn.q_norm is not None else None),
            pointer(attn.k_norm.weight if attn.k_norm is not None else None),
            _linear_spec(attn.qkv), _linear_spec(attn.proj),
            _linear_spec(mlp.gate) if config.mlp == "swiglu" else LinearSpec(), _linear_spec(mlp.fc),
            _linear_spec(mlp.proj))

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`model.decode_step(ids, cache)`: logits (batch, vocab) for one new token per sample, ids (batch, 1)."""
        config, position, batch = self.model.config, cache.length, ids.size(0)
        if cache.static:
            raise ValueError("the CPU decoder writes the default cache; a static cache goes through forward()")
        if position >= config.context_length:
            raise ValueError(f"position {position} is past the context length {config.context_length}")
        if cache.keys.dtype != torch.float32 or not cache.keys.is_contiguous():
            raise ValueError("the CPU decoder needs a contiguous float32 cache")
        x = self.model.embed(ids, slice(position, position + 1)).reshape(batch, config.d_model).contiguous()
        rope = self.model._rope(slice(position, position + 1))
        cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
        work, scratch = self._buffers(batch)
        layer_floats = cache.keys[0].numel()
        for index, spec in enumerate(self.blocks):
            offset = index * layer_floats * 4
            self.library.lm_block_step(ctypes.byref(spec), x.data_ptr(), batch, cache.keys.data_ptr() + offset,
                                       cache.values.data_ptr() + offset, position,
                                       None if cos is None else cos.data_ptr(),
                                       None if sin is None else sin.data_ptr(), work, scratch)
        cache.length = position + 1
        hidden = self.model.norm(x).contiguous()
        logits = torch.empty(batch, config.vocab_size)
        self.library.lm_linear(ctypes.byref(self.head), hidden.data_ptr(), logits.data_ptr(), batch, scratch)
        return logits

    def _buffers(self, batch: int) -> tuple[int, int]:
        config = self.model.config
        floats = batch * (6 * config.d_model + 2 * config.d_ff + config.n_head * config.context_length)
        if self._work.numel() < floats:
            self._work = torch.empty(floats)
        room = batch * self._room + 4 * batch + 2 * cpu_kernels.ALIGN
        if self._scratch.numel() < room:
            self._scratch = torch.empty(room, dtype=torch.uint8)
        return self._work.data_ptr(), self._scratch.data_ptr()


def _linear_spec(layer: nn.Module) -> LinearSpec:
    if isinstance(layer, Int8Linear):
        return layer.spec()
    assert isinstance(layer, nn.Linear)
    return LinearSpec(layer.weight.data_ptr(), None, None, None,
                      None if layer.bias is None else layer.bias.data_ptr(),
                      layer.in_features, layer.out_features, layer.in_features)
