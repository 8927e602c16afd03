from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE, random_weights

from lm.config import ModelConfig
from lm.heads import (
    ablate_heads,
    ablated_losses,
    attribute_logit,
    detector_scores,
    duplicate_token_pattern,
    edited_heads,
    head_means,
    induction_pattern,
    parse_heads,
    previous_token_pattern,
    replace_heads,
)
from lm.inspect import encode_for_inspection
from lm.model import GPT

TEXT = SAMPLE.read_text(encoding="utf-8")[:300]


def tiny_model(vocab: int, pos_encoding: str = "learned", norm: str = "layernorm", bias: bool = True,
               mlp: str = "gelu") -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, context_length=64, n_layer=2, n_head=4, d_model=32,
                            pos_encoding=pos_encoding, norm=norm, bias=bias, mlp=mlp)).eval()
    random_weights(model, seed=1)
    return model


def text_ids(model: GPT, tokenizer) -> torch.Tensor:
    ids, _ = encode_for_inspection(model, tokenizer, TEXT)
    return torch.tensor([ids])


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablating_every_head_of_a_layer_removes_its_attention_output(sample_tokenizer, layer: int) -> None:
    # Without biases: the output projection's bias stays when every head is zeroed, and is part of the
    # attention output that removing the layer's attention drops.
    model = tiny_model(sample_tokenizer.vocab_size, bias=False)
    ids = text_ids(model, sample_tokenizer)
    everything = torch.ones(1, model.config.n_head, dtype=torch.bool)
    zeros = {layer: torch.zeros(model.config.n_head, model.config.d_head)}
    with torch.no_grad():
        ablated = ablated_losses(model, ids, {layer: everything}, zeros)
        # The layer's attention output removed: the block adds nothing from attention.
        handle = model.blocks[layer].attn.register_forward_hook(
            lambda module, args, output: (torch.zeros_like(output[0]), output[1]))
        try:
            logits, _ = model(ids)
        finally:
            handle.remove()
    removed = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(ablated[0], removed, rtol=1e-5, atol=1e-5)


def test_no_head_ablated_is_the_plain_loss(sample_tokenizer) -> None:
    model = tiny_model(sample_tokenizer.vocab_size)
    ids = text_ids(model, sample_tokenizer)
    none = torch.zeros(1, model.config.n_head, dtype=torch.bool)
    with torch.no_grad():
        losses = ablated_losses(model, ids, {0: none, 1: none},
                                {layer: torch.ones(model.config.n_head, model.config.d_head) for layer in (0, 1)})
        logits, _ = model(ids)
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(losses.mean(), plain, rtol=1e-5, atol=1e-6)


def test_the_edit_hook_leaves_the_model_as_it_was(sample_tokenizer) -> None:
    model = tiny_model(sample_tokenizer.vocab_size)
    ids = text_ids(model, sample_tokenizer)
    with torch.no_grad():
        before, _ = model(ids)
        with edited_heads(model, {0: lambda y: y * 0}):
            edited, _ = model(ids)
        after, _ = model(ids)
    assert not torch.allclose(before, edited)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(not block.attn.proj._forward_pre_hooks for block in model.blocks)


def test_a_batch_of_single_head_ablations_matches_one_at_a_time(sample_tokenizer) -> None:
    model = tiny_model(sample_tokenizer.vocab_size)
    ids = text_ids(model, sample_tokenizer)
    result = ablate_heads(model, sample_tokenizer, TEXT, mode="mean", joint=[(1, 2)])
    with torch.no_grad():
        means = head_means(model, ids)
        mask = torch.zeros(1, 4, dtype=torch.bool)
        mask[0, 2] = True
        alone = ablated_losses(model, ids, {1: mask}, means)[0]
        clean = ablated_losses(model, ids, {1: torch.zeros_like(mask)}, means)[0]
    assert result.heads[1][2].nats == pytest.approx((alone - clean).mean().item(), abs=1e-5)
    assert result.joint is not None and result.joint.nats == pytest.approx(result.heads[1][2].nats, abs=1e-5)
    assert result.loss == pytest.approx(clean.mean().item(), abs=1e-5)
    assert len(result.heads) == 2 and all(len(layer) == 4 for layer in result.heads)
    for head in (h for layer in result.heads for h in layer):
        assert all(effect.increase > 0 for effect in head.helped)
        assert all(1 <= effect.position < len(result.ids) for effect in head.helped)


