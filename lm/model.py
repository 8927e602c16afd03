"""A GPT: a decoder-only transformer that reads token ids and scores every possible next token.

    ids ─► token embedding (+ learned or sinusoidal positions) ─► N blocks ─► norm ─► output head ─► logits
    block:  x = x + attention(norm(x))      each token gathers context from the tokens before it
            x = x + mlp(norm(x))            then transforms what it gathered, on its own

The residual stream `x` runs straight through the stack; each block adds to it (pre-norm), which keeps
deep stacks trainable. With rotary positions (RoPE) nothing is added to the embeddings: queries and
keys are rotated by an angle that grows with position, so their dot product depends on the distance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig


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


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    """Causal multi-head self-attention: each head compares queries with keys and mixes values."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.d_head, self.dropout = config.n_head, config.d_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, time, width = x.shape
        q, k, v = (t.view(batch, time, self.n_head, self.d_head).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        weights = None
        if need_weights:
            y, weights = explicit_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, time, width)
        return self.resid_dropout(self.proj(y)), weights


class MLP(nn.Module):
    """The per-token feed-forward network: widen, apply a nonlinearity, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU with the tanh approximation, as GPT-2 used; SwiGLU gates one projection with another.
        hidden = F.silu(self.gate(x)) * self.fc(x) if self.swiglu else F.gelu(self.fc(x), approximate="tanh")
        return self.dropout(self.proj(hidden))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.attn = make_norm(config), Attention(config)
        self.norm2, self.mlp = make_norm(config), MLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), rope, need_weights)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


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
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream; scale them so its variance
        # does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/output matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (batch, time, vocab) for `ids` (batch, time), and the mean cross-entropy if `targets`."""
        x = self.embed(ids)
        rope = self._rope(ids.size(1))
        for block in self.blocks:
            x, _ = block(x, rope)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def forward_with_attention(
        self, ids: torch.Tensor, layers: set[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits, plus the attention weights (batch, heads, time, time) of the chosen layers.

        Only those layers take the explicit path; the others run the fused kernel.
        """
        x = self.embed(ids)
        rope = self._rope(ids.size(1))
        weights: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x, layer_weights = block(x, rope, need_weights=index in layers)
            if layer_weights is not None:
                weights[index] = layer_weights
        return self.lm_head(self.norm(x)), weights

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.size(1)
        if time > self.config.context_length:
            raise ValueError(f"sequence of {time} tokens is longer than the context length "
                             f"{self.config.context_length}")
        x = self.tok_emb(ids)
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(torch.arange(time, device=ids.device))
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[:time]
        return self.drop(x)

    def _rope(self, time: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.pos_encoding != "rope":
            return None
        return self.rope_cos[:time], self.rope_sin[:time]
