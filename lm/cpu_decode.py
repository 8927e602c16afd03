"""The decode step on a CPU in lm's C kernels: one call per token instead of ~400 PyTorch operations.

`GPT.decode_step` computes a new token's logits with PyTorch operations; at batch 1 on a CPU each of
them costs microseconds of dispatch besides its arithmetic, 2.3-3.6 ms per token for a 12-layer model
on a 2-core Xeon, a tenth to a third of the step. `CpuDecoder.step` computes the same logits (a test
holds them equal) in one call into lm/cpu_kernels.c: the embedding row (and position), then for each
block its norms, the q/k/v product, QK-norm, rotary positions, the cache write, attention over the
cached positions, the output product, the MLP and both residual additions, then the final norm and
the output head. Float32 weights are read in place (the model's own tensors); int8 layers
(`lm.int8.Int8Linear`) are read in their int8 form.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from lm import cpu_kernels
from lm.cpu_kernels import BlockSpec, LinearSpec, ModelSpec
from lm.int8 import Int8Linear
from lm.loss import soft_cap
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


# Each model's decoder, kept while the model lives (outside it: copying or saving a model never meets
# the C structures), with the addresses of the tensors it points into when it was made.
_decoders: weakref.WeakKeyDictionary[GPT, tuple[tuple[int, ...], CpuDecoder]] = weakref.WeakKeyDictionary()


def cpu_decoder_for(model: GPT) -> CpuDecoder | None:
    """The model's CPU decoder, or None where the C kernels do not apply or did not build.

    Made once per model, and made again if any of its tensors has moved since (a layer replaced by an
    int8 one, weights reassigned): the decoder reads them through raw addresses.
    """
    if not CpuDecoder.supports(model):
        return None
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    known = _decoders.get(model)
    if known is None or known[0] != addresses:
        known = _decoders[model] = (addresses, CpuDecoder(model))
    return known[1]


class CpuDecoder:
    def __init__(self, model: GPT) -> None:
        assert cpu_kernels.load() is not None
        config = model.config
        self._model = weakref.ref(model)  # the decoder lives while the model does (see _decoders)
        self.config = config
        blocks = [self._block_spec(block) for block in model.blocks]
        self._blocks = (BlockSpec * len(blocks))(*blocks)
        self._tables = self._position_tables(model)
        positions = self._tables.get("positions")
        cos, sin = self._tables.get("cos"), self._tables.get("sin")
        self.spec = ModelSpec(
            config.n_layer, config.d_model, config.vocab_size, config.context_length, config.n_head, config.d_head,
            1 if config.norm == "rmsnorm" else 0, config.norm_eps, _pointer(model.tok_emb.weight),
            _pointer(positions), _pointer(cos), _pointer(sin), _pointer(model.norm.weight),
            _pointer(getattr(model.norm, "bias", None)), self._blocks, _linear_spec(model.lm_head))
        self._work = torch.empty(0)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._libraries: dict[int, ctypes.CDLL] = {}  # rows per product -> the build measured fastest for them

    def library(self, batch: int) -> ctypes.CDLL:
        """The kernels' build for decoding `batch` samples at once: the one measured fastest on this
        model's weights here (`cpu_kernels.decode_march`), picked at the first step of each batch size."""
        if batch not in self._libraries:
            library = cpu_kernels.load(cpu_kernels.decode_march(self.linear_specs(), batch))
            self._libraries[batch] = library or cpu_kernels.load()
        return self._libraries[batch]

    def prepare(self, max_batch: int) -> None:
        """Choose the builds for every batch up to `max_batch` now (a measurement each, the first time on a
        machine), so that a server's first batches of each size do not wait for one."""
        for batch in range(1, max_batch + 1):
            self.library(batch)

    def linear_specs(self) -> list[LinearSpec]:
        """The linear layers a token streams through: every block's, then the output head."""
        names = ["qkv", "proj", *(["gate"] if self.config.mlp == "swiglu" else []), "fc", "down"]
        return [getattr(block, name) for block in self._blocks for name in names] + [self.spec.head]

    def _position_tables(self, model: GPT) -> dict[str, torch.Tensor]:
        """Contiguous float32 tables the kernel reads by position (kept alive here)."""
        kind = model.config.pos_encoding
        if kind == "learned":
            return {"positions": model.pos_emb.weight.detach().contiguous()}
        if kind == "sinusoidal":
            return {"positions": model.pos_table.contiguous()}
        return {"cos": model.rope_cos.contiguous(), "sin": model.rope_sin.contiguous()}

    def kernels(self, batch: int) -> str:
        """What decodes `batch` samples, for stats and start-up lines: lm's C kernels and their build."""
        return f"lm's C kernels ({cpu_kernels.kernel_name(self.library(batch))})"

    @staticmethod
    def supports(model: GPT) -> bool:
        if type(model) is not GPT:  # a wrapped model (FSDP, compiled) does work in its own forward
            return False
        param = next(model.parameters())
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
        float32 = all(isinstance(m, Int8Linear) or (m.weight.dtype == torch.float32 and m.weight.is_contiguous())
                      for m in linears)
        # The kernels compute today's block; of the speedrun's techniques only the logit cap (applied to the
        # kernels' logits here) is theirs: a model using any other decodes with PyTorch (GPT.decode_step).
        techniques = [t for t in model.config.techniques() if t != "--logit-softcap"]
        return (param.device.type == "cpu" and param.dtype == torch.float32 and float32 and not techniques
                and model.tok_emb.weight.is_contiguous()
                and all(type(m) in (nn.Linear, Int8Linear) for m in linears)
                and model.config.mlp in MLP_KINDS and not model.training and cpu_kernels.load() is not None)

    def _block_spec(self, block: nn.Module) -> BlockSpec:
        config, attn, mlp = self.config, block.attn, block.mlp
        return BlockSpec(
            config.d_model, config.n_head, config.d_head, config.d_ff, config.context_length,
            1 if config.norm == "rmsnorm" else 0, MLP_KINDS[config.mlp], config.norm_eps,
            _pointer(block.norm1.weight), _pointer(getattr(block.norm1, "bias", None)),
            _pointer(block.norm2.weight), _pointer(getattr(block.norm2, "bias", None)),
            _pointer(attn.q_norm.weight if attn.q_norm is not None else None),
            _pointer(attn.k_norm.weight if attn.k_norm is not None else None),
            _linear_spec(attn.qkv), _linear_spec(attn.proj),
            _linear_spec(mlp.gate) if config.mlp == "swiglu" else LinearSpec(), _linear_spec(mlp.fc),
            _linear_spec(mlp.proj))

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`model.decode_step(ids, cache)`: logits (batch, vocab) for one new token per sample, ids (batch, 1)."""
        if cache.static:
            raise ValueError("step writes at the default cache's length; give a static cache's positions to step_at")
        positions = torch.full((ids.size(0),), cache.length, dtype=torch.int64)
        logits = self.step_at(ids, cache, positions)
        cache.length += 1
        return logits

    def step_at(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sample, ids (batch, 1), sample r at its own
        `positions[r]` in row r of the cache's buffers: the rows of a batch may sit at different positions.

        The cache may have more rows than the batch (a server's has one per slot, the active ones
        first) and may be static: each row reads its positions up to its own only, so what later
        positions hold never matters. `cache.length` is left alone.
        """
        config, batch = self.config, ids.size(0)
        if self._model() is None:
            raise ValueError("the model this decoder was made for is gone")
        if cache.keys.dtype != torch.float32 or not cache.keys.is_contiguous() or not cache.values.is_contiguous():
            raise ValueError("the CPU decoder needs a contiguous float32 cache")
        rows = cache.keys.size(1)
        if rows < batch:
            raise ValueError(f"the cache has {rows} rows, fewer than the batch of {batch}")
        ids = ids.reshape(batch).to(torch.int64).contiguous()
        positions = positions.reshape(batch).to(torch.int64).contiguous()
        logits = torch.empty(batch, config.vocab_size)
        work, scratch, x = self._buffers(batch)
        failed = self.library(batch).lm_decode_token(
            ctypes.byref(self.spec), ids.data_ptr(), positions.data_ptr(), batch, rows, cache.keys.data_ptr(),
            cache.values.data_ptr(), logits.data_ptr(), x, work, scratch)
        if failed == 1:  # both checked before any write
            raise ValueError(f"token ids must be in [0, {config.vocab_size})")
        if failed == 2:
            raise ValueError(f"positions {positions.tolist()} must be in [0, {config.context_length}), "
                             "the context length")
        return soft_cap(logits, config.logit_softcap) if config.logit_softcap else logits

    def _buffers(self, batch: int) -> tuple[int, int, int]:
        """Addresses of the kernel's work floats, its int8 scratch, and room for the residual stream."""
        config = self.config
        # A block's work floats (cpu_kernels.c, block_step), then the residual stream's.
        block_floats = batch * (6 * config.d_model + 2 * config.d_ff + config.n_head * config.context_length)
        if self._work.numel() < block_floats + batch * config.d_model:
            self._work = torch.empty(block_floats + batch * config.d_model)
        room = cpu_kernels.scratch_bytes(batch, max(config.d_model, config.d_ff))
        if self._scratch.numel() < room:
            self._scratch = torch.empty(room, dtype=torch.uint8)
        residual = self._work.data_ptr() + 4 * block_floats
        return self._work.data_ptr(), self._scratch.data_ptr(), residual


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _linear_spec(layer: nn.Module) -> LinearSpec:
    if isinstance(layer, Int8Linear):
        return layer.spec()
    assert isinstance(layer, nn.Linear)
    return LinearSpec(layer.weight.data_ptr(), None, None, None,
                      None if layer.bias is None else layer.bias.data_ptr(),
                      layer.in_features, layer.out_features, layer.in_features)