def test_replace_heads_touches_only_the_masked_heads() -> None:
    y = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)  # (batch, time, heads, d_head)
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]])
    replacement = torch.full((4, 2), -1.0)
    edited = replace_heads(mask, replacement)(y)
    assert (edited[0, :, 0] == -1).all() and (edited[1, :, 3] == -1).all()
    assert torch.equal(edited[0, :, 1:], y[0, :, 1:]) and torch.equal(edited[1, :, :3], y[1, :, :3])


def test_parse_heads(sample_tokenizer) -> None:
    from lm.errors import UsageError

    model = tiny_model(sample_tokenizer.vocab_size)
    assert parse_heads("1.3, 0.0", model) == [(1, 3), (0, 0)]
    for bad in ("1", "1.x", "2.0", "0.4", ""):
        with pytest.raises(UsageError):
            parse_heads(bad, model)


# Detectors ----------------------------------------------------------------------------------------


def test_detector_patterns_follow_transformer_lens() -> None:
    ids = [0, 5, 6, 5, 6]
    assert previous_token_pattern(4).tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    duplicate = duplicate_token_pattern(ids)
    assert duplicate.nonzero().tolist() == [[3, 1], [4, 2]]  # the token itself does not count
    assert induction_pattern(ids).nonzero().tolist() == [[3, 2], [4, 3]]  # the key after the earlier copy


