r"""GGUF export: a run as one file that llama.cpp runs (and the tools built on it: Ollama, LM Studio).

GGUF holds the architecture's hyper-parameters as key/value metadata, the tokenizer (tokens, merges,
token types, special tokens and the name of a pre-tokenizer llama.cpp implements in C++), and every
tensor under llama.cpp's names. lm's three families map onto three llama.cpp architectures:

- GPT-2 family (learned positions, LayerNorm, GELU, biases) -> `gpt2`: the fused q/k/v matrix stays
  fused (`attn_qkv`), weights keep nn.Linear's (out, in) layout, which is ggml's [in, out].
- Llama family (RoPE, RMSNorm, SwiGLU, no biases) -> `llama`: q/k/v are split, and the rows of q and k
  are permuted within each head. lm rotates the pairs (i, i + d/2) of a head (the GPT-NeoX layout);
  llama.cpp's `llama` rotates (2i, 2i + 1), so row i + s * d/2 moves to row 2i + s (what llama.cpp's
  own converter does to a transformers checkpoint). q kᵀ is unchanged, as the rotation of each pair is.
- Qwen3 family (the Llama family with --qk-norm: RMSNorm over each head's queries and keys before the
  rotation) -> `qwen3`: q/k/v split, plus `attn_q_norm`/`attn_k_norm`; llama.cpp's qwen3 rotates
  (i, i + d/2) pairs as lm does, so no rows move.

The pre-tokenizer is where a converted tokenizer silently goes wrong: llama.cpp does not run the
tokenizer.json's regex but a hand-written splitter chosen by name. lm's split pattern (lm.tokenizer,
tiktoken's cl100k) and the one llama.cpp's src/llama-vocab.cpp gives `llama3`, `dbrx` and `smaug-bpe`,
alternative by alternative:

    what                 ours                        llama.cpp
    contractions         '(?i:[sdmt]|ll|ve|re)       (?i:'s|'t|'re|'ve|'m|'ll|'d)
    words                [^\r\n\p{L}\p{N}]?+\p{L}+   [^\r\n\p{L}\p{N}]?\p{L}+
    numbers              \p{N}{1,3}                  \p{N}{1,3}
    punctuation           ?[^\s\p{L}\p{N}]++[\r\n]*   ?[^\s\p{L}\p{N}]+[\r\n]*
    line breaks          \s*[\r\n]                   \s*[\r\n]+
    spaces before text   \s+(?!\S)                   \s+(?!\S)
    other whitespace     \s+                         \s+

The same language: the contractions are the same set; the possessive `?+` and `++` never change a
match here (a non-letter given back could not start `\p{L}+`, and `[\r\n]*` may match nothing); and
`\s*[\r\n]` and `\s*[\r\n]+` both end a run of whitespace at its last line break. Of the names
llama.cpp gives that splitter, `llama-bpe` (and `llama3`) also switch on "ignore merges" (a piece that
is a whole token is taken as is, without running the merges), which lm's BPE does not do; `dbrx` runs
the merges, and DBRX's tokenizer is cl100k itself, so `dbrx` is the name written. Tokenizers with
GPT-2's own byte-level split (imported GPT-2 checkpoints) are written as `gpt-2`; any other
pre-tokenizer is refused. llama.cpp's letter, number and space classes are its own Unicode tables, so
bench/llama_cpp.py checks the result on Unicode-heavy text: the same ids from llama.cpp as from
`lm tokenize`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.atomic import FILE_MODE, prepare_output
from lm.chat import chat_token_ids, jinja_chat_template, load_chat_format
from lm.checkpoint import load_run, model_state_dict
from lm.config import ModelConfig
from lm.errors import InputError, OutputError, UsageError
from lm.hf import family, fold_qk_gain
from lm.tokenizer import SPLIT_PATTERN, Tokenizer

DTYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL = "pip install 'lm-from-text[gguf]' (or pip install gguf)"
# llama.cpp's names for lm's split pattern (merges always applied) and for GPT-2's own byte-level split.
PRE_TOKENIZER_CL100K = "dbrx"
PRE_TOKENIZER_GPT2 = "gpt-2"
# Token types of llama.cpp's vocabulary (gguf.TokenType).
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
Q8_0_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as GGUF stores it: byte-level token strings by id, their types, the merges."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre_tokenizer: str
    eot_id: int | None


@dataclass(frozen=True)
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    architecture: str  # llama.cpp's name: gpt2, llama or qwen3
    dtype: str
    tensors: int
    bytes: int
    pre_tokenizer: str


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise UsageError(f"GGUF export needs the gguf package (llama.cpp's own writer): {INSTALL}") from None
    return gguf


# lm -> llama.cpp tensors ---------------------------------------------------------------------------


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The run's tensors under llama.cpp's names and in its layout, float32, in the order they are written."""
    kind = family(config, "llama.cpp")
    state = fold_qk_gain(state, config)
    out = {"token_embd.weight": state["tok_emb.weight"]}
    if kind == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        names = {"norm1": "attn_norm", "attn.proj": "attn_output", "norm2": "ffn_norm", "mlp.fc": "ffn_up",
                 "mlp.proj": "ffn_down"}
        if kind == "gpt2":
            names["attn.qkv"] = "attn_qkv"
        else:
            names["mlp.gate"] = "ffn_gate"
            q, k, v = state[f"{ours}attn.qkv.weight"].split(config.d_model, dim=0)
            if kind == "llama":  # llama.cpp's llama rotates (2i, 2i + 1) pairs; its qwen3 lm's (i, i + d/2)
                q, k = interleave_rope_rows(q, config.n_head), interleave_rope_rows(k, config.n_head)
            out[f"{theirs}attn_q.weight"], out[f"{theirs}attn_k.weight"], out[f"{theirs}attn_v.weight"] = q, k, v
            if kind == "qwen3":
                names.update({"attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"})
        for a, b in names.items():
            for suffix in ("weight", "bias"):
                if f"{ours}{a}.{suffix}" in state:
                    out[f"{theirs}{b}.{suffix}"] = state[f"{ours}{a}.{suffix}"]
    out["output_norm.weight"] = state["norm.weight"]
    if "norm.bias" in state:
        out["output_norm.bias"] = state["norm.bias"]
    if not config.tie_embeddings:  # tied: llama.cpp reuses token_embd when output.weight is absent
        out["output.weight"] = state["lm_head.weight"]
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from rotating pairs (i, i + d/2) to rotating pairs (2i, 2i + 1), per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def split_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `interleave_rope_rows`: back to lm's (i, i + d/2) pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def storage_type(name: str, tensor: torch.Tensor, dtype: str) -> str:
    """The GGUF type a tensor is stored in: vectors and position embeddings stay f32, as llama.cpp expects."""
    if tensor.dim() < 2 or name == "position_embd.weight":
        return "f32"
    return dtype


