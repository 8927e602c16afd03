"""Looking inside a trained model: what each attention head attends to, and where tokens sit.

Attention weights come from the model's explicit attention path, softmax(q kᵀ / √d + causal mask),
computed only for the layers asked for: the fused kernel used for training and generation never
materialises them. Row i of a head's (time x time) matrix says how token i spreads its attention over
tokens 0..i; each row sums to 1.

Head statistics (averaged over rows 1.., since row 0 can only attend to itself):
- entropy: bits of uncertainty in a row; 0 means all attention on one token;
- previous: weight on the token just before (a "previous-token head");
- first: weight on the first token, which heads use as a resting place (an "attention sink");
- self: weight on the token itself;
- induction: on a random token sequence repeated twice, the weight a token in the second copy puts
  on the token that *followed* its earlier occurrence; heads that do this let a model continue
  patterns it has seen once in its context (an "induction head").
A head is labelled by its strongest behaviour when that scores at least 0.4, else "broad" when its
rows are spread out (entropy at least 70% of the maximum), else "mixed".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lm.errors import InputError, UsageError
from lm.generate import encode_prompt
from lm.model import GPT
from lm.tokenizer import Tokenizer, visible_text

LABEL_THRESHOLD = 0.4
BROAD_ENTROPY = 0.7
INDUCTION_LENGTH = 50


@dataclass
class AttentionMaps:
    """Attention weights of some layers for one text."""

    ids: list[int]
    tokens: list[bytes]  # the bytes each position's token stands for
    weights: dict[int, torch.Tensor]  # layer -> (heads, time, time), float32
    dropped: int  # tokens cut from the front so the text fits the context
    # layer -> the residual stream (time, d_model) at the layer's input and after its attention update
    # (x and x + attention(norm(x))): where attention moved each token's vector
    moves: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def encode_for_inspection(model: GPT, tokenizer: Tokenizer, text: str) -> tuple[list[int], int]:
    """The text's ids after <|endoftext|> (as in training), cut to the context's last window."""
    if not text:
        raise InputError("the text is empty; give some text to look at")
    ids = encode_prompt(tokenizer, text)
    dropped = max(0, len(ids) - model.config.context_length)
    return ids[dropped:], dropped


def check_layer(model: GPT, layer: int) -> int:
    if not 0 <= layer < model.config.n_layer:
        raise UsageError(f"layer {layer} does not exist: this model has layers 0 to {model.config.n_layer - 1}")
    return layer


def check_head(model: GPT, head: int) -> int:
    if not 0 <= head < model.config.n_head:
        raise UsageError(f"head {head} does not exist: this model has heads 0 to {model.config.n_head - 1}")
    return head


@torch.inference_mode()
def attention_maps(model: GPT, tokenizer: Tokenizer, text: str, layers: Iterable[int]) -> AttentionMaps:
    """Attention weights of `layers` for `text` (the other layers run the fast path)."""
    chosen = {check_layer(model, layer) for layer in layers}
    ids, dropped = encode_for_inspection(model, tokenizer, text)
    device = next(model.parameters()).device
    updates: dict[int, torch.Tensor] = {}
    # The attention module returns (output, weights); its output is what the block adds to the stream.
    hooks = [model.blocks[layer].attn.register_forward_hook(
        lambda module, args, output, layer=layer: updates.__setitem__(layer, output[0])) for layer in chosen]
    try:
        trace = model.trace(torch.tensor([ids], device=device), chosen)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {layer: w[0].float().cpu() for layer, w in trace.attention.items()}
    moves = {layer: (trace.hidden[layer][0].float().cpu(), (trace.hidden[layer][0] + updates[layer][0]).float().cpu())
             for layer in chosen}
    return AttentionMaps(ids, [tokenizer.token_bytes(i) for i in ids], weights, dropped, moves)


def head_matrix(maps: AttentionMaps, layer: int, head: int | None) -> torch.Tensor:
    """One head's (time, time) weights, or the mean over heads when `head` is None."""
    weights = maps.weights[layer]
    return weights.mean(dim=0) if head is None else weights[head]


