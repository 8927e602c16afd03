"""GGUF export, checked with llama.cpp's own reader (the gguf package, a dev extra); no llama.cpp build needed.

bench/llama_cpp.py runs the files in llama.cpp itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_lm, write_run
from safetensors.torch import load_file

from lm import rundir
from lm.checkpoint import model_state_dict
from lm.config import ModelConfig
from lm.errors import InputError, UsageError
from lm.gguf import export_gguf, interleave_rope_rows, pre_tokenizer_name, split_rope_rows
from lm.model import GPT, apply_rope, rope_tables

gguf = pytest.importorskip("gguf")

GPT2_SHAPE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
# Untied, so that output.weight is written too.
LLAMA_SHAPE = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False}
QWEN3_SHAPE = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True}
SHAPES = {"gpt2": GPT2_SHAPE, "llama": LLAMA_SHAPE, "qwen3": QWEN3_SHAPE}
# Every linear row a multiple of Q8_0's block of 32 values.
SIZE = {"context_length": 96, "n_layer": 2, "n_head": 4, "d_model": 64}


def make_run(path: Path, tokenizer, **fields) -> Path:
    return write_run(path, tokenizer, ModelConfig(vocab_size=tokenizer.vocab_size, **{**SIZE, **fields}))


@pytest.fixture(scope="module", params=list(SHAPES))
def run(request, tmp_path_factory, sample_tokenizer) -> tuple[Path, str]:
    return make_run(tmp_path_factory.mktemp(request.param) / "run", sample_tokenizer, **SHAPES[request.param]), \
        request.param


def read_fields(reader) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items()}


def lm_tensors(reader, kind: str, n_head: int) -> dict[str, torch.Tensor]:
    """The GGUF's tensors back under lm's names and in lm's layout (float32): the inverse of the export."""
    blocks = {"attn_norm": "norm1", "attn_output": "attn.proj", "ffn_norm": "norm2", "ffn_up": "mlp.fc",
              "ffn_down": "mlp.proj", "ffn_gate": "mlp.gate", "attn_qkv": "attn.qkv", "attn_q_norm": "attn.q_norm",
              "attn_k_norm": "attn.k_norm"}
    top = {"token_embd": "tok_emb", "position_embd": "pos_emb", "output_norm": "norm", "output": "lm_head"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                           dtype=np.float32))
        base, suffix = tensor.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, layer, part = base.split(".")
            if part in ("attn_q", "attn_k", "attn_v"):
                if part != "attn_v" and kind == "llama":  # qwen3 rotates lm's pairs: no rows moved
                    values = split_rope_rows(values, n_head)
                qkv.setdefault(layer, {})[part] = values
                continue
            out[f"blocks.{layer}.{blocks[part]}.{suffix}"] = values
        else:
            out[f"{top[base]}.{suffix}"] = values
    for layer, parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts["attn_q"], parts["attn_k"], parts["attn_v"]])
    return out


