"""lm/heads.py against TransformerLens: `lm inspect-heads --format json` on a run, and TransformerLens on the
same run exported with `lm export`, give the same head detector scores, mean-ablation loss changes and direct
logit attribution (transformer-lens is a dev extra).

TransformerLens 4 removed HookedTransformer; its successor, TransformerBridge, wraps the transformers model
(here our export, loaded from its folder) with TransformerLens's hooks, cache and analysis functions.
`enable_compatibility_mode` gives HookedTransformer's hook names and its weight processing. Two of its
default steps are left off, because they change what is compared on purpose:
- center_unembed subtracts the mean output row from every row: every logit of a position moves by the same
  amount, so a difference of two logits stays but one token's logit, and its parts, change. lm attributes
  the logit itself.
- fold_value_biases moves each head's value bias out of its output into the attention's output bias; lm
  keeps it in the head's output (a head's output is what it adds, bias included).
The others stay, and change nothing compared here (these tests show it): fold_ln folds each norm's weight
(and bias) into the layer that reads the norm (the final norm's into the unembedding, which lm applies
itself), and center_writing_weights makes what every layer writes to the residual stream mean-free, which
LayerNorm and apply_ln_to_stack do anyway (TransformerLens skips it before RMSNorm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_lm, write_run

from lm.checkpoint import load_run
from lm.config import ModelConfig
from lm.inspect import encode_for_inspection, repeated_random_ids

pytest.importorskip("transformer_lens")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; nothing may be downloaded

from huggingface_hub import dataclasses as hub_dataclasses
from transformer_lens.head_detector import detect_head
from transformer_lens.model_bridge import TransformerBridge

# Importing TransformerLens loosens huggingface_hub's config checks for the whole process (an int is then
# accepted where a float is declared: transformer_lens.utilities.hf_utils.enable_hf_numeric_tower). Put the
# strict check back, so that our exports load here, and in tests/test_hf.py after this module, as they do in
# transformers alone.
if getattr(hub_dataclasses._validate_simple_type, "__module__", "").startswith("transformer_lens"):
    hub_dataclasses._validate_simple_type = hub_dataclasses._validate_simple_type.__wrapped__

TOLERANCE = 1e-4
# Repeated words (the, third, by the), so duplicate-token heads have something to find; 66 tokens with
# <|endoftext|>, under the context (detect_head refuses a sequence as long as the context).
TEXT = ("MARGERY.\nSet the ladder there, against the third post. No, the third. Count them, child:\n"
        "one by the baker's, two by the well, three by the door with the blue knocker.\n")
# The exported families: GPT-2 (learned positions, LayerNorm, biases), Llama (RoPE, RMSNorm, no biases) and
# Qwen3 (Llama's with QK-norm, the tiny and small presets').
SHAPES = {
    "gpt2": {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
    "qwen3": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True},
}
# Weights of std 0.5 rather than write_run's 0.2, whose attention is nearly uniform: every head then scores
# about the same and ablating one moves the loss by ~1e-3, too close to the tolerance to tell a wrong
# definition from a right one.
WEIGHT_SCALE = 0.5


class Crosscheck:
    """One run, what `lm inspect-heads --format json` says of TEXT, and TransformerLens on its export."""

    def __init__(self, run: Path, export: Path) -> None:
        result = run_lm("inspect-heads", run, "--text", TEXT, "--format", "json")
        assert result.returncode == 0, result.stderr
        self.ours = json.loads(result.stdout)
        self.model, self.tokenizer, _ = load_run(run)
        self.ids = encode_for_inspection(self.model, self.tokenizer, TEXT)[0]
        self.bridge = TransformerBridge.boot_transformers(str(export), device="cpu")
        # TransformerLens's default processing (fold_ln, center_writing_weights) but for the two steps that
        # change what is compared on purpose (the module docstring).
        self.bridge.enable_compatibility_mode(center_unembed=False, fold_value_biases=False, disable_warnings=True)
        # TransformerLens prepends no BOS for the Qwen family (Qwen has none); lm starts every text it inspects
        # with <|endoftext|>, as in training, and so must TransformerLens's own tokenizing in detect_head.
        self.bridge.cfg.default_prepend_bos = True
        self.tokens = self.bridge.to_tokens(TEXT)


@pytest.fixture(scope="module", params=list(SHAPES))
def crosscheck(request, tmp_path_factory, sample_tokenizer) -> Crosscheck:
    folder = tmp_path_factory.mktemp(request.param)
    config = ModelConfig(vocab_size=sample_tokenizer.vocab_size, context_length=96, n_layer=2, n_head=4, d_model=32,
                         **SHAPES[request.param])
    run = write_run(folder / "run", sample_tokenizer, config, scale=WEIGHT_SCALE)
    result = run_lm("export", run, "--out", folder / "hf")
    assert result.returncode == 0, result.stderr
    return Crosscheck(run, folder / "hf")


def assert_matches(ours, theirs, what: str) -> None:
    """Equal to TOLERANCE, and spread wider than it: a constant, or the heads in another order, would fail."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    difference = (ours - theirs).abs().max().item()
    assert difference <= TOLERANCE, f"{what}: lm and TransformerLens differ by {difference:.3g}\n{ours}\n{theirs}"
    assert (theirs.max() - theirs.min()).item() > 5 * TOLERANCE, f"{what}: too uniform to tell anything: {theirs}"


def test_transformer_lens_reads_the_text_as_lm_does(crosscheck: Crosscheck) -> None:
    assert crosscheck.tokens[0].tolist() == crosscheck.ids
    assert len(crosscheck.ours["tokens"]) == len(crosscheck.ids) < crosscheck.bridge.cfg.n_ctx