def test_detector_scores_on_a_hand_built_pattern() -> None:
    ids = [0, 5, 6, 5, 6]
    time = len(ids)
    previous = torch.eye(time).roll(-1, dims=1).tril(-1)
    previous[0, 0] = 1.0  # row 0 can only look at itself
    uniform = torch.ones(time, time).tril()
    uniform = uniform / uniform.sum(dim=-1, keepdim=True)
    weights = torch.stack([previous, uniform])
    # Definition: sum(attention x pattern) / sum(attention), where sum(attention) = rows = 5.
    scores = detector_scores(weights, previous_token_pattern(time))
    assert scores.tolist() == pytest.approx([4 / 5, (1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5])
    assert detector_scores(weights, duplicate_token_pattern(ids)).tolist() == pytest.approx(
        [0.0, (1 / 4 + 1 / 5) / 5])
    # The previous-token head attends to key 2 from query 3 and key 3 from query 4: both are induction targets.
    assert detector_scores(weights, induction_pattern(ids)).tolist() == pytest.approx([2 / 5, (1 / 4 + 1 / 5) / 5])


def test_detect_heads_shapes(sample_tokenizer) -> None:
    from lm.heads import detect_heads

    model = tiny_model(sample_tokenizer.vocab_size)
    found = detect_heads(model, sample_tokenizer, TEXT)
    for scores in (found.previous_token, found.duplicate_token, found.induction):
        assert len(scores) == 2 and all(len(layer) == 4 for layer in scores)
        assert all(0 <= value <= 1 + 1e-6 for layer in scores for value in layer)
    assert found.induction_length == 31 and found.induction_seed == 0  # (64 - 1) // 2 in a 64-token context
    assert 31 / 63 <= found.induction_perfect < 1  # at least the second copy's 31 queries of 63 have a target


def test_a_head_on_the_pattern_scores_the_perfect_score() -> None:
    from lm.heads import detector_scores, induction_pattern, perfect_score

    ids = [7, 3, 9, 4, 3, 9, 4]  # 3 9 4 twice: queries 4-6 have a target, so do none of 0-3
    pattern = induction_pattern(ids)
    assert perfect_score(pattern) == pytest.approx(3 / 7)
    rows = pattern.sum(dim=-1, keepdim=True)
    on_key_0 = torch.zeros(7, 7)
    on_key_0[:, 0] = 1
    on_pattern = torch.where(rows > 0, pattern / rows.clamp(min=1), on_key_0)  # rows without a target: key 0
    assert detector_scores(on_pattern[None], pattern).item() == pytest.approx(perfect_score(pattern))


# Direct logit attribution -------------------------------------------------------------------------


@pytest.mark.parametrize(("pos_encoding", "norm", "bias", "mlp"), [
    ("learned", "layernorm", True, "gelu"), ("rope", "rmsnorm", False, "gelu"),
    ("sinusoidal", "layernorm", False, "gelu"), ("rope", "layernorm", True, "none")])
def test_attribution_sums_to_the_logit(sample_tokenizer, pos_encoding: str, norm: str, bias: bool, mlp: str) -> None:
    model = tiny_model(sample_tokenizer.vocab_size, pos_encoding, norm, bias, mlp)
    ids = text_ids(model, sample_tokenizer)
    with torch.no_grad():
        logits, _ = model(ids)
    for position, target, versus in ((None, None, None), (5, 7, None), (-2, 100, 200)):
        result = attribute_logit(model, sample_tokenizer, TEXT, position, target, versus)
        where = result.position
        expected = logits[0, where, result.target] - (logits[0, where, versus] if versus is not None else 0)
        total = sum(part.contribution for part in result.parts)
        assert total == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
        assert result.logit == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
    predicted = attribute_logit(model, sample_tokenizer, TEXT)
    assert predicted.target == int(logits[0, -1].argmax())
    names = [part.name for part in predicted.parts]
    assert names[0] == "token embedding" and ("position embedding" in names) == (pos_encoding != "rope")
    assert sum(name.startswith("L1.H") for name in names) == 4 and ("L1 MLP" in names) == (mlp != "none")


# Activation patching ------------------------------------------------------------------------------

CLEAN = "But soft, what light through yonder window breaks? It is the east, and it is the"
CORRUPT = CLEAN.replace("and it is", "and he is")


def differing_positions(model: GPT, tokenizer) -> list[int]:
    clean, _ = encode_for_inspection(model, tokenizer, CLEAN)
    corrupt, _ = encode_for_inspection(model, tokenizer, CORRUPT)
    assert len(clean) == len(corrupt)
    return [p for p, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b]


def contrast(model: GPT, tokenizer) -> tuple[int, int]:
    """The target and versus tokens whose logit difference the two texts change most (a random model
    predicts the same token after both)."""
    with torch.no_grad():
        last = [model(torch.tensor([encode_for_inspection(model, tokenizer, text)[0]]))[0][0, -1]
                for text in (CLEAN, CORRUPT)]
    change = last[0] - last[1]
    return int(change.argmax()), int(change.argmin())


def patching_runs(model: GPT, tokenizer, target: int, versus: int):
    from lm.heads import _last_diff, _traced, logit_direction

    ids = [torch.tensor([encode_for_inspection(model, tokenizer, text)[0]]) for text in (CLEAN, CORRUPT)]
    direction = logit_direction(model, target, versus)
    with torch.inference_mode():
        (clean, _), (corrupt, _) = _traced(model, ids[0]), _traced(model, ids[1])
        diffs = [_last_diff(model, trace.hidden[-1], direction)[0].item() for trace in (clean, corrupt)]
    return clean, corrupt, direction, *diffs


@pytest.mark.parametrize(("pos_encoding", "norm", "bias"), [("learned", "layernorm", True), ("rope", "rmsnorm", False)])
def test_patching_a_whole_layer_of_the_residual_stream_recovers_the_clean_difference(
        sample_tokenizer, pos_encoding: str, norm: str, bias: bool) -> None:
    from lm.heads import logit_diffs_from, patch_activations

    model = tiny_model(sample_tokenizer.vocab_size, pos_encoding, norm, bias)
    result = patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, *contrast(model, sample_tokenizer))
    clean, corrupt, direction, clean_diff, corrupt_diff = patching_runs(model, sample_tokenizer, result.target,
                                                                        result.versus)
    assert (clean_diff, corrupt_diff) == pytest.approx((result.clean_diff, result.corrupt_diff), abs=1e-6)
    assert abs(clean_diff - corrupt_diff) > 1e-3
    with torch.inference_mode():
        for layer in range(model.config.n_layer + 1):  # the input of each block, then the final stream
            # Every position patched at once: everything downstream is the clean run.
            patched = logit_diffs_from(model, clean.hidden[layer], layer, direction)[0].item()
            assert (patched - corrupt_diff) / (clean_diff - corrupt_diff) == pytest.approx(1.0, abs=1e-5)
            unpatched = logit_diffs_from(model, corrupt.hidden[layer], layer, direction)[0].item()
            assert (unpatched - corrupt_diff) / (clean_diff - corrupt_diff) == pytest.approx(0.0, abs=1e-5)


