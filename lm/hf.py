"""Hugging Face transformers interop: export a run as a transformers checkpoint, import one as a run.

Three families map one to one onto lm's model:
- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU (tanh approximation) or ReLU²
  (`activation_function: relu2`), biases. transformers stores GPT-2's linear weights (in, out)
  ("Conv1D"), lm (out, in): they are transposed.
- Llama (`LlamaForCausalLM`): rotary positions, RMSNorm, SwiGLU, no biases. lm's fused q/k/v matrix is
  split into q_proj/k_proj/v_proj; both rotate pairs (i, i + d/2), so no permutation is needed.
- Qwen3 (`Qwen3ForCausalLM`): Llama's design plus QK-norm (`q_norm`/`k_norm`, RMSNorm over each head).
Other designs (sinusoidal positions, say) have no transformers equivalent and are refused by name.

No transformers import happens here: checkpoints are plain JSON and safetensors files, so exporting
and importing work without it. Every write goes to a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm import rundir
from lm.chat import ChatFormat, chat_token_ids, jinja_chat_template, load_chat_format
from lm.checkpoint import load_run, model_state_dict
from lm.config import FAMILY_DESIGNS, ModelConfig, TrainConfig
from lm.errors import InputError, OutputError, UsageError
from lm.model import GPT
from lm.tokenizer import END_OF_TEXT, Tokenizer

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "relu2": "relu2"}
# Per-block parameter names, ours and GPT2LMHeadModel's (whose linear layers are Conv1D: weight (in, out)).
GPT2_NORMS = (("norm1", "ln_1"), ("norm2", "ln_2"))
GPT2_LINEARS = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                ("mlp.proj", "mlp.c_proj"))
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


# The speedrun techniques (ModelConfig.techniques) neither transformers' GPT-2, Llama and Qwen3 nor llama.cpp's
# compute, and why. --qk-gain is not here: it is folded into the QK-norm gains (`fold_qk_gain`).
UNEXPORTABLE = {
    "--residual-scalars": "residual scalars: GPT-2, Llama and Qwen3 blocks read the residual stream alone, with no "
                          "learned scale or embedding shortcut",
    "--logit-softcap": "soft-capped logits: GPT-2, Llama and Qwen3 have no logit cap",
    "--value-embeddings": "value embeddings: GPT-2, Llama and Qwen3 attention has no per-token value tables",
    "--smear": "smear: GPT-2, Llama and Qwen3 embed each token alone, without the one before it",
    "--bigram-buckets": "the hashed bigram table: GPT-2, Llama and Qwen3 embed single tokens, not pairs",
}


def family(config: ModelConfig, target: str = "transformers") -> str:
    """Which family (gpt2, llama or qwen3) a model belongs to, or a UsageError naming what blocks its export
    to `target`.

    transformers and llama.cpp share the GPT-2, Llama and Qwen3 families, so GGUF export asks the same
    question; ReLU² GPT-2 blocks go to transformers only.
    """
    for flag in config.techniques():
        if flag in UNEXPORTABLE:
            raise UsageError(f"cannot export to {target}: this run uses {UNEXPORTABLE[flag]} ({flag}); "
                             "export a run trained without it")
    if config.mlp == "none":
        raise UsageError(f"this run is attention-only (--mlp none), and the GPT-2, Llama and Qwen3 blocks of {target} "
                         "all have an MLP: it has no equivalent there; export a run trained with an MLP")
    designs = dict(FAMILY_DESIGNS)
    if config.mlp == "relu2" and target == "transformers":
        # GPT-2's config names its activation: relu2 is one transformers has.
        designs["gpt2"] = {**designs["gpt2"], "mlp": "relu2"}
    for name, wanted in designs.items():
        if all(getattr(config, key) == value for key, value in wanted.items()):
            return name
    if config.pos_encoding == "sinusoidal":
        raise UsageError("this run uses sinusoidal positions (--pos-encoding sinusoidal), which neither GPT-2 nor "
                         f"Llama in {target} has; export needs learned (GPT-2) or rope (Llama) positions")
    kind = "gpt2" if config.pos_encoding == "learned" else "qwen3" if config.qk_norm else "llama"
    closest, name = designs[kind], {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}[kind]
    blockers = [f"--{key.replace('_', '-')} {getattr(config, key)!r} (needs {value!r})"
                for key, value in closest.items() if getattr(config, key) != value]
    raise UsageError(f"no {target} equivalent: as {name} this run differs in {', '.join(blockers)}")


# lm -> transformers ------------------------------------------------------------------------------


def _add_chat_template(files: dict[str, dict[str, Any]], chat_format: ChatFormat, end_id: int,
                       eot: int | None) -> None:
    """A chat run's export: the template `apply_chat_template` renders to lm's ids, and a reply ends at the
    end-of-turn token (generation stops at it as well as at <|endoftext|>)."""
    files["tokenizer_config.json"]["chat_template"] = jinja_chat_template(chat_format)
    files["generation_config.json"]["eos_token_id"] = [end_id, *([eot] if eot is not None else [])]


def export_run(run_dir: Path, out: Path, *, force: bool = False) -> str:
    """Write `run_dir` as a transformers checkpoint folder; return the architecture name."""
    model, tokenizer, info = load_run(run_dir)
    config = info.model
    kind = family(config)
    eot = tokenizer.eot_id
    state = model_state_dict(model)
    tensors = _to_gpt2(state, config) if kind == "gpt2" else _to_llama(state, config)
    hf_config = _gpt2_config(config, eot) if kind == "gpt2" else _llama_config(config, eot, kind)
    files = {
        "config.json": hf_config,
        "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                   "do_sample": True, "temperature": 0.8, "top_k": 50,
                                   "max_length": config.context_length},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT,
                                  "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT,
                                  "model_max_length": config.context_length,
                                  "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT},
    }
    chat_format = load_chat_format(run_dir)
    if chat_format is not None:
        _add_chat_template(files, chat_format, chat_token_ids(tokenizer, chat_format).end, eot)

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        for name, payload in files.items():
            (staging / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    _write_folder(out, write, force)
    return SUPPORTED[kind]


def _gpt2_config(config: ModelConfig, eot: int | None) -> dict[str, Any]:
    return {
        "architectures": [SUPPORTED["gpt2"]], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
        "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
        "activation_function": GPT2_ACTIVATIONS[config.mlp], "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def _llama_config(config: ModelConfig, eot: int | None, kind: str = "llama") -> dict[str, Any]:
    return {
        "architectures": [SUPPORTED[kind]], "model_type": kind,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head, "head_dim": config.d_head, "hidden_act": "silu",
        "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta: both are written.
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def _to_gpt2(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in GPT2_NORMS:
            out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.weight"], state[f"{ours}{a}.bias"]
        for a, b in GPT2_LINEARS:
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"].t().contiguous()  # Conv1D: (in, out)
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def fold_qk_gain(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with --qk-gain multiplied into the QK-norm gains: RMSNorm(x)·w·g is RMSNorm(x) with gain w·g, so
    Qwen3's q_norm and k_norm compute the sharpened queries and keys (to float rounding)."""
    if config.qk_gain == 1.0:
        return state
    folded = dict(state)
    for i in range(config.n_layer):
        for name in (f"blocks.{i}.attn.q_norm.weight", f"blocks.{i}.attn.k_norm.weight"):
            folded[name] = state[name] * config.qk_gain
    return folded


