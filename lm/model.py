"""A GPT: a decoder-only transformer that reads token ids and scores every possible next token.

    ids ─► token embedding (+ learned or sinusoidal positions) ─► N blocks ─► norm ─► output head ─► logits
    block:  x = x + attention(norm(x))      each token gathers context from the tokens before it
            x = x + mlp(norm(x))            then transforms what it gathered, on its own
                                            (left out with mlp "none": attention-only blocks)

The residual stream `x` runs straight through the stack; each block adds to it (pre-norm), which keeps
deep stacks trainable. With rotary positions (RoPE) nothing is added to the embeddings: queries and
keys are rotated by an angle that grows with position, so their dot product depends on the distance.

The speedrun's techniques (ModelConfig's fields after `rope_theta`, all off by default) hook in at four
places: the embedding (smear, the hashed bigram table), each block's input (residual scalars with the
embedding shortcut), attention (value embeddings, a gain on queries and keys) and the logits (soft cap).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm import fused_ops
from lm.config import DEFAULT_INIT_STD, ModelConfig
from lm.linear import linear
from lm.loss import head_cross_entropy, soft_cap

NO_TOKEN = -1  # the "previous id" of a sequence's first position: there is none
# Gates read only the first channels of their input, as nanochat's and modded-nanogpt's do: a gate needs
# a hint of which token it is at, not the whole vector, and stays nearly free.
SMEAR_GATE_CHANNELS = 24
VALUE_GATE_CHANNELS = 12
# Multipliers of the bigram hash (modded-nanogpt's): large odd numbers spread (previous, current) over the table.
BIGRAM_HASH = (36313, 27191)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / sqrt(d) + causal mask) v, in float32, returning the weights too.

    q, k, v: (batch, heads, time, d_head). Weights: (batch, heads, time, time), each row summing to 1,
    zero above the diagonal (a token never sees the tokens after it). This is the textbook formula the
    fused kernel computes; inspection uses it because the fused kernel never materialises the weights.
    """
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))
    t_q, t_k = scores.shape[-2:]
    # Query i sits at absolute position t_k - t_q + i when the keys include earlier (cached) tokens.
    future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(t_k - t_q + 1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype), weights