# the tokenizer -----------------------------------------------------------------------------------


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """Tokens, token types, merges and the llama.cpp pre-tokenizer name of a byte-level BPE tokenizer."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    by_id = {token_id: token for token, token_id in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    tokens, types = [], []
    for token_id in range(tokenizer.vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[token_id])
            types.append(NORMAL if token_id not in added else CONTROL if added[token_id]["special"] else USER_DEFINED)
    # tokenizers writes merges as "a b" strings (before 0.20) or [a, b] pairs; GGUF wants "a b".
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return Vocabulary(tokens, types, merges, pre_tokenizer_name(spec), tokenizer.eot_id)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's split (see the module docstring), or an InputError."""
    if spec.get("normalizer"):
        raise InputError(f"the tokenizer has a {spec['normalizer'].get('type')} normalizer, which llama.cpp's "
                         "byte-level BPE does not run; retrain it with `lm train-tokenizer`")
    if spec["model"].get("ignore_merges"):
        raise InputError("the tokenizer skips merges for whole-token pieces (ignore_merges); llama.cpp does that "
                         "only for Llama 3's split; retrain it with `lm train-tokenizer`")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        if (split.get("pattern", {}).get("Regex") == SPLIT_PATTERN and split.get("behavior") == "Isolated"
                and not split.get("invert") and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return PRE_TOKENIZER_CL100K
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return PRE_TOKENIZER_GPT2
    raise InputError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
                     "llama.cpp implements; GGUF export needs a tokenizer from `lm train-tokenizer` or GPT-2's")