def test_patching_the_one_differing_token_at_layer_0_recovers_everything(sample_tokenizer) -> None:
    from lm.heads import patch_activations

    model = tiny_model(sample_tokenizer.vocab_size)
    (differing,) = differing_positions(model, sample_tokenizer)
    result = patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, *contrast(model, sample_tokenizer))
    time = len(result.tokens)
    assert len(result.residual) == 3 and all(len(row) == time for row in result.residual)
    assert len(result.heads) == 2 and all(len(row) == 4 for row in result.heads)
    assert result.residual[0][differing] == pytest.approx(1.0, abs=1e-5)
    # The other positions hold the same token in both texts: patching them changes nothing.
    assert [v for p, v in enumerate(result.residual[0]) if p != differing] == pytest.approx([0.0] * (time - 1),
                                                                                            abs=1e-5)
    # The final stream reaches the logits only at its own position.
    assert result.residual[-1] == pytest.approx([0.0] * (time - 1) + [1.0], abs=1e-5)
    # Before the differing token nothing differs at any layer.
    assert all(row[p] == pytest.approx(0.0, abs=1e-5) for row in result.residual for p in range(differing))


def test_patching_no_head_recovers_nothing(sample_tokenizer) -> None:
    from lm.heads import _patch_heads, _traced, logit_diffs_from, patch_activations

    model = tiny_model(sample_tokenizer.vocab_size)
    d_head = model.config.d_head
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 2 * d_head:3 * d_head] = 0  # head 1.2 reaches nothing
    result = patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, *contrast(model, sample_tokenizer))
    assert result.heads[1][2] == pytest.approx(0.0, abs=1e-5)
    _, corrupt, direction, clean_diff, corrupt_diff = patching_runs(model, sample_tokenizer, result.target,
                                                                    result.versus)
    ids = torch.tensor([encode_for_inspection(model, sample_tokenizer, CLEAN)[0]])
    with torch.inference_mode():
        _, clean_heads = _traced(model, ids)
        none = torch.zeros(1, 4, dtype=torch.bool)
        for layer in (0, 1):
            nothing = logit_diffs_from(model, corrupt.hidden[layer], layer, direction,
                                       {layer: _patch_heads(none, clean_heads[layer])})[0].item()
            assert (nothing - corrupt_diff) / (clean_diff - corrupt_diff) == pytest.approx(0.0, abs=1e-5)
        # One head patched alone, in a run of its own, is the table's entry.
        one = torch.zeros(1, 4, dtype=torch.bool)
        one[0, 3] = True
        alone = logit_diffs_from(model, corrupt.hidden[0], 0, direction, {0: _patch_heads(one, clean_heads[0])})
    assert (alone[0].item() - corrupt_diff) / (clean_diff - corrupt_diff) == pytest.approx(result.heads[0][3],
                                                                                          abs=1e-5)