class GivenTokens:
    """What detect_head asks of a model (cfg, to_tokens, run_with_cache), with `ids` as the tokens of any
    string: it tokenizes the string it is given, and random token ids do not survive decode -> encode."""

    def __init__(self, bridge: TransformerBridge, ids: list[int]) -> None:
        self.cfg, self.run_with_cache = bridge.cfg, bridge.run_with_cache
        self.tokens = torch.tensor([ids])

    def to_tokens(self, seq: str) -> torch.Tensor:
        return self.tokens


@torch.no_grad()
def test_detector_scores_match_transformer_lens(crosscheck: Crosscheck) -> None:
    """detect_head with its defaults ("mul", nothing excluded). Previous- and duplicate-token on TEXT, which
    TransformerLens tokenizes itself; induction, as in TransformerLens's and ARENA's exercises, on random tokens
    repeated twice: lm's sequence (<|endoftext|>, then the seed's tokens twice) is given to detect_head as its
    tokens."""
    detectors = crosscheck.ours["detectors"]
    for name in ("previous_token", "duplicate_token"):
        assert_matches(detectors[name], detect_head(crosscheck.bridge, TEXT, f"{name}_head"), name)
    repeated, length = repeated_random_ids(crosscheck.model, crosscheck.tokenizer, detectors["induction_seed"])
    assert length == detectors["induction_length"]
    induction = detect_head(GivenTokens(crosscheck.bridge, repeated), "(lm's induction sequence)", "induction_head")
    assert_matches(detectors["induction"], induction, "induction")


@torch.no_grad()
def test_mean_ablation_loss_changes_match_transformer_lens(crosscheck: Crosscheck) -> None:
    """Each head's output (hook_z: its d_head slice before the output projection) replaced by its mean over
    the text's positions in the clean run; the change in TransformerLens's loss per predicted token, mean and
    at the tokens lm lists as helped most."""
    bridge, tokens = crosscheck.bridge, crosscheck.tokens
    clean = bridge(tokens, return_type="loss", loss_per_token=True)[0]
    _, cache = bridge.run_with_cache(tokens)
    changes, per_token = [], {}
    for layer in range(bridge.cfg.n_layers):
        mean = cache[f"blocks.{layer}.attn.hook_z"][0].mean(dim=0)  # (heads, d_head)
        row = []
        for head in range(bridge.cfg.n_heads):
            def ablate(z: torch.Tensor, hook, head: int = head, mean: torch.Tensor = mean) -> torch.Tensor:
                z = z.clone()
                z[:, :, head] = mean[head]
                return z

            losses = bridge.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                           fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])[0]
            per_token[layer, head] = losses - clean
            row.append(per_token[layer, head].mean().item())
        changes.append(row)
    assert crosscheck.ours["ablation_mode"] == "mean"
    assert_matches(crosscheck.ours["ablation"], changes, "mean-ablation loss change")
    for head in crosscheck.ours["top_heads"]:
        increases = per_token[head["layer"], head["head"]]
        for token in head["helped"]:  # the loss at `position` is that of predicting it, from position - 1
            assert token["increase_nats"] == pytest.approx(increases[token["position"] - 1].item(), abs=TOLERANCE)


@torch.no_grad()
def test_direct_logit_attribution_matches_transformer_lens(crosscheck: Crosscheck) -> None:
    """The final residual stream at the last position split into parts (TransformerLens's
    get_full_resid_decomposition: embeddings, each head, as stack_head_results gives it, each MLP, the
    attention biases together), through apply_ln_to_stack (the final norm's scale frozen at the full stream's),
    dotted with the predicted token's unembedding column, which fold_ln has multiplied by the final norm's
    weight; fold_ln moved the final norm's bias into the unembedding bias, lm's "final norm bias" part."""
    bridge, attribution = crosscheck.bridge, crosscheck.ours["attribution"]
    position, target = attribution["position"], attribution["target"]
    assert position == len(crosscheck.ids) - 1
    logits, cache = bridge.run_with_cache(crosscheck.tokens)
    assert logits[0, position].argmax().item() == target  # lm's default target: the predicted token
    assert attribution["logit"] == pytest.approx(logits[0, position, target].item(), abs=TOLERANCE)
    stack, labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=position, expand_neurons=False,
                                                        apply_ln=False, return_labels=True)
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=position)  # (parts, batch, d_model)
    contributions = (normed[:, 0] @ bridge.W_U[:, target]).tolist()
    theirs = {lm_part_name(label): value for label, value in zip(labels, contributions, strict=True)}
    theirs["final norm bias"] = bridge.b_U[target].item()
    ours = {"attention biases": 0.0, "final norm bias": 0.0}  # absent where the model has no biases
    for part in attribution["parts"]:
        name = "attention biases" if part["name"].endswith("attention bias") else part["name"]
        ours[name] = ours.get(name, 0.0) + part["contribution"]
    assert sorted(ours) == sorted(theirs)
    names = sorted(theirs)
    assert_matches([ours[name] for name in names], [theirs[name] for name in names], "direct logit attribution")


def lm_part_name(label: str) -> str:
    """TransformerLens's label of a residual-stream part ('L1H3', '0_mlp_out', 'embed', 'pos_embed', 'bias')
    as lm names it ('L1.H3', 'L0 MLP', ...); 'bias' is every attention's output bias together."""
    if label.endswith("_mlp_out"):
        return f"L{label.removesuffix('_mlp_out')} MLP"
    if label.startswith("L") and "H" in label:
        return label.replace("H", ".H")
    return {"embed": "token embedding", "pos_embed": "position embedding", "bias": "attention biases"}[label]