# writing -----------------------------------------------------------------------------------------


def export_gguf(run_dir: Path, out: Path, *, dtype: str = "f32", force: bool = False) -> GGUFExport:
    """Write `run_dir` as one GGUF file at `out` (atomically); weights in `dtype` (f32, f16, bf16, q8_0)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not a GGUF type lm writes; choose one of {', '.join(DTYPES)}")
    gguf = _gguf_module()
    prepare_output(out, overwrite=force, what="GGUF file")
    model, tokenizer, info = load_run(run_dir)
    config = info.model
    kind = family(config, "llama.cpp")
    tensors = gguf_tensors(model_state_dict(model), config)
    if dtype == "q8_0":
        odd = sorted({t.shape[-1] for n, t in tensors.items() if storage_type(n, t, dtype) == "q8_0"
                      and t.shape[-1] % Q8_0_BLOCK})
        if odd:
            raise UsageError(f"--dtype q8_0 quantizes rows in blocks of {Q8_0_BLOCK}, but this run has rows of "
                             f"{odd[0]} values (--d-model/--d-ff); use --dtype f16 or bf16")
    vocab = vocabulary(tokenizer)

    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), kind)
        _write_metadata(writer, gguf, config, kind, dtype, run_dir)
        chat_format = load_chat_format(run_dir)
        end_of_turn = chat_token_ids(tokenizer, chat_format).end if chat_format is not None else None
        _write_vocabulary(writer, vocab, end_of_turn)
        if chat_format is not None:
            # llama.cpp's server renders conversations with this template (`tokenizer.chat_template`).
            writer.add_chat_template(jinja_chat_template(chat_format))
        for name, tensor in tensors.items():
            data, qtype = _encode(gguf, tensor.numpy(), storage_type(name, tensor, dtype))
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out} ({err.strerror or err}); choose another --out") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GGUFExport(out, kind, dtype, len(tensors), out.stat().st_size, vocab.pre_tokenizer)


def _write_metadata(writer: Any, gguf: Any, config: ModelConfig, kind: str, dtype: str, run_dir: Path) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(Path(run_dir).resolve().name)
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    if kind == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.d_head)


def _write_vocabulary(writer: Any, vocab: Vocabulary, end_of_turn: int | None = None) -> None:
    """The tokenizer's metadata; a chat run's `end_of_turn` id becomes llama.cpp's EOT, where replies end."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre_tokenizer)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.eot_id is not None:
        # lm reads every prompt after <|endoftext|> (documents were trained that way) and stops at it:
        # it is llama.cpp's BOS, added to every prompt, and its end-of-generation token.
        writer.add_bos_token_id(vocab.eot_id)
        writer.add_eos_token_id(vocab.eot_id)
        writer.add_eot_token_id(end_of_turn if end_of_turn is not None else vocab.eot_id)
        writer.add_add_bos_token(True)
    else:
        writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _encode(gguf: Any, data: np.ndarray, storage: str) -> tuple[np.ndarray, Any]:
    """A float32 array in its storage type: f32 and f16 as NumPy arrays, bf16 and q8_0 as gguf's bytes."""
    types = gguf.GGMLQuantizationType
    if storage == "f32":
        return data, types.F32
    if storage == "f16":
        return data.astype(np.float16), types.F16
    qtype = types.BF16 if storage == "bf16" else types.Q8_0
    return gguf.quants.quantize(data, qtype), qtype