def test_patching_splits_its_passes_without_changing_anything(sample_tokenizer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lm.heads

    model = tiny_model(sample_tokenizer.vocab_size)
    whole = lm.heads.patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, *contrast(model, sample_tokenizer))
    monkeypatch.setattr(lm.heads, "ACTIVATION_BUDGET", 1)  # one row per pass
    split = lm.heads.patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, *contrast(model, sample_tokenizer))
    for a, b in ((whole.residual, split.residual), (whole.heads, split.heads)):
        assert [v for row in a for v in row] == pytest.approx([v for row in b for v in row], abs=1e-5)


def test_patching_texts_of_different_lengths_is_an_input_error(sample_tokenizer) -> None:
    from lm.errors import InputError, UsageError
    from lm.heads import patch_activations

    model = tiny_model(sample_tokenizer.vocab_size)
    clean = len(encode_for_inspection(model, sample_tokenizer, CLEAN)[0])
    corrupt = len(encode_for_inspection(model, sample_tokenizer, CLEAN + " and more")[0])
    with pytest.raises(InputError, match=f"the text is {clean} tokens and the --compare text {corrupt}"):
        patch_activations(model, sample_tokenizer, CLEAN, CLEAN + " and more")
    with pytest.raises(UsageError, match="give --target and --versus"):
        patch_activations(model, sample_tokenizer, CLEAN, CORRUPT, target=5, versus=5)
    # By default the two runs' predictions, which this random model makes the same.
    with pytest.raises(UsageError, match="the two texts' predictions at the last position"):
        patch_activations(model, sample_tokenizer, CLEAN, CORRUPT)


# The command --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory: pytest.TempPathFactory, sample_tokenizer):
    from conftest import write_run

    config = ModelConfig(vocab_size=sample_tokenizer.vocab_size, context_length=64, n_layer=2, n_head=4, d_model=32)
    return write_run(tmp_path_factory.mktemp("heads") / "run", sample_tokenizer, config)