def top_keys(matrix: torch.Tensor, query: int, k: int) -> list[tuple[int, float]]:
    """The k key positions query `query` attends to most, with their weights, strongest first."""
    values, positions = torch.topk(matrix[query, :query + 1], min(k, query + 1))
    return list(zip(positions.tolist(), values.tolist(), strict=True))


def top_attended(matrix: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """`top_keys` for every query row."""
    return [top_keys(matrix, query, k) for query in range(matrix.size(0))]


@dataclass
class HeadStats:
    layer: int
    head: int
    entropy: float  # bits, mean over rows
    spread: float  # entropy as a share of the most it could be (uniform attention), 0..1
    previous: float
    first: float
    itself: float
    induction: float | None = None
    label: str = ""

    def scores(self) -> dict[str, float | None]:
        """The behaviour scores by label name (induction is None when it was not measured)."""
        return {"previous-token": self.previous, "sink": self.first, "self": self.itself,
                "induction": self.induction}


def head_stats(layer: int, weights: torch.Tensor, induction: torch.Tensor | None = None) -> list[HeadStats]:
    """Statistics of every head in one layer's (heads, time, time) weights; see the module docstring.

    `induction` gives each head's induction score when it was measured (see `induction_scores`).
    """
    heads, time, _ = weights.shape
    if time < 2:
        raise InputError("the text is one token long; attention needs at least two tokens to look at")
    rows = weights[:, 1:, :]  # row 0 has no choice
    index = torch.arange(1, time)
    plogp = torch.where(rows > 0, rows * rows.clamp_min(1e-30).log2(), torch.zeros_like(rows))
    entropy = -plogp.sum(dim=-1)  # (heads, time - 1)
    spread = entropy / torch.log2(index.float() + 1)
    previous = rows.gather(2, (index - 1).expand(heads, -1)[..., None]).squeeze(-1)  # key i-1 of query i
    stats = []
    for head in range(heads):
        stats.append(HeadStats(
            layer=layer, head=head,
            entropy=entropy[head].mean().item(),
            spread=spread[head].mean().item(),
            previous=previous[head].mean().item(),
            first=rows[head, :, 0].mean().item(),
            itself=rows[head, torch.arange(time - 1), index].mean().item(),
            induction=None if induction is None else induction[head].item(),
        ))
    for item in stats:
        item.label = label_for(item)
    return stats


def label_for(stats: HeadStats) -> str:
    scores = {name: value for name, value in stats.scores().items() if value is not None}
    best = max(scores, key=scores.__getitem__)
    if scores[best] >= LABEL_THRESHOLD:
        return best
    return "broad" if stats.spread >= BROAD_ENTROPY else "mixed"


def repeated_random_ids(model: GPT, tokenizer: Tokenizer, seed: int = 0) -> tuple[list[int], int]:
    """<|endoftext|> (when the tokenizer has one), then INDUCTION_LENGTH random ordinary tokens (fewer when
    the context is short) twice over: the ids and the length of one copy."""
    length = min(INDUCTION_LENGTH, (model.config.context_length - 1) // 2)
    if length < 2:
        raise InputError("the context is too short to measure induction (it needs 5 tokens or more)")
    specials = set(tokenizer.special_tokens.values())
    ordinary = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in specials])
    generator = torch.Generator().manual_seed(seed)
    sequence = ordinary[torch.randint(len(ordinary), (length,), generator=generator)].tolist()
    start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    return start + sequence * 2, length