def rope_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (context_length, d_head), for rotary positions."""
    half = config.d_head // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of each head vector by its position's angle (the GPT-NeoX/Llama layout)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_table(config: ModelConfig) -> torch.Tensor:
    """The fixed position signal of "Attention Is All You Need": sin and cos at geometric wavelengths."""
    position = torch.arange(config.context_length, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, config.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / config.d_model))
    table = torch.zeros(config.context_length, config.d_model)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


class KVCache:
    """Keys and values of every layer for the tokens seen so far, in buffers allocated once.

    Generating token t needs every earlier token's keys and values; recomputing them at each step
    would cost a pass over the whole context per token. The cache keeps them instead, written by
    position into preallocated (layer, batch, head, position, d_head) buffers, so a new token costs
    one step however long the context already is.

    Two ways to use it. By default new tokens take the next positions after `length`, are written
    by slice assignment, and attention reads the filled part only. With `static=True` the caller
    sets `positions` (a tensor) for each call, and attention reads the whole buffer through a mask:
    every decode step then has the same shapes, which is what torch.compile (and CUDA graphs) need.
    Static `positions` are (new tokens,), the same for every row, or (batch, new tokens), one row's
    own positions each: a batch of sequences of different lengths then decodes in one step, each
    token attending to its own row's earlier positions (what `lm.serving` does). `view` gives a
    static cache over some rows and leading positions of the same buffers.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, static: bool = False) -> None:
        shape = (config.n_layer, batch_size, config.n_head, config.context_length, config.d_head)
        # The default mode never reads a position before writing it, so the buffers may start as
        # whatever memory held. A static cache multiplies every position by its attention weight, 0
        # for the masked ones, and 0 x NaN is NaN: it must start from zeros.
        allocate = torch.zeros if static else torch.empty
        self.keys = allocate(shape, device=device, dtype=dtype)
        self.values = allocate(shape, device=device, dtype=dtype)
        # Smear and the bigram table read each token's previous id: the cache keeps the ids by position too.
        self.ids = (torch.full((batch_size, config.context_length), NO_TOKEN, device=device)
                    if config.reads_previous_token else None)
        self._per_layer = [(self.keys[layer], self.values[layer]) for layer in range(config.n_layer)]
        self.length = 0  # positions filled (the default mode's bookkeeping)
        self.static = static
        self.positions: torch.Tensor | None = None  # static mode: the positions the next call writes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return the keys and values attention should read."""
        if self.static:
            # Index the whole buffers here rather than keep per-layer views: under torch.compile the
            # two buffers are then the only (static-address) inputs the step writes to, which CUDA
            # graphs require, instead of one aliasing view per layer.
            keys, values = self.keys[layer], self.values[layer]
            if self.positions.dim() == 1:
                keys[:, :, self.positions] = k
                values[:, :, self.positions] = v
            else:  # row b's new tokens go to its own positions[b]; the indexed view is (batch, new, head, d_head)
                rows = torch.arange(k.size(0), device=k.device)[:, None]
                keys[rows, :, self.positions] = k.transpose(1, 2)
                values[rows, :, self.positions] = v.transpose(1, 2)
            return keys, values
        keys, values = self._per_layer[layer]
        end = self.length + k.size(2)
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def record_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' ids (batch, new) at the positions they take; return each one's previous id
        (NO_TOKEN at position 0), read after the store so that new tokens see each other too."""
        assert self.ids is not None, "this cache was made for a model that does not read previous tokens"
        if not self.static:
            start, end = self.length, self.length + ids.size(1)
            self.ids[:, start:end] = ids
            if start > 0:
                return self.ids[:, start - 1:end - 1]
            return F.pad(self.ids[:, :end - 1], (1, 0), value=NO_TOKEN)
        assert self.positions is not None
        positions = self.positions.expand(ids.size(0), -1) if self.positions.dim() == 1 else self.positions
        rows = torch.arange(ids.size(0), device=ids.device)[:, None]
        self.ids[rows, positions] = ids
        earlier = self.ids[rows, (positions - 1).clamp(min=0)]
        return earlier.masked_fill(positions == 0, NO_TOKEN)

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of batch row `source` into row `target` (keys, values, ids)."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        if self.ids is not None:
            self.ids[target, :length] = self.ids[source, :length]

    def allowed(self) -> torch.Tensor:
        """Static mode: True where a new token may attend (itself and before): (new tokens, buffer length),
        or (batch, 1, new tokens, buffer length) for per-row positions (the 1 broadcasts over heads)."""
        assert self.positions is not None
        allowed = torch.arange(self.keys.size(3), device=self.keys.device) <= self.positions[..., None]
        return allowed if self.positions.dim() == 1 else allowed.unsqueeze(1)

    def view(self, rows: slice, length: int) -> KVCache:
        """A static cache over `rows` of the batch and the first `length` positions of these buffers.

        The buffers are shared, not copied: what a call through the view writes lands here. Attention
        through it reads `length` positions, not the whole context, so a batch of short sequences in a
        long context costs what their lengths need.
        """
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, rows, :, :length], self.values[:, rows, :, :length]
        view.ids = self.ids[rows, :length] if self.ids is not None else None
        view._per_layer = [(view.keys[layer], view.values[layer]) for layer in range(view.keys.size(0))]
        view.static, view.positions, view.length = True, None, 0
        return view


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """The fused kernel with the right causal mask, also when the keys include cached earlier tokens."""
    t_q, t_k = q.size(-2), k.size(-2)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    if t_q == 1:  # one new token: it may see every cached one (is_causal would let it see only the first)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # Several new tokens after cached ones: query i sits at position t_k - t_q + i (bottom-right aligned).
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    # A function, not nn.Dropout modules: with p = 0 (the default) it costs nothing per decoded token.
    return F.dropout(x, p, training=True) if p > 0 else x


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm`, computed by lm.fused_ops in fewer passes while training on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and fused_ops.applies(x):
            return fused_ops.rms_norm(x, self.weight, torch.finfo(x.dtype).eps if self.eps is None else self.eps)
        return super().forward(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Value embeddings go to every second layer, counted down from the last (which always has one)."""
    return layer % 2 == (n_layer - 1) % 2