def test_gguf_reads_back_with_every_tensor_and_the_metadata(run, tmp_path: Path, sample_tokenizer) -> None:
    run_dir, kind = run
    out = tmp_path / "model.gguf"
    result = run_lm("export", run_dir, "--format", "gguf", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"llama.cpp {kind}" in result.stdout
    reader = gguf.GGUFReader(out)
    fields = read_fields(reader)
    config = rundir.read_config(run_dir).model
    expected = {
        "general.architecture": kind, "general.file_type": 0,
        f"{kind}.context_length": 96, f"{kind}.embedding_length": 64, f"{kind}.block_count": 2,
        f"{kind}.feed_forward_length": config.d_ff, f"{kind}.attention.head_count": 4,
        f"{kind}.attention.head_count_kv": 4, f"{kind}.vocab_size": sample_tokenizer.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "dbrx",
        "tokenizer.ggml.bos_token_id": sample_tokenizer.eot_id, "tokenizer.ggml.eos_token_id": sample_tokenizer.eot_id,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    if kind != "gpt2":
        expected.update({f"{kind}.rope.dimension_count": 16, f"{kind}.rope.freq_base": 10000.0})
    assert {k: fields.get(k) for k in expected} == expected
    eps_key = "gpt2.attention.layer_norm_epsilon" if kind == "gpt2" else f"{kind}.attention.layer_norm_rms_epsilon"
    assert fields[eps_key] == pytest.approx(1e-5)

    vocab = sample_tokenizer.hf.get_vocab(with_added_tokens=True)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == sample_tokenizer.vocab_size and all(vocab[t] == i for i, t in enumerate(tokens))
    types = fields["tokenizer.ggml.token_type"]
    assert types[sample_tokenizer.eot_id] == gguf.TokenType.CONTROL
    assert types.count(gguf.TokenType.NORMAL) == sample_tokenizer.vocab_size - 1
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == sample_tokenizer.vocab_size - 256 - 1 and all(len(m.split(" ")) == 2 for m in merges)

    state = model_state_dict(GPT(config))  # the names and shapes the run has
    weights = load_file(str(run_dir / rundir.WEIGHTS))
    back = lm_tensors(reader, kind, config.n_head)
    assert back.keys() == state.keys()
    for name, tensor in weights.items():
        assert torch.equal(back[name], tensor), name  # f32: bit for bit
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


@pytest.mark.parametrize(("dtype", "tolerance"), [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1 / 127)])
def test_smaller_types_store_matrices_in_them_and_stay_close(run, tmp_path: Path, dtype: str, tolerance: float) -> None:
    run_dir, kind = run
    out = tmp_path / f"{dtype}.gguf"
    export_gguf(run_dir, out, dtype=dtype)
    reader = gguf.GGUFReader(out)
    config = rundir.read_config(run_dir).model
    weights = load_file(str(run_dir / rundir.WEIGHTS))
    back = lm_tensors(reader, kind, config.n_head)
    for name, tensor in weights.items():
        # Relative to the largest value of the tensor: q8_0 scales each block of 32 by its largest value.
        error = (back[name] - tensor).abs().max() / tensor.abs().max()
        assert error <= tolerance, (name, float(error))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, stored in types.items():
        keeps_f32 = name.endswith(("norm.weight", ".bias")) or name == "position_embd.weight"
        assert stored == ("F32" if keeps_f32 else dtype.upper()), name


def test_interleaved_rows_give_llama_cpp_s_rotation_the_same_scores() -> None:
    """llama.cpp's `llama` rotates pairs (2i, 2i+1), lm pairs (i, i+d/2): permuted rows give equal q·k."""
    config = ModelConfig(vocab_size=8, context_length=16, n_layer=1, n_head=2, d_model=16, **LLAMA_SHAPE)
    generator = torch.Generator().manual_seed(1)
    w_q, w_k = (torch.randn(16, 16, generator=generator) for _ in range(2))
    x = torch.randn(16, 16, generator=generator)  # 16 positions
    cos, sin = rope_tables(config)

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).view(16, 2, 8).transpose(0, 1)  # (head, position, d_head)

    def interleaved_rope(t: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(16)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)  # (position, pair)
        even, odd = t[..., 0::2], t[..., 1::2]
        rotated = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
        return rotated.flatten(-2)

    ours = apply_rope(heads(w_q), cos, sin) @ apply_rope(heads(w_k), cos, sin).transpose(-2, -1)
    theirs = (interleaved_rope(heads(interleave_rope_rows(w_q, 2)))
              @ interleaved_rope(heads(interleave_rope_rows(w_k, 2))).transpose(-2, -1))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert torch.equal(split_rope_rows(interleave_rope_rows(w_q, 2), 2), w_q)
    assert not torch.equal(interleave_rope_rows(w_q, 2), w_q)


def test_refusals_are_one_line_and_name_the_option(tmp_path: Path, sample_tokenizer) -> None:
    sinusoidal = make_run(tmp_path / "sin", sample_tokenizer, pos_encoding="sinusoidal")
    result = run_lm("export", sinusoidal, "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert_one_line_error(result, "--pos-encoding sinusoidal", "llama.cpp")
    mixed = make_run(tmp_path / "mixed", sample_tokenizer, pos_encoding="rope", norm="layernorm", mlp="swiglu",
                     bias=False)
    assert_one_line_error(run_lm("export", mixed, "--format", "gguf", "--out", tmp_path / "x.gguf"),
                          "--norm 'layernorm' (needs 'rmsnorm')")
    odd = make_run(tmp_path / "odd", sample_tokenizer, d_model=48, **GPT2_SHAPE)
    assert_one_line_error(run_lm("export", odd, "--format", "gguf", "--dtype", "q8_0", "--out", tmp_path / "x.gguf"),
                          "--dtype q8_0", "48")
    good = make_run(tmp_path / "good", sample_tokenizer, **GPT2_SHAPE)
    assert_one_line_error(run_lm("export", good, "--format", "gguf", "--dtype", "f8", "--out", tmp_path / "x.gguf"),
                          "--dtype 'f8'")
    assert_one_line_error(run_lm("export", good, "--dtype", "f16", "--out", tmp_path / "hf"), "--format gguf")
    assert_one_line_error(run_lm("export", good, "--format", "onnx", "--out", tmp_path / "x"), "hf or gguf")
    (tmp_path / "taken.gguf").write_text("mine")
    assert_one_line_error(run_lm("export", good, "--format", "gguf", "--out", tmp_path / "taken.gguf"), "--force")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_without_the_gguf_package_the_error_says_how_to_install_it(tmp_path: Path, sample_tokenizer,
                                                                   monkeypatch) -> None:
    good = make_run(tmp_path / "good", sample_tokenizer, **GPT2_SHAPE)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'lm-from-text\[gguf\]'"):
        export_gguf(good, tmp_path / "x.gguf")


def test_pre_tokenizer_names_follow_the_split_llama_cpp_runs(sample_tokenizer) -> None:
    spec = json.loads(sample_tokenizer.to_str())
    assert pre_tokenizer_name(spec) == "dbrx"
    gpt2 = {**spec, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert pre_tokenizer_name(gpt2) == "gpt-2"
    other = {**spec, "pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(InputError, match="Whitespace"):
        pre_tokenizer_name(other)
    changed = json.loads(json.dumps(spec))
    changed["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    with pytest.raises(InputError, match=r"not one llama\.cpp implements"):
        pre_tokenizer_name(changed)
    with pytest.raises(InputError, match="normalizer"):
        pre_tokenizer_name({**spec, "normalizer": {"type": "NFC"}})