@torch.inference_mode()
def induction_scores(model: GPT, tokenizer: Tokenizer, seed: int = 0,
                     layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """Per layer (all, or `layers`), each head's mean weight from a token in the second copy of a repeated
    random sequence to the token after that token's first occurrence."""
    repeated, length = repeated_random_ids(model, tokenizer, seed)
    ids = torch.tensor(repeated, device=next(model.parameters()).device)
    offset = len(repeated) - 2 * length
    chosen = set(range(model.config.n_layer)) if layers is None else {check_layer(model, layer) for layer in layers}
    trace = model.trace(ids[None], chosen)
    queries = torch.arange(offset + length, offset + 2 * length)  # every token of the second copy
    targets = queries - length + 1  # the token after its first occurrence
    return {layer: w[0][:, queries, targets].float().mean(dim=-1).cpu() for layer, w in trace.attention.items()}


def heads_summary(model: GPT, tokenizer: Tokenizer, text: str) -> tuple[list[HeadStats], AttentionMaps]:
    """Statistics of every head of every layer on `text`, with induction scores."""
    maps = attention_maps(model, tokenizer, text, range(model.config.n_layer))
    induction = induction_scores(model, tokenizer)
    stats = [s for layer, w in sorted(maps.weights.items()) for s in head_stats(layer, w, induction[layer])]
    return stats, maps


@dataclass
class SharedToken:
    """A token both texts contain, with what it attends to in each (its last occurrence)."""

    token: bytes
    position_a: int
    position_b: int
    top_a: list[tuple[bytes, float]]
    top_b: list[tuple[bytes, float]]
    difference: float  # total variation between its attention over token strings in the two texts, 0..1


def compare_attention(model: GPT, tokenizer: Tokenizer, text_a: str, text_b: str, layer: int,
                      head: int | None, k: int = 3) -> list[SharedToken]:
    """How the attention of the tokens two texts share differs between them, at one layer and head."""
    maps_a = attention_maps(model, tokenizer, text_a, [layer])
    maps_b = attention_maps(model, tokenizer, text_b, [layer])
    matrix_a, matrix_b = head_matrix(maps_a, layer, head), head_matrix(maps_b, layer, head)
    last_a = {token_id: pos for pos, token_id in enumerate(maps_a.ids)}
    last_b = {token_id: pos for pos, token_id in enumerate(maps_b.ids)}
    shared = [t for t in last_a if t in last_b and t not in tokenizer.special_tokens.values()]
    if not shared:
        raise InputError("the two texts share no token, so there is nothing to compare; give texts with a "
                         "word in common (for example 'apple' in both)")
    result = []
    for token_id in sorted(shared, key=last_a.__getitem__):
        pa, pb = last_a[token_id], last_b[token_id]
        result.append(SharedToken(
            token=tokenizer.token_bytes(token_id), position_a=pa, position_b=pb,
            top_a=[(maps_a.tokens[p], w) for p, w in top_keys(matrix_a, pa, k)],
            top_b=[(maps_b.tokens[p], w) for p, w in top_keys(matrix_b, pb, k)],
            difference=_by_token_distance(maps_a, matrix_a[pa], maps_b, matrix_b[pb]),
        ))
    return result


def _by_token_distance(maps_a: AttentionMaps, row_a: torch.Tensor, maps_b: AttentionMaps,
                       row_b: torch.Tensor) -> float:
    """Total variation between two attention rows, with weight pooled by the token attended to."""
    def pooled(maps: AttentionMaps, row: torch.Tensor) -> dict[int, float]:
        mass: dict[int, float] = {}
        for token_id, weight in zip(maps.ids, row.tolist(), strict=False):
            mass[token_id] = mass.get(token_id, 0.0) + weight
        return mass

    a, b = pooled(maps_a, row_a), pooled(maps_b, row_b)
    return 0.5 * sum(abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in a.keys() | b.keys())


# The gravity view and the data of the page --------------------------------------------------------


@dataclass
class GravityMap:
    """Token vectors at one layer's input and after its attention update, in two dimensions.

    The plane is the one the vectors vary most in: the first two principal components of all of them
    (every text, before and after, together), so the maps of several texts share their axes and a
    token's arrow shows where attention pulled its vector. Positions holding a special token (the
    <|endoftext|> a text is read after) are left out (None): that vector sits far from the others and
    would squash the map.
    """

    layer: int
    variance: tuple[float, float]  # the share of the vectors' variance along each axis
    before: list[list[tuple[float, float] | None]]  # per text, per position
    after: list[list[tuple[float, float] | None]]


def gravity_map(texts: list[AttentionMaps], layer: int, skipped_ids: set[int]) -> GravityMap:
    """The `GravityMap` of `layer` (whose moves `attention_maps` recorded) for one or more texts."""
    kept = [[p for p, token_id in enumerate(m.ids) if token_id not in skipped_ids] for m in texts]
    before = [m.moves[layer][0][positions] for m, positions in zip(texts, kept, strict=True)]
    after = [m.moves[layer][1][positions] for m, positions in zip(texts, kept, strict=True)]
    points = torch.cat(before + after)
    if len(points) == 0:
        return GravityMap(layer, (0.0, 0.0), [[None] * len(m.ids) for m in texts], [[None] * len(m.ids) for m in texts])
    center = points.mean(dim=0)
    _, singular, axes = torch.linalg.svd(points - center, full_matrices=False)
    axes = torch.cat([axes[:2], torch.zeros(max(0, 2 - len(axes)), points.size(1))])  # one point: a 0-D plane
    # An axis's sign is arbitrary; fix it (largest loading positive) so the same model draws the same map.
    largest = axes.gather(1, axes.abs().argmax(dim=1, keepdim=True))
    axes = axes * torch.where(largest < 0, -1.0, 1.0)
    variance = singular.square()
    share = [*(variance[:2] / variance.sum().clamp_min(1e-30)).tolist(), 0.0, 0.0]

    def placed(vectors: list[torch.Tensor]) -> list[list[tuple[float, float] | None]]:
        result = []
        for m, positions, chunk in zip(texts, kept, vectors, strict=True):
            row: list[tuple[float, float] | None] = [None] * len(m.ids)
            for position, (x, y) in zip(positions, ((chunk - center) @ axes.T).tolist(), strict=True):
                row[position] = (round(x, 4), round(y, 4))
            result.append(row)
        return result

    return GravityMap(layer, (round(share[0], 4), round(share[1], 4)), placed(before), placed(after))


def inspection_data(model: GPT, tokenizer: Tokenizer, text: str, layers: Iterable[int], heads: list[int | None],
                    compare: str | None = None) -> dict[str, Any]:
    """What `lm inspect-attention --format json` writes and its HTML page shows: the tokens and the
    weights of the chosen layers and heads (None: their mean), every head's statistics in those layers,
    their gravity maps and, with `compare`, the second text's tokens and weights (its vectors share the
    gravity maps). Plain JSON values, except each entry's `weights`: a (time, time) tensor, which
    `inspection_json` writes as rows (a GPT-2-sized model's weights as Python floats would take GBs)."""
    chosen = sorted({check_layer(model, layer) for layer in layers})
    for head in heads:
        if head is not None:
            check_head(model, head)
    texts = [attention_maps(model, tokenizer, text, chosen)]
    if compare is not None:
        texts.append(attention_maps(model, tokenizer, compare, chosen))
    specials = set(tokenizer.special_tokens.values())
    data = _text_data(text, texts[0], heads, specials)
    if len(texts[0].ids) >= 2:
        induction = induction_scores(model, tokenizer, layers=chosen)
        data["heads"] = [asdict(s) for layer in chosen for s in head_stats(layer, texts[0].weights[layer],
                                                                          induction[layer])]
    else:
        data["heads"] = []
    data["gravity"] = [asdict(gravity_map(texts, layer, specials)) for layer in chosen]
    if compare is not None:
        data["compare"] = _text_data(compare, texts[1], heads, specials)
    return data


def _text_data(text: str, maps: AttentionMaps, heads: list[int | None], specials: set[int]) -> dict[str, Any]:
    return {
        "text": text,
        "dropped_tokens": maps.dropped,
        "tokens": [{"position": i, "id": token_id, "text": visible_text(data), "bytes": data.hex(),
                    "special": token_id in specials}
                   for i, (token_id, data) in enumerate(zip(maps.ids, maps.tokens, strict=True))],
        "attention": [{"layer": layer, "head": "mean" if head is None else head,
                       "weights": head_matrix(maps, layer, head)}
                      for layer in sorted(maps.weights) for head in heads],
    }


def inspection_json(data: dict[str, Any]) -> str:
    """`inspection_data`'s result as JSON: row i of each `weights` holds query i's weights on keys 0..i."""
    def rows(value: object) -> list[list[float]]:
        if isinstance(value, torch.Tensor):
            return _lower_triangle(value)
        raise TypeError(f"{type(value).__name__} is not JSON")

    return json.dumps(data, ensure_ascii=False, default=rows)


def _lower_triangle(matrix: torch.Tensor) -> list[list[float]]:
    """Row i holds query i's weights on keys 0..i (the rest are masked, always 0)."""
    flat = matrix[tuple(torch.tril_indices(*matrix.shape))].tolist()  # one conversion, not one per row
    return [flat[query * (query + 1) // 2:(query + 1) * (query + 2) // 2] for query in range(matrix.size(0))]


# Embeddings ---------------------------------------------------------------------------------------


def resolve_token(tokenizer: Tokenizer, word: str) -> list[int]:
    """The token ids for `word`: one token if possible (with a leading space first, as words mostly
    appear mid-sentence), else the pieces it is spelled with."""
    if not word:
        raise InputError("give a token or word to look up")
    for candidate in (word if word.startswith(" ") else " " + word, word):
        ids = tokenizer.encode(candidate)
        if len(ids) == 1:
            return ids
    return tokenizer.encode(word)


@torch.inference_mode()
def nearest_tokens(model: GPT, tokenizer: Tokenizer, ids: list[int], k: int) -> list[tuple[int, float]]:
    """The k tokens whose embeddings are closest (cosine similarity) to the mean embedding of `ids`."""
    table = model.tok_emb.weight.float()
    query = table[ids].mean(dim=0)
    similarity = torch.nn.functional.cosine_similarity(table, query[None], dim=-1)
    excluded = set(ids) | set(tokenizer.special_tokens.values())
    similarity[list(excluded)] = float("-inf")
    values, positions = torch.topk(similarity, min(k, len(similarity) - len(excluded)))
    return list(zip(positions.tolist(), values.tolist(), strict=True))


@torch.inference_mode()
def logit_lens(model: GPT, tokenizer: Tokenizer, context: str, token_ids: list[int],
               k: int) -> tuple[int, list[list[tuple[int, float]]]]:
    """Where the residual stream at the token's last occurrence in `context` points, layer by layer.

    Each state (after the embedding, then after each block) is passed through the final norm and the
    output head, as if the model stopped there; the k likeliest next tokens and their probabilities
    show how the prediction forms. Returns the position used and, per state, the top tokens.
    """
    ids, _ = encode_for_inspection(model, tokenizer, context)
    target = token_ids[-1]
    if target not in ids:
        raise InputError(f"{tokenizer.decode([target])!r} does not occur in the --context text as a token; "
                         "give a context that contains it")
    position = len(ids) - 1 - ids[::-1].index(target)
    trace = model.trace(torch.tensor([ids], device=next(model.parameters()).device))
    layers = []
    for state in trace.hidden:
        probs = model.logits(model.norm(state[0, position]), fused=False).float().softmax(dim=-1)
        values, top = torch.topk(probs, k)
        layers.append(list(zip(top.tolist(), values.tolist(), strict=True)))
    return position, layers