class Attention(nn.Module):
    """Causal multi-head self-attention: each head compares queries with keys and mixes values."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head, self.d_head, self.dropout = config.n_head, config.d_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        # QK-norm: queries and keys of unit RMS (times a learned gain) keep the attention logits in range,
        # which lets training take larger steps without the softmax saturating.
        self.q_norm = RMSNorm(config.d_head, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.d_head, eps=config.norm_eps) if config.qk_norm else None
        # After QK-norm the logits' scale is fixed by the gains' start at 1; a gain above 1 sharpens attention
        # from the first step (nanochat's 1.2) instead of waiting for the gains to grow.
        self.qk_gain = config.qk_gain
        # Value embeddings (ResFormer; nanochat, modded-nanogpt): a per-token table added to the values, each
        # head through its own gate, 2·sigmoid(...) of the block input (1 at the start).
        self.value_emb: nn.Embedding | None = None
        self.value_gate: nn.Linear | None = None
        if config.value_embeddings and has_value_embedding(layer, config.n_layer):
            self.value_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.value_gate = nn.Linear(min(VALUE_GATE_CHANNELS, config.d_model), config.n_head, bias=False)

    def queries_and_keys(self, q: torch.Tensor, k: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm, the gain and rotary positions, as the model's options ask."""
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qk_gain != 1.0:
            q, k = q * self.qk_gain, k * self.qk_gain
        if rope is not None:
            rotate = fused_ops.rope if fused_ops.applies(q) else apply_rope
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k

    def with_value_embedding(self, v: torch.Tensor, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """v (batch, heads, time, d_head) plus the gated value embedding of `ids` where this layer has one."""
        if self.value_emb is None or self.value_gate is None:
            return v
        assert ids is not None, "a layer with value embeddings needs the token ids"
        batch, time = ids.shape
        gate = 2 * torch.sigmoid(self.value_gate(x[..., :self.value_gate.in_features]))  # (batch, time, heads)
        table = self.value_emb(ids).view(batch, time, self.n_head, self.d_head)
        return v + (gate.unsqueeze(-1) * table).transpose(1, 2).to(v.dtype)  # under autocast: v's precision

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False,
        cache: KVCache | None = None, layer: int = 0, ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, time, width = x.shape
        q, k, v = (t.view(batch, time, self.n_head, self.d_head).transpose(1, 2)
                   for t in linear(self.qkv, x).split(width, dim=2))
        v = self.with_value_embedding(v, x, ids)
        q, k = self.queries_and_keys(q, k, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        weights = None
        if need_weights:
            y, weights = explicit_attention(q, k, v)
        elif cache is not None and cache.static:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.allowed())
        else:
            y = causal_attention(q, k, v, self.active_dropout)
        y = y.transpose(1, 2).reshape(batch, time, width)
        return dropout(linear(self.proj, y), self.active_dropout), weights

    @property
    def active_dropout(self) -> float:
        return self.dropout if self.training else 0.0


class MLP(nn.Module):
    """The per-token feed-forward network: widen, apply a nonlinearity, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU with the tanh approximation, as GPT-2 used; SwiGLU gates one projection with another;
        # ReLU² (the modded-nanogpt speedrun's choice) is sparse and cheap.
        if self.swiglu:
            hidden = F.silu(linear(self.gate, x)) * linear(self.fc, x)
        elif self.relu2:
            hidden = F.relu(linear(self.fc, x)).square()
        else:
            hidden = F.gelu(linear(self.fc, x), approximate="tanh")
        return dropout(linear(self.proj, hidden), self.dropout if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1, self.attn = make_norm(config), Attention(config, layer)
        # Attention-only blocks (mlp "none", as in Anthropic's circuits work) have neither the MLP nor its norm.
        self.norm2, self.mlp = (make_norm(config), MLP(config)) if config.mlp != "none" else (None, None)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False,
        cache: KVCache | None = None, layer: int = 0, ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), rope, need_weights, cache, layer, ids)
        x = x + attended
        if self.mlp is None:
            return x, weights
        return x + self.mlp(self.norm2(x)), weights


def decode_block(block: Block, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache,
                 layer: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x, rope, cache=cache, layer=layer)[0]` for one new token per sample, x (batch, 1, d_model).

    The same arithmetic as the general forward with a third of its tensor operations: no split into
    three views and transposes, no mask choice, no dropout, the cache written at one position. At batch
    1 on a CPU each operation costs microseconds of dispatch on top of its arithmetic, which adds up to
    a noticeable share of a step whose matrix-vector products take a few milliseconds.
    """
    attn, batch, position = block.attn, x.size(0), cache.length
    normed = block.norm1(x)
    qkv = attn.qkv(normed).view(batch, 3, attn.n_head, 1, attn.d_head)
    q, k, v = qkv.unbind(1)  # (batch, heads, 1, d_head), views
    v = attn.with_value_embedding(v, normed, ids)
    q, k = attn.queries_and_keys(q, k, rope)
    keys, values = cache._per_layer[layer]
    keys[:, :, position] = k[:, :, 0]
    values[:, :, position] = v[:, :, 0]
    # One query may see every cached position: no mask needed.
    y = F.scaled_dot_product_attention(q, keys[:, :, :position + 1], values[:, :, :position + 1])
    x = x + attn.proj(y.view(batch, 1, -1))  # (batch, heads, 1, d_head) is (batch, 1, d_model) in memory
    return x if block.mlp is None else x + block.mlp(block.norm2(x))


@dataclass
class Trace:
    logits: torch.Tensor  # (batch, time, vocab)
    attention: dict[int, torch.Tensor]  # layer -> (batch, heads, time, time)
    hidden: list[torch.Tensor]  # the residual stream after the embedding, then after each block


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config), persistent=False)
        else:
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # Smear (modded-nanogpt, nanochat): a token's embedding plus a gated share of the previous token's,
        # the gate λ·sigmoid(w·e) of its own embedding e, λ starting at 0 (off until training opens it).
        if config.smear:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.d_model), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        # A hashed bigram table (modded-nanogpt): what the pair (previous, current) adds to the embedding.
        if config.bigram_buckets:
            self.bigram_emb = nn.Embedding(config.bigram_buckets, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        # Residual scalars: block i reads λr[i]·x + λ0[i]·x0, x0 the embedding, so any block can reach back to
        # the tokens themselves. At 1 and 0 the blocks read x, as without them.
        if config.residual_scalars:
            self.residual_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream; scale them so its variance
        # does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=DEFAULT_INIT_STD / math.sqrt(2 * config.n_layer))
        self._init_techniques()

    @torch.no_grad()
    def _init_techniques(self) -> None:
        """The starting values the speedrun techniques ask for (none of them draws random numbers unless on)."""
        config = self.config
        if config.zero_init_projections:  # each block starts as the identity; its first steps decide what it adds
            for block in self.blocks:
                nn.init.zeros_(block.attn.proj.weight)
                if block.mlp is not None:  # attention-only blocks (--mlp none) have no MLP
                    nn.init.zeros_(block.mlp.proj.weight)
        if not config.tie_embeddings and config.head_init_std != DEFAULT_INIT_STD:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=config.head_init_std)
        if config.smear:
            nn.init.zeros_(self.smear_gate.weight)
        if config.bigram_buckets:
            nn.init.zeros_(self.bigram_emb.weight)
        for block in self.blocks:
            if block.attn.value_emb is not None and block.attn.value_gate is not None:
                # As large as the values it is added to: a unit-RMS input through qkv's DEFAULT_INIT_STD weights.
                nn.init.normal_(block.attn.value_emb.weight, std=DEFAULT_INIT_STD * math.sqrt(config.d_model))
                nn.init.zeros_(block.attn.value_gate.weight)

    def lookup_tables(self) -> list[nn.Parameter]:
        """The embedding tables (token, learned positions, value embeddings, bigram): rows read, not multiplied."""
        tables = [module.weight for module in self.modules() if isinstance(module, nn.Embedding)]
        if not self.config.tie_embeddings:
            return tables
        return [t for t in tables if t is not self.lm_head.weight] + [self.tok_emb.weight]  # the tied matrix once

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The techniques' scalars and gates: residual and x0 lambdas, the smear's lambda and gate, value gates."""
        scalars = []
        if self.config.residual_scalars:
            scalars += [self.residual_lambdas, self.x0_lambdas]
        if self.config.smear:
            scalars += [self.smear_lambda, self.smear_gate.weight]
        scalars += [b.attn.value_gate.weight for b in self.blocks if b.attn.value_gate is not None]
        return scalars

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=DEFAULT_INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/output matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        logits_from: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (batch, time, vocab), None) for `ids` (batch, time), or with `targets`, (None, the mean
        cross-entropy): training needs only the loss, which lm.loss computes fused with the output head.

        With a `cache`, `ids` continue the tokens it holds: they take the next positions, attend to the
        cached keys and values as well as to each other, and are added to the cache. `logits_from` > 0
        computes logits (and the loss) only from that position on: scoring needs no more, and the output
        head is the largest product of a small model.
        """
        positions = self._positions(ids, cache)
        x0 = x = self.embed(ids, positions, self._previous_ids(ids, cache))
        rope = self._rope(positions)
        for index, block in enumerate(self.blocks):
            x, _ = block(self.block_input(index, x, x0), rope, cache=cache, layer=index, ids=ids)
        if cache is not None and not cache.static:
            cache.length += ids.size(1)
        if logits_from:
            x = x[:, logits_from:]
        x = self.norm(x)
        if targets is None:
            return self.logits(x), None
        return None, head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets[:, logits_from:].flatten(),
                                        softcap=self.config.logit_softcap)

    def decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sample, ids (batch, 1), after the `cache`'s tokens.

        What `forward(ids, cache=cache)[0][:, -1]` computes (a test holds them equal), in fewer operations:
        the decode loop calls it once per generated token. Inference only, default (non-static) cache.
        """
        position = cache.length
        if cache.static:
            raise ValueError("decode_step writes the default cache; a static cache goes through forward()")
        if position >= self.config.context_length:
            raise ValueError(f"position {position} is past the context length {self.config.context_length}")
        x0 = x = self.embed(ids, slice(position, position + 1), self._previous_ids(ids, cache))
        rope = self._rope(slice(position, position + 1))
        for index, block in enumerate(self.blocks):
            x = decode_block(block, self.block_input(index, x, x0), rope, cache, index, ids)
        cache.length = position + 1
        return self.logits(self.norm(x), fused=False)[:, 0]

    def trace(self, ids: torch.Tensor, attention_layers: set[int] | frozenset[int] = frozenset()) -> Trace:
        """A forward pass that keeps what inspection needs: the residual stream after the embedding and
        after every block, and the attention weights (batch, heads, time, time) of the chosen layers.

        Only the chosen layers take the explicit attention path; the others run the fused kernel.
        """
        positions = self._positions(ids, None)
        x0 = x = self.embed(ids, positions, self._previous_ids(ids, None))
        rope = self._rope(positions)
        hidden, weights = [x], {}
        for index, block in enumerate(self.blocks):
            x, layer_weights = block(self.block_input(index, x, x0), rope, need_weights=index in attention_layers,
                                     ids=ids)
            hidden.append(x)
            if layer_weights is not None:
                weights[index] = layer_weights
        return Trace(self.logits(self.norm(x)), weights, hidden)

    def block_input(self, index: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """What block `index` reads: the residual stream x, or with residual scalars λr·x + λ0·x0."""
        if not self.config.residual_scalars:
            return x
        return self.residual_lambdas[index] * x + self.x0_lambdas[index] * x0

    def logits(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """The output head on the final normed stream, soft-capped where the model caps its logits.

        `fused`: through lm/linear.py's measured kernel (a batch of positions), or nn.Linear's own (decoding)."""
        logits = linear(self.lm_head, x) if fused else self.lm_head(x)
        cap = self.config.logit_softcap
        return soft_cap(logits.float(), cap) if cap else logits

    def _positions(self, ids: torch.Tensor, cache: KVCache | None) -> slice | torch.Tensor:
        """The positions `ids` take: a slice after the cached tokens, or a static cache's tensor."""
        if cache is not None and cache.static:
            assert cache.positions is not None, "set cache.positions before a static-cache call"
            return cache.positions
        start = cache.length if cache is not None else 0
        end = start + ids.size(1)
        if end > self.config.context_length:
            raise ValueError(f"positions up to {end} exceed the context length {self.config.context_length}")
        return slice(start, end)

    def _previous_ids(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """Each position's previous token id (NO_TOKEN before the first), for smear and the bigram table; None
        when the model reads no previous tokens. With a cache, the cached tokens come first (it stores `ids`)."""
        if not self.config.reads_previous_token:
            return None
        if cache is None:
            return F.pad(ids[:, :-1], (1, 0), value=NO_TOKEN)
        return cache.record_ids(ids)

    def embed(self, ids: torch.Tensor, positions: slice | torch.Tensor,
              previous: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (smeared with the previous token's, plus a bigram table's row, where the model
        has those: `previous` holds the previous ids) plus, for learned or sinusoidal positions, those of
        `positions`."""
        x = self.tok_emb(ids)
        if previous is not None:
            x = self._with_previous_token(x, ids, previous)
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb.weight[positions]
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions]
        return dropout(x, self.config.dropout if self.training else 0.0)

    def _with_previous_token(self, x: torch.Tensor, ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Smear and the bigram table: what the previous ids add to the token embeddings x."""
        if self.config.smear:
            # The new tokens of a call take consecutive positions: each one's previous embedding is the row
            # before it, but the first's, which is looked up (a cached token's, or zeros at position 0).
            first = previous[:, :1]
            before = self.tok_emb(first.clamp(min=0)).masked_fill((first == NO_TOKEN).unsqueeze(-1), 0.0)
            earlier = torch.cat([before, x[:, :-1]], dim=1)
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.smear_gate.in_features]))
            x = x + gate * earlier
        if self.config.bigram_buckets:
            x = x + self.bigram_emb(bigram_buckets(previous, ids, self.config.bigram_buckets))
        return x

    def _rope(self, positions: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.pos_encoding != "rope":
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:  # per row: (batch, 1 for the heads, time, d)
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def bigram_buckets(previous: torch.Tensor, ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """The bigram table's row for each (previous, current) pair: a hash over all rows but the last, which
    is kept for a sequence's first token (no previous one)."""
    hashed = torch.bitwise_xor(BIGRAM_HASH[0] * ids, BIGRAM_HASH[1] * previous) % (buckets - 1)
    return hashed.masked_fill(previous == NO_TOKEN, buckets - 1)


def use_decoding_layout(model: GPT) -> GPT:
    """Store every weight matrix input-major in memory (the same values and shapes), for decoding.

    Decoding multiplies one row vector by each weight matrix. With the matrix laid out (in, out), the
    way GPT-2's original Conv1D stored it, the CPU's matrix-vector kernels read it much faster: the
    50257 x 768 output head of GPT-2 small takes 5.4 ms instead of 9.3 ms per token on the
    development machine. The embedding lookup, which shares that matrix, does not mind the layout.
    """
    relaid: dict[int, nn.Parameter] = {}  # a tied matrix is relaid once and stays shared
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                if id(weight) not in relaid:
                    relaid[id(weight)] = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
                module.weight = relaid[id(weight)]
    return model