def test_cli_table_shows_ablation_detectors_and_attribution(heads_run) -> None:
    from conftest import run_lm

    result = run_lm("inspect-heads", heads_run, "--text", TEXT, "--ablate", "1.3,0.0", "--top", "3",
                    env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "each head mean-ablated" in out and "L1.H3 + L0.H0 ablated together" in out
    assert "previous-token score" in out
    assert "induction score (31 random tokens twice, seed 0; a perfect head: 0." in out
    assert "direct logit attribution" in out and "token embedding" in out
    assert max(len(line) for line in out.splitlines()) <= 80  # nothing wrapped


def test_cli_ablates_the_best_induction_head(heads_run) -> None:
    import json

    from conftest import run_lm

    result = run_lm("inspect-heads", heads_run, "--text", TEXT, "--ablate", "induction", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    scores = data["detectors"]["induction"]
    best = max((score, layer, head) for layer, row in enumerate(scores) for head, score in enumerate(row))
    assert data["joint"]["heads"] == [[best[1], best[2]]]
    assert data["joint"]["nats"] == pytest.approx(data["ablation"][best[1]][best[2]], abs=1e-6)  # it alone
    table = run_lm("inspect-heads", heads_run, "--text", TEXT, "--ablate", "induction", env={"COLUMNS": "80"})
    assert f"L{best[1]}.H{best[2]} ablated: " in table.stdout


def test_cli_json_holds_the_ablation_table_and_the_parts(heads_run) -> None:
    import json

    from conftest import run_lm

    result = run_lm("inspect-heads", heads_run, "--text", TEXT, "--format", "json", "--ablation", "zero",
                    "--target", "the", "--position", "-3")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ablation_mode"] == "zero"
    assert len(data["ablation"]) == 2 and all(len(layer) == 4 for layer in data["ablation"])
    assert all(isinstance(value, float) for layer in data["ablation"] for value in layer)
    assert set(data["detectors"]) >= {"previous_token", "duplicate_token", "induction", "induction_length"}
    attribution = data["attribution"]
    assert attribution["position"] == len(data["tokens"]) - 3
    assert sum(part["contribution"] for part in attribution["parts"]) == pytest.approx(attribution["logit"], abs=1e-4)
    assert data["joint"] is None and len(data["top_heads"]) == 5


def test_cli_csv_has_a_row_per_head(heads_run) -> None:
    import csv
    import io

    from conftest import run_lm

    result = run_lm("inspect-heads", heads_run, "--text", TEXT, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    every_head = {(str(layer), str(head)) for layer in range(2) for head in range(4)}
    assert len(rows) == 8 and {(row["layer"], row["head"]) for row in rows} == every_head
    assert {"loss_change_nats", "induction", "direct_logit"} <= set(rows[0])


def test_cli_compare_adds_the_patching_tables_and_json(heads_run) -> None:
    import json

    from conftest import run_lm

    args = ["inspect-heads", heads_run, "--text", CLEAN, "--compare", CORRUPT, "--target", "the", "--versus", "a"]
    table = run_lm(*args, env={"COLUMNS": "80"})
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "activation patching: logit ' the' - ' a' at the last position" in out
    assert "layer x position" in out and "each head's output" in out
    assert "·he" in out  # the --compare token under the clean one where they differ
    assert max(len(line) for line in out.splitlines()) <= 80
    data = json.loads(run_lm(*args, "--format", "json").stdout)
    patching = data["patching"]
    assert set(patching) >= {"residual", "heads", "target", "versus", "clean_diff", "corrupt_diff"}
    assert len(patching["residual"]) == 3 and all(len(row) == len(data["tokens"]) for row in patching["residual"])
    assert len(patching["heads"]) == 2 and all(len(row) == 4 for row in patching["heads"])
    assert patching["residual"][-1][-1] == pytest.approx(1.0, abs=1e-5)
    plain = run_lm("inspect-heads", heads_run, "--text", CLEAN, "--format", "json")
    assert json.loads(plain.stdout)["patching"] is None


@pytest.mark.parametrize(("args", "needle"), [
    (["--ablate", "1.9"], "head 9 does not exist"),
    (["--ablate", "one"], "LAYER.HEAD"),
    (["--ablation", "half"], "--ablation 'half'"),
    (["--position", "999"], "--position 999"),
    (["--compare", "a different length"], "the same token length"),
])
def test_cli_bad_options_are_one_line_errors(heads_run, args: list[str], needle: str) -> None:
    from conftest import assert_one_line_error, run_lm

    assert_one_line_error(run_lm("inspect-heads", heads_run, "--text", TEXT, *args), needle)


def test_a_head_the_projection_ignores_changes_nothing(sample_tokenizer) -> None:
    """Its ablation's change is 0 (to rounding: the batched ablation passes may pick other matrix kernels
    than the clean run, lm/linear.py; the edited output projections run the same one in both)."""
    model = tiny_model(sample_tokenizer.vocab_size)
    d_head = model.config.d_head
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 2 * d_head:3 * d_head] = 0
    result = ablate_heads(model, sample_tokenizer, TEXT, mode="zero")
    assert result.heads[1][2].nats == pytest.approx(0.0, abs=1e-6)
    assert result.heads[1][1].nats != 0.0


def test_ablation_passes_split_to_fit_the_logit_budget(sample_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm.heads

    model = tiny_model(sample_tokenizer.vocab_size)
    whole = ablate_heads(model, sample_tokenizer, TEXT)
    monkeypatch.setattr(lm.heads, "LOGIT_BUDGET", 1)  # one row per pass
    split = ablate_heads(model, sample_tokenizer, TEXT)
    assert [h.nats for layer in split.heads for h in layer] == pytest.approx(
        [h.nats for layer in whole.heads for h in layer], abs=1e-6)