def _to_llama(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = fold_qk_gain(state, config)
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[f"{ours}attn.qkv.weight"].split(config.d_model, dim=0)
        out.update({
            f"{theirs}input_layernorm.weight": state[f"{ours}norm1.weight"],
            f"{theirs}post_attention_layernorm.weight": state[f"{ours}norm2.weight"],
            f"{theirs}self_attn.q_proj.weight": q.contiguous(),
            f"{theirs}self_attn.k_proj.weight": k.contiguous(),
            f"{theirs}self_attn.v_proj.weight": v.contiguous(),
            f"{theirs}self_attn.o_proj.weight": state[f"{ours}attn.proj.weight"],
            f"{theirs}mlp.gate_proj.weight": state[f"{ours}mlp.gate.weight"],
            f"{theirs}mlp.up_proj.weight": state[f"{ours}mlp.fc.weight"],
            f"{theirs}mlp.down_proj.weight": state[f"{ours}mlp.proj.weight"],
        })
        if config.qk_norm:
            out[f"{theirs}self_attn.q_norm.weight"] = state[f"{ours}attn.q_norm.weight"]
            out[f"{theirs}self_attn.k_norm.weight"] = state[f"{ours}attn.k_norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


# transformers -> lm ------------------------------------------------------------------------------


def import_checkpoint(folder: Path, out: Path, *, force: bool = False) -> tuple[str, ModelConfig]:
    """Turn a local transformers checkpoint folder into a run directory; return its family and config."""
    hf_config = _read_json(folder / "config.json", f"{folder} is not a transformers checkpoint (no config.json)")
    kind = hf_config.get("model_type")
    if kind not in SUPPORTED:
        architecture = (hf_config.get("architectures") or [kind])[0]
        raise InputError(f"{architecture} (model_type {kind!r}) is not supported; lm imports "
                         f"{' and '.join(SUPPORTED.values())}")
    config = _gpt2_from_hf(hf_config) if kind == "gpt2" else _llama_from_hf(hf_config, qk_norm=kind == "qwen3")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InputError(f"{folder} has no tokenizer.json; lm needs the fast tokenizer file beside the weights")
    tokenizer = Tokenizer.from_file(tokenizer_file)
    if tokenizer.vocab_size != config.vocab_size:
        raise InputError(f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json says vocab_size "
                         f"{config.vocab_size}; the tokenizer does not belong to these weights")
    tensors = _read_weights(folder)
    state = _gpt2_to_lm(tensors, config) if kind == "gpt2" else _llama_to_lm(tensors, config)
    model = GPT(config.validate())
    missing = model_state_dict(model).keys() - state.keys()
    if missing:
        raise InputError(f"the checkpoint lacks {sorted(missing)[:3]}; it is incomplete or not a plain {kind} model")

    def write(staging: Path) -> None:
        save_file(state, str(staging / rundir.WEIGHTS))
        tokenizer.save(staging / rundir.TOKENIZER, overwrite=True)
        rundir.write_config(staging, config, TrainConfig(), {
            "parameters": model.num_parameters(), "imported_from": str(folder.resolve()),
            "architecture": SUPPORTED[kind]})

    _write_folder(out, write, force)
    return SUPPORTED[kind], config


def _gpt2_from_hf(c: dict[str, Any]) -> ModelConfig:
    activation = c.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "relu2"):
        raise InputError(f"GPT-2 activation {activation!r} is not supported (lm has tanh GELU and relu2)")
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
        raise InputError("GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are "
                         "not supported")
    return ModelConfig(vocab_size=c["vocab_size"], context_length=c.get("n_positions", c.get("n_ctx")),
                       n_layer=c["n_layer"], n_head=c["n_head"], d_model=c["n_embd"],
                       d_ff=c.get("n_inner") or 4 * c["n_embd"], pos_encoding="learned", norm="layernorm",
                       mlp="relu2" if activation == "relu2" else "gelu", bias=True,
                       tie_embeddings=c.get("tie_word_embeddings", True),
                       norm_eps=c.get("layer_norm_epsilon", 1e-5))


def _llama_from_hf(c: dict[str, Any], qk_norm: bool = False) -> ModelConfig:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InputError(f"Llama rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                         "(lm has plain rotary positions)")
    heads = c["num_attention_heads"]
    if c.get("num_key_value_heads", heads) != heads:
        raise InputError("grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise InputError("Llama checkpoints with attention or MLP biases are not supported")
    if c.get("head_dim", c["hidden_size"] // heads) != c["hidden_size"] // heads:
        raise InputError("Llama checkpoints whose head_dim is not hidden_size / num_attention_heads are not supported")
    return ModelConfig(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
                       n_layer=c["num_hidden_layers"], n_head=heads, d_model=c["hidden_size"],
                       d_ff=c["intermediate_size"], pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                       qk_norm=qk_norm,
                       tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def _gpt2_to_lm(t: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    t = {k.removeprefix("transformer."): v for k, v in t.items()}  # some GPT-2 files omit the prefix
    state = {"tok_emb.weight": t["wte.weight"], "pos_emb.weight": t["wpe.weight"],
             "norm.weight": t["ln_f.weight"], "norm.bias": t["ln_f.bias"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        for a, b in GPT2_NORMS:
            state[f"{ours}{a}.weight"], state[f"{ours}{a}.bias"] = t[f"{theirs}{b}.weight"], t[f"{theirs}{b}.bias"]
        for a, b in GPT2_LINEARS:
            state[f"{ours}{a}.weight"] = t[f"{theirs}{b}.weight"].t().contiguous()
            state[f"{ours}{a}.bias"] = t[f"{theirs}{b}.bias"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = t["lm_head.weight"]
    return state


def _llama_to_lm(t: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {"tok_emb.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        state.update({
            f"{ours}norm1.weight": t[f"{theirs}input_layernorm.weight"],
            f"{ours}norm2.weight": t[f"{theirs}post_attention_layernorm.weight"],
            f"{ours}attn.qkv.weight": torch.cat([t[f"{theirs}self_attn.{p}_proj.weight"] for p in "qkv"]),
            f"{ours}attn.proj.weight": t[f"{theirs}self_attn.o_proj.weight"],
            f"{ours}mlp.gate.weight": t[f"{theirs}mlp.gate_proj.weight"],
            f"{ours}mlp.fc.weight": t[f"{theirs}mlp.up_proj.weight"],
            f"{ours}mlp.proj.weight": t[f"{theirs}mlp.down_proj.weight"],
        })
        if config.qk_norm:
            state[f"{ours}attn.q_norm.weight"] = t[f"{theirs}self_attn.q_norm.weight"]
            state[f"{ours}attn.k_norm.weight"] = t[f"{theirs}self_attn.k_norm.weight"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = t["lm_head.weight"]
    return state


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint, as float32."""
    if (folder / INDEX).is_file():
        weight_map = _read_json(folder / INDEX, f"{folder / INDEX} cannot be read").get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise InputError(f"shard {missing[0]} listed in {INDEX} is missing from {folder}; copy every shard")
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise InputError(f"{folder} has no {WEIGHTS} (or {INDEX}); lm imports safetensors checkpoints only")
    size = sum((folder / name).stat().st_size for name in files)
    available = _available_memory()
    if available is not None and size > available:
        raise InputError(f"the checkpoint is {size / 1e9:.1f} GB but only {available / 1e9:.1f} GB of memory is "
                         "free; models bigger than memory are out of scope")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensors[key] = handle.get_tensor(key).float()
        except (OSError, SafetensorError) as err:
            raise InputError(f"{folder / name} cannot be read ({err}); the download may be incomplete") from None
    return tensors


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_json(path: Path, problem: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(problem) from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path} cannot be read ({err})") from None


def _write_folder(out: Path, write: Callable[[Path], None], force: bool) -> None:
    """Fill a temporary folder beside `out`, then rename it into place: `out` is never half-written."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; --out needs a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out} is not empty; pass --force to replace it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError as err:
        raise OutputError(f"cannot write to {out.parent} ({err.strerror}); choose another --out") from None
    try:
        write(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
