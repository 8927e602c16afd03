"""Which heads matter: causal tests on attention heads (ablation, detectors, direct logit attribution,
activation patching).

`lm.inspect` shows where heads look; this module asks what they do for the prediction.

- Ablation: a head's output (its d_head slice of the attention output, before the output projection)
  is replaced by its mean over the text's positions in the clean run ("mean", as TransformerLens's
  mean ablation) or by zeros ("zero"), and the change in the mean loss per predicted token is measured.
  Positive: the model predicts the text worse without the head (the head helps); negative: better.
  Heads are edited through a forward pre-hook on each attention's output projection, so the model's
  own code paths are untouched and nothing changes when no ablation is active.
- Detectors, with TransformerLens's `head_detector` definitions ("mul" error measure, no exclusions):
  a head's score is the share of its attention that falls where a detection pattern is 1.
  previous-token: key i-1 of query i; duplicate-token: earlier keys holding the query's own token;
  induction: the key after such an earlier occurrence. Previous- and duplicate-token are measured on
  the text, induction on <|endoftext|> then INDUCTION_LENGTH random ordinary tokens (seed
  INDUCTION_SEED) repeated twice, as TransformerLens and the ARENA exercises do. The share is of
  every row's attention, as in TransformerLens: a perfect previous-token head scores (time - 1) / time,
  a perfect induction head about 0.5 (only the second copy's rows can match), unlike
  `lm.inspect`'s induction score, which averages over the second copy alone.
- Direct logit attribution: the final residual stream at one position is a sum of parts (token
  embedding, position embedding, each head through its slice of the output projection, each
  attention's output bias, each MLP); each part is passed through the final norm with the norm's
  scale frozen at the full residual's value (TransformerLens's `apply_ln_to_stack`: parts centred for
  LayerNorm, divided by the full stream's scale, times the norm's weight) and dotted with the target
  token's output row. The norm's bias gives one more constant part; the parts sum to the logit.
- Activation patching: a clean and a corrupt text of the same token length; the corrupt text is run
  again with one activation taken from the clean run (one layer x position of the residual stream, or
  one head's output at every position, through the same pre-hooks), and the share of the logit
  difference target - versus at the last position that comes back, (patched - corrupt) / (clean -
  corrupt), is reported, as TransformerLens's `patching` module and the ARENA exercises define it.
  The patched runs start at the patched layer from the corrupt run's stream (the blocks below are the
  same), one row per position or head, in groups of at most ACTIVATION_BUDGET stream values; positions
  where the two streams are equal (all before the first differing token) are 0 without a run.
- Tracking during training (`lm train --track-heads`): at each evaluation, every head's previous-token
  score on the start of the validation text and its induction score (the detectors above, as `detect_heads`
  computes them), and an in-context score after Olsson et al. (2022), "In-context Learning and Induction
  Heads": how much lower the loss is late in a window than early in it. Theirs (contexts of 512 and more)
  is the mean loss of the 500th token minus that of the 50th. Here, for a context of T tokens, the tokens
  n = ⌈9T/10⌉..T of a validation window (the last tenth; token n is predicted from the n tokens before it)
  are scored twice: with the whole window before them, and with only its last n - s tokens, s = ⌈9T/10⌉ -
  ⌈T/20⌉, so from ⌈T/20⌉ to about 3T/20 tokens (a tenth of the window around T/10). The score is the first
  mean loss minus the second, in nats, over the same IN_CONTEXT_WINDOWS validation windows every time. At
  T = 512: tokens 461-512 predicted from 461-512 tokens, minus the same tokens from 26-77. Scoring the same
  tokens both ways measures what Olsson et al.'s difference measures (the loss late in a context minus the
  loss early in one) without the difference in how hard two sets of tokens are, which with a few thousand
  tokens swamps it. Negative: the model predicts better with more context; it falls further as induction
  heads form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lm.data import token_byte_lengths
from lm.errors import InputError, UsageError
from lm.inspect import check_head, check_layer, encode_for_inspection, repeated_random_ids
from lm.linear import linear
from lm.model import GPT, Trace
from lm.tokenizer import Tokenizer

ABLATIONS = ("mean", "zero")
INDUCTION_SEED = 0  # lm.inspect.INDUCTION_LENGTH random tokens per copy (fewer in a shorter context)
LOGIT_BUDGET = 2**26  # logit values computed at once by the ablation passes (256 MB in float32)


def check_plain_forward(model: GPT, what: str) -> None:
    """Ablation, attribution and patching recompute the blocks and the head as a plain GPT does: refuse a model
    whose forward pass has more (the speedrun's techniques other than --qk-gain, which lives in attention)."""
    extra = [flag for flag in model.config.techniques() if flag != "--qk-gain"]
    if extra:
        raise UsageError(f"{what} recomputes the blocks as a plain GPT does, and this run uses {', '.join(extra)}, "
                         "which it does not follow; inspect a run trained without them")

# A head edit: given one layer's heads' outputs (batch, time, heads, d_head), return them edited.
HeadEdit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edited_heads(model: GPT, edits: dict[int, HeadEdit]) -> Iterator[None]:
    """Within the block, layer l's heads' outputs pass through `edits[l]` before the output projection."""
    def pre_hook(edit: HeadEdit) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor]]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            (y,) = args
            batch, time, width = y.shape
            heads = model.config.n_head
            return (edit(y.view(batch, time, heads, width // heads)).reshape(batch, time, width),)
        return hook

    handles = [model.blocks[layer].attn.proj.register_forward_pre_hook(pre_hook(edit)) for layer, edit in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def parse_heads(spec: str, model: GPT) -> list[tuple[int, int]]:
    """'1.3,2.0' -> [(1, 3), (2, 0)]: heads as LAYER.HEAD, comma-separated."""
    heads = []
    for item in spec.split(","):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise UsageError(f"--ablate {spec!r}: give heads as LAYER.HEAD separated by commas, e.g. 1.3,2.0")
        heads.append((check_layer(model, int(layer)), check_head(model, int(head))))
    return heads


# Ablation -----------------------------------------------------------------------------------------


@dataclass
class TokenEffect:
    position: int  # the position of the predicted token
    increase: float  # nats its loss rose by when the head was ablated


@dataclass
class HeadAblation:
    layer: int
    head: int
    nats: float  # change in mean loss per predicted token
    bits_per_byte: float
    helped: list[TokenEffect] = field(default_factory=list)  # the tokens it helps most, most first


@dataclass
class Ablation:
    ids: list[int]
    tokens: list[bytes]
    dropped: int
    mode: str
    loss: float  # clean mean loss per predicted token, nats
    bits_per_byte: float
    heads: list[list[HeadAblation]]  # per layer, per head
    joint: HeadAblation | None = None  # the heads of --ablate together (layer, head = -1)
    joint_heads: list[tuple[int, int]] = field(default_factory=list)


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each predicted token, (batch, time - 1), from logits (batch, time, vocab), ids (1, time)."""
    targets = ids[:, 1:].expand(logits.size(0), -1)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")


def head_means(model: GPT, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each layer's heads' outputs averaged over the positions of one clean run: (heads, d_head)."""
    means: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> HeadEdit:
        def record(y: torch.Tensor) -> torch.Tensor:
            means[layer] = y[0].mean(dim=0)
            return y
        return record

    with edited_heads(model, {layer: recorder(layer) for layer in range(model.config.n_layer)}):
        model(ids)
    return means


def replace_heads(mask: torch.Tensor, replacement: torch.Tensor) -> HeadEdit:
    """An edit putting `replacement` (heads, d_head) where `mask` (batch, heads) is True, in every position."""
    def edit(y: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[:, None, :, None], replacement[None, None].to(y.dtype), y)
    return edit


def _replacements(model: GPT, ids: torch.Tensor, mode: str) -> dict[int, torch.Tensor]:
    if mode not in ABLATIONS:
        raise UsageError(f"--ablation {mode!r} is not one of: {', '.join(ABLATIONS)}")
    if mode == "mean":
        return head_means(model, ids)
    return {layer: torch.zeros(model.config.n_head, model.config.d_head, device=ids.device)
            for layer in range(model.config.n_layer)}


def ablated_losses(model: GPT, ids: torch.Tensor, masks: dict[int, torch.Tensor],
                   replacements: dict[int, torch.Tensor], first_layer: int = 0,
                   stream: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses (batch, time - 1) of `ids` (1, time) run once per mask row, each row with the heads
    its masks (layer -> (batch, heads) bools) mark replaced by `replacements`.

    With `stream`, the residual stream (1, time, d_model) entering block `first_layer` in a clean run, the
    blocks before it are not run again (the masks must ablate nothing there): they are the same for every
    row. Rows run in groups whose logits fit LOGIT_BUDGET values: a GPT-2-sized vocabulary's logits for
    12 rows of 1024 tokens would take 2.4 GB.
    """
    time = ids.size(1)
    if stream is None:
        first_layer, stream = 0, model.embed(ids, slice(0, time))
    if any(mask.any() for layer, mask in masks.items() if layer < first_layer):
        raise ValueError(f"the masks ablate heads before layer {first_layer}, where the clean stream is reused")
    rope = model._rope(slice(0, time))
    batch = next(iter(masks.values())).size(0)
    per_pass = max(1, LOGIT_BUDGET // (time * model.config.vocab_size))
    losses = []
    for start in range(0, batch, per_pass):
        rows = slice(start, min(batch, start + per_pass))
        edits = {layer: replace_heads(mask[rows], replacements[layer]) for layer, mask in masks.items()
                 if layer >= first_layer}
        with edited_heads(model, edits):
            x = stream.expand(rows.stop - rows.start, -1, -1)
            for block in model.blocks[first_layer:]:  # GPT.forward from block `first_layer` on
                x, _ = block(x, rope)
            losses.append(_token_losses(linear(model.lm_head, model.norm(x)), ids))
    return torch.cat(losses)


@torch.inference_mode()
def ablate_heads(model: GPT, tokenizer: Tokenizer, text: str, mode: str = "mean",
                 joint: list[tuple[int, int]] | None = None, top_tokens: int = 3) -> Ablation:
    """The change in loss on `text` when each head (and, with `joint`, those heads together) is ablated."""
    check_plain_forward(model, "head ablation")
    ids_list, dropped = encode_for_inspection(model, tokenizer, text)
    if len(ids_list) < 2:
        raise InputError("the text is too short: ablation needs at least one token to predict")
    device = next(model.parameters()).device
    ids = torch.tensor([ids_list], device=device)
    replacements = _replacements(model, ids, mode)
    heads, layers = model.config.n_head, range(model.config.n_layer)

    def masks(batch: int) -> dict[int, torch.Tensor]:
        # Every layer edited (most with nothing to replace) in every run, the clean one too: an edited
        # projection runs PyTorch's own kernel rather than `linear`'s choice, and the differences should
        # hold the ablation's effect, not the kernels' rounding.
        return {layer: torch.zeros(batch, heads, dtype=torch.bool, device=device) for layer in layers}

    with edited_heads(model, {layer: replace_heads(mask, replacements[layer]) for layer, mask in masks(1).items()}):
        trace = model.trace(ids)  # the stream entering each block, through the same kernels as below
    clean = _token_losses(trace.logits, ids)[0].float().cpu()
    byte_counts = token_byte_lengths(tokenizer)[ids_list[1:]].float()
    # Bits per byte counts the tokens that spell text (special tokens have no bytes), as lm.eval does.
    text_tokens = byte_counts > 0
    total_bytes = byte_counts.sum().item()

    def measured(layer: int, head: int, losses: torch.Tensor) -> HeadAblation:
        increase = losses - clean
        bpb = (increase[text_tokens].sum().item() / (math.log(2) * total_bytes)) if total_bytes else float("nan")
        order = torch.argsort(increase, descending=True)[:top_tokens].tolist()
        helped = [TokenEffect(position + 1, increase[position].item()) for position in order if increase[position] > 0]
        return HeadAblation(layer, head, increase.mean().item(), bpb, helped)

    table = []
    for layer in layers:
        one_each = masks(heads)
        one_each[layer] = torch.eye(heads, dtype=torch.bool, device=device)  # row h ablates head h
        losses = ablated_losses(model, ids, one_each, replacements, layer, trace.hidden[layer]).float().cpu()
        table.append([measured(layer, head, losses[head]) for head in range(heads)])
    result = Ablation(ids_list, [tokenizer.token_bytes(i) for i in ids_list], dropped, mode, clean.mean().item(),
                      _bits_per_byte(clean, byte_counts), table)
    if joint:
        together = masks(1)
        for layer, head in joint:
            together[layer][0, head] = True
        first = min(layer for layer, _ in joint)
        losses = ablated_losses(model, ids, together, replacements, first, trace.hidden[first])
        result.joint = measured(-1, -1, losses[0].float().cpu())
        result.joint_heads = list(joint)
    return result


def _bits_per_byte(losses: torch.Tensor, byte_counts: torch.Tensor) -> float:
    total_bytes = byte_counts.sum().item()
    return losses[byte_counts > 0].sum().item() / (math.log(2) * total_bytes) if total_bytes else float("nan")


def most_important(ablation: Ablation, count: int) -> list[HeadAblation]:
    """The `count` heads whose ablation raises the loss most, most first."""
    every = [head for layer in ablation.heads for head in layer]
    return sorted(every, key=lambda head: head.nats, reverse=True)[:count]


# Detectors ----------------------------------------------------------------------------------------


def previous_token_pattern(time: int) -> torch.Tensor:
    """1 at key i-1 of query i."""
    return torch.eye(time).roll(-1, dims=1).tril(-1) if time > 1 else torch.zeros(1, 1)


def duplicate_token_pattern(ids: list[int]) -> torch.Tensor:
    """1 at every earlier key holding query i's own token (the token itself excluded)."""
    tokens = torch.tensor(ids)
    return (tokens[:, None] == tokens[None, :]).float().tril(-1)


def induction_pattern(ids: list[int]) -> torch.Tensor:
    """1 at the key just after each earlier occurrence of query i's token (the duplicate pattern shifted
    one key to the right, nothing wrapped around into key 0)."""
    duplicate = duplicate_token_pattern(ids)
    shifted = torch.zeros_like(duplicate)
    shifted[:, 1:] = duplicate[:, :-1]
    return shifted.tril()


def detector_scores(weights: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Each head's share of attention on the pattern: sum(weights x pattern) / sum(weights), for one layer's
    weights (heads, time, time); TransformerLens's "mul" measure."""
    return (weights * pattern).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))


def perfect_score(pattern: torch.Tensor) -> float:
    """The score of a head that puts all of each query's attention on the pattern: the share of queries
    with any pattern key. Below 1 where some have none, as the first copy of the induction sequence (about
    half of it: a perfect induction head scores about 0.5 there, as in TransformerLens)."""
    return (pattern.sum(dim=-1) > 0).float().mean().item()


@dataclass
class Detectors:
    """Scores per layer, per head, 0..1."""

    previous_token: list[list[float]]
    duplicate_token: list[list[float]]
    induction: list[list[float]]
    induction_length: int  # random tokens per copy of the induction sequence
    induction_seed: int
    induction_perfect: float  # what a perfect induction head scores on that sequence


def _all_weights(model: GPT, ids: list[int]) -> dict[int, torch.Tensor]:
    device = next(model.parameters()).device
    trace = model.trace(torch.tensor([ids], device=device), set(range(model.config.n_layer)))
    return {layer: w[0].float().cpu() for layer, w in trace.attention.items()}


@torch.inference_mode()
def detect_heads(model: GPT, tokenizer: Tokenizer, text: str, seed: int = INDUCTION_SEED) -> Detectors:
    """Previous-token and duplicate-token scores on `text`, induction scores on repeated random tokens."""
    ids, _ = encode_for_inspection(model, tokenizer, text)
    weights = _all_weights(model, ids)
    previous, duplicate = previous_token_pattern(len(ids)), duplicate_token_pattern(ids)
    repeated, length = repeated_random_ids(model, tokenizer, seed)
    induction_weights = _all_weights(model, repeated)
    induction = induction_pattern(repeated)
    layers = range(model.config.n_layer)
    return Detectors(
        previous_token=[detector_scores(weights[layer], previous).tolist() for layer in layers],
        duplicate_token=[detector_scores(weights[layer], duplicate).tolist() for layer in layers],
        induction=[detector_scores(induction_weights[layer], induction).tolist() for layer in layers],
        induction_length=length, induction_seed=seed, induction_perfect=perfect_score(induction))


# Direct logit attribution -------------------------------------------------------------------------


@dataclass
class Part:
    name: str  # "token embedding", "position embedding", "L1.H3", "L1 attention bias", "L1 MLP", "final norm bias"
    contribution: float


@dataclass
class Attribution:
    position: int
    target: int
    versus: int | None
    logit: float  # the model's logit of target (minus that of versus)
    parts: list[Part]


def _residual_parts(model: GPT, ids: torch.Tensor,
                    position: int) -> tuple[list[Part], list[torch.Tensor], torch.Tensor]:
    """The parts the final residual stream at `position` is the sum of: (names, vectors, the stream)."""
    heads, d_head = model.config.n_head, model.config.d_head
    outputs: dict[int, torch.Tensor] = {}
    mlps: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> HeadEdit:
        def record(y: torch.Tensor) -> torch.Tensor:
            outputs[layer] = y[0, position].float()  # (heads, d_head)
            return y
        return record

    hooks = [block.mlp.register_forward_hook(
        lambda module, args, output, layer=layer: mlps.__setitem__(layer, output[0, position].float()))
        for layer, block in enumerate(model.blocks) if block.mlp is not None]
    try:
        with edited_heads(model, {layer: recorder(layer) for layer in range(model.config.n_layer)}):
            trace = model.trace(ids)
    finally:
        for hook in hooks:
            hook.remove()
    names = ["token embedding"]
    vectors = [model.tok_emb.weight[ids[0, position]].float()]
    if model.config.pos_encoding == "learned":
        names.append("position embedding")
        vectors.append(model.pos_emb.weight[position].float())
    elif model.config.pos_encoding == "sinusoidal":
        names.append("position embedding")
        vectors.append(model.pos_table[position].float())
    for layer, block in enumerate(model.blocks):
        weight = block.attn.proj.weight.float()  # (d_model, heads x d_head)
        for head in range(heads):
            names.append(f"L{layer}.H{head}")
            vectors.append(weight[:, head * d_head:(head + 1) * d_head] @ outputs[layer][head])
        if block.attn.proj.bias is not None:
            names.append(f"L{layer} attention bias")
            vectors.append(block.attn.proj.bias.float())
        if block.mlp is not None:  # attention-only blocks (--mlp none) have none
            names.append(f"L{layer} MLP")
            vectors.append(mlps[layer])
    return [Part(name, 0.0) for name in names], vectors, trace.hidden[-1][0, position].float()


def resolve_position(position: int | None, length: int) -> int:
    chosen = length - 1 if position is None else position
    if chosen < 0:
        chosen += length
    if not 0 <= chosen < length:
        raise UsageError(f"--position {position} is outside the text's {length} tokens (0 to {length - 1}, "
                         "or negative from the end)")
    return chosen


@torch.inference_mode()
def attribute_logit(model: GPT, tokenizer: Tokenizer, text: str, position: int | None = None,
                    target: int | None = None, versus: int | None = None) -> Attribution:
    """Each part's direct contribution to the logit of `target` (default: the predicted token) at
    `position` (default: the last), or to the logit difference target - `versus`; see the module docstring."""
    check_plain_forward(model, "logit attribution")
    ids_list, _ = encode_for_inspection(model, tokenizer, text)
    position = resolve_position(position, len(ids_list))
    ids = torch.tensor([ids_list], device=next(model.parameters()).device)
    parts, vectors, stream = _residual_parts(model, ids, position)
    norm = model.norm
    centred = isinstance(norm, torch.nn.LayerNorm)
    if centred:
        stream = stream - stream.mean()
    eps = norm.eps if norm.eps is not None else torch.finfo(stream.dtype).eps
    scale = (stream.square().mean() + eps).sqrt()  # frozen at the full residual's value
    head = model.lm_head.weight.float()
    if target is None:
        target = int(torch.argmax(head @ _normed(norm, stream, scale)).item())
    direction = head[target] - (head[versus] if versus is not None else 0.0)
    gain = norm.weight.float() if norm.weight is not None else torch.ones_like(stream)
    for part, vector in zip(parts, vectors, strict=True):
        if centred:
            vector = vector - vector.mean()
        part.contribution = (vector / scale * gain @ direction).item()
    bias = getattr(norm, "bias", None)
    if bias is not None:
        parts.append(Part("final norm bias", (bias.float() @ direction).item()))
    logits = model.trace(ids).logits[0, position].float()
    logit = logits[target] - (logits[versus] if versus is not None else 0.0)
    return Attribution(position, target, versus, logit.item(), parts)


def _normed(norm: torch.nn.Module, centred_stream: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = centred_stream / scale
    if norm.weight is not None:
        out = out * norm.weight.float()
    bias = getattr(norm, "bias", None)
    return out + bias.float() if bias is not None else out


# Activation patching ------------------------------------------------------------------------------

ACTIVATION_BUDGET = 2**24  # residual-stream values per patched pass (64 MB in float32; the blocks' own
# intermediates take a few times that)


@dataclass
class Patching:
    """How much of the clean run's logit difference target - versus at the last position comes back when
    the corrupt run takes one activation from the clean run: (patched - corrupt) / (clean - corrupt)."""

    tokens: list[bytes]  # the clean text's
    compare_tokens: list[bytes]  # the corrupt text's, as long
    dropped: int  # tokens left out at the start of the clean text (it was longer than the context)
    target: int
    versus: int
    clean_diff: float  # the logit difference target - versus at the last position, clean run
    corrupt_diff: float
    residual: list[list[float]]  # (n_layer + 1) x time: row l patches the stream entering block l, the last
    # row the final residual stream (after the last block), one position per column
    heads: list[list[float]]  # n_layer x n_head: each head's output, at every position


def _unchanged(y: torch.Tensor) -> torch.Tensor:
    return y


def _every_layer(model: GPT, edits: dict[int, HeadEdit] | None = None) -> dict[int, HeadEdit]:
    # Every layer's projection edited in every run, as in ablate_heads, so all runs take the same kernels.
    return {layer: (edits or {}).get(layer, _unchanged) for layer in range(model.config.n_layer)}


def logit_direction(model: GPT, target: int, versus: int) -> torch.Tensor:
    """The output-head direction whose dot product with the normed final stream is logit target - versus."""
    weight = model.lm_head.weight.float()
    return weight[target] - weight[versus]


def _last_diff(model: GPT, final: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Logit difference at the last position, per row, from the final residual stream (batch, time, d_model).

    An elementwise product and a sum over d_model: each row's value does not depend on the batch's size."""
    return (model.norm(final[:, -1]).float() * direction).sum(dim=-1)


def logit_diffs_from(model: GPT, stream: torch.Tensor, first_layer: int, direction: torch.Tensor,
                     edits: dict[int, HeadEdit] | None = None) -> torch.Tensor:
    """The logit difference along `direction` at the last position, per row of `stream` (batch, time, d_model),
    the residual stream entering block `first_layer` (n_layer: the final stream), the blocks from there on
    run with the heads' outputs passed through `edits` (layer -> edit; the others unchanged)."""
    rope = model._rope(slice(0, stream.size(1)))
    with edited_heads(model, _every_layer(model, edits)):
        x = stream
        for block in model.blocks[first_layer:]:  # GPT.forward from block `first_layer` on
            x, _ = block(x, rope)
        return _last_diff(model, x, direction)


def _row_groups(rows: int, time: int, width: int) -> Iterator[slice]:
    per_pass = max(1, ACTIVATION_BUDGET // (time * width))
    for start in range(0, rows, per_pass):
        yield slice(start, min(rows, start + per_pass))


def _traced(model: GPT, ids: torch.Tensor) -> tuple[Trace, dict[int, torch.Tensor]]:
    """The run's trace and each layer's heads' outputs (time, heads, d_head)."""
    outputs: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> HeadEdit:
        def record(y: torch.Tensor) -> torch.Tensor:
            outputs[layer] = y[0].clone()
            return y
        return record

    with edited_heads(model, {layer: recorder(layer) for layer in range(model.config.n_layer)}):
        trace = model.trace(ids)
    return trace, outputs


@torch.inference_mode()
def patch_activations(model: GPT, tokenizer: Tokenizer, clean: str, corrupt: str, target: int | None = None,
                      versus: int | None = None) -> Patching:
    """Activation patching from the `clean` text's run into the `corrupt` text's (the same token length):
    each layer x position of the residual stream, then each head's output at every position; see Patching.

    `target` defaults to the clean run's predicted token at the last position, `versus` to the corrupt run's.
    """
    check_plain_forward(model, "activation patching")
    clean_list, dropped = encode_for_inspection(model, tokenizer, clean)
    corrupt_list, _ = encode_for_inspection(model, tokenizer, corrupt)
    if len(clean_list) != len(corrupt_list):
        raise InputError(f"patching needs texts of the same token length: the text is {len(clean_list)} tokens "
                         f"and the --compare text {len(corrupt_list)}")
    device = next(model.parameters()).device
    clean_ids = torch.tensor([clean_list], device=device)
    corrupt_ids = torch.tensor([corrupt_list], device=device)
    clean_trace, clean_heads = _traced(model, clean_ids)
    corrupt_trace, _ = _traced(model, corrupt_ids)
    if target is None:
        target = int(clean_trace.logits[0, -1].argmax().item())
    if versus is None:
        versus = int(corrupt_trace.logits[0, -1].argmax().item())
    if target == versus:
        token = tokenizer.decode([target])
        raise UsageError(f"the target and versus tokens are both {token!r} (by default the two texts' predictions "
                         "at the last position): give --target and --versus")
    direction = logit_direction(model, target, versus)
    clean_diff = _last_diff(model, clean_trace.hidden[-1], direction)[0].item()
    corrupt_diff = _last_diff(model, corrupt_trace.hidden[-1], direction)[0].item()
    if clean_diff == corrupt_diff:
        raise InputError(f"the two texts give the same logit difference ({clean_diff:.6g}): there is nothing "
                         "to recover")
    span = clean_diff - corrupt_diff

    def recovered(diffs: torch.Tensor) -> list[float]:
        return ((diffs.float().cpu() - corrupt_diff) / span).tolist()

    time, width = len(clean_list), model.config.d_model
    residual = []
    for layer in range(model.config.n_layer + 1):
        clean_stream, corrupt_stream = clean_trace.hidden[layer], corrupt_trace.hidden[layer]
        # Where the two streams are the same (every position before the first differing token), patching
        # changes nothing: 0 without a run.
        row = [0.0] * time
        differing = (clean_stream[0] != corrupt_stream[0]).any(dim=-1).nonzero().flatten()
        for rows in _row_groups(len(differing), time, width):  # each row takes one position from the clean run
            positions = differing[rows]
            chosen = torch.zeros(len(positions), time, 1, dtype=torch.bool, device=device)
            chosen[torch.arange(len(positions), device=device), positions] = True
            shares = recovered(logit_diffs_from(model, torch.where(chosen, clean_stream, corrupt_stream), layer,
                                                direction))
            for position, share in zip(positions.tolist(), shares, strict=True):
                row[position] = share
        residual.append(row)
    heads_table = []
    n_head = model.config.n_head
    for layer in range(model.config.n_layer):
        row = []
        for rows in _row_groups(n_head, time, width):  # row h takes head h's output from the clean run
            mask = torch.eye(n_head, dtype=torch.bool, device=device)[rows]
            edit = _patch_heads(mask, clean_heads[layer])
            stream = corrupt_trace.hidden[layer].expand(rows.stop - rows.start, -1, -1)
            row += recovered(logit_diffs_from(model, stream, layer, direction, {layer: edit}))
        heads_table.append(row)
    return Patching([tokenizer.token_bytes(i) for i in clean_list], [tokenizer.token_bytes(i) for i in corrupt_list],
                    dropped, target, versus, clean_diff, corrupt_diff, residual, heads_table)


def _patch_heads(mask: torch.Tensor, clean: torch.Tensor) -> HeadEdit:
    """An edit putting the clean run's outputs `clean` (time, heads, d_head) where `mask` (batch, heads) is True."""
    def edit(y: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[:, None, :, None], clean[None].to(y.dtype), y)
    return edit


# Tracking during training -------------------------------------------------------------------------

IN_CONTEXT_WINDOWS = 32  # validation windows the in-context score averages over (fewer in a short text)


def in_context_shift(context_length: int) -> tuple[int, int]:
    """(first, shift): the tokens n = first..T (T = context_length) scored late, with n tokens before them, and
    early, with n - shift; see the module docstring."""
    first = math.ceil(9 * context_length / 10)
    return first, first - math.ceil(context_length / 20)


def in_context_windows(ids: torch.Tensor, context_length: int, count: int = IN_CONTEXT_WINDOWS) -> torch.Tensor:
    """Up to `count` windows of context_length + 1 ids, (windows, context_length + 1), spread evenly over
    `ids` without overlapping; raises InputError when `ids` hold less than one."""
    window = context_length + 1
    if len(ids) < window:
        raise InputError(f"the in-context score needs a window of {window:,} validation tokens, and the validation "
                         f"text has {len(ids):,}; give more validation text or a shorter --context-length")
    count = max(1, min(count, len(ids) // window))
    stride = (len(ids) - window) // (count - 1) if count > 1 else 0
    return torch.stack([ids[i * stride:i * stride + window] for i in range(count)]).long()


def _late_losses(model: GPT, windows: torch.Tensor, scored: int) -> torch.Tensor:
    """Per-token losses (windows, scored) of each window's last `scored` targets, from the whole window."""
    logits, _ = model(windows[:, :-1], logits_from=windows.size(1) - 1 - scored)
    return F.cross_entropy(logits.float().transpose(1, 2), windows[:, -scored:], reduction="none")


@torch.inference_mode()
def in_context_score(model: GPT, windows: torch.Tensor, batch_size: int = 16) -> float:
    """The mean loss (nats) of the windows' last tokens predicted from the whole window, minus that of the same
    tokens predicted from the window's end only (see `in_context_shift`), the model in its current mode:
    windows (count, context_length + 1) ids, run `batch_size` at a time."""
    device = next(model.parameters()).device
    first, shift = in_context_shift(windows.size(1) - 1)
    scored = windows.size(1) - first  # tokens first..T
    late = early = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size].to(device)
        late += _late_losses(model, chunk, scored).double().sum().item()
        early += _late_losses(model, chunk[:, shift:], scored).double().sum().item()
    return (late - early) / (len(windows) * scored)


@dataclass
class HeadTracking:
    """What `lm train --track-heads` records at an evaluation."""

    previous_token: list[list[float]]  # per layer, per head: detect_heads's scores
    induction: list[list[float]]
    in_context: float  # nats, late minus early (negative: later tokens are predicted better)


def tracking_text(tokenizer: Tokenizer, val_ids: torch.Tensor, context_length: int) -> str:
    """The text the previous-token scores are measured on: the validation text's first context_length - 1
    tokens (`detect_heads` puts <|endoftext|> before it)."""
    return tokenizer.decode(val_ids[:context_length - 1].tolist())


def track_heads(model: GPT, tokenizer: Tokenizer, text: str, windows: torch.Tensor,
                batch_size: int = 16) -> HeadTracking:
    """Previous-token scores on `text`, induction scores (`detect_heads`), the in-context score on `windows`."""
    detectors = detect_heads(model, tokenizer, text)
    return HeadTracking(detectors.previous_token, detectors.induction, in_context_score(model, windows, batch_size))
