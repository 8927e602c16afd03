"""What a model is and how it is trained: two dataclasses, the named presets, and their validation.

`ModelConfig` fixes the architecture (and is saved with the weights: a model cannot be loaded without
it). `TrainConfig` holds the schedule and the machine settings, which may change when a run resumes.
A preset pairs the two; command-line options override single fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lm.errors import UsageError

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
WINDOW_ORDERS = ("epochs", "random")  # how lm.data.BatchSampler draws training windows
WARMDOWN_SHAPES = ("linear", "1-sqrt")
DEFAULT_INIT_STD = 0.02  # GPT-2's: every weight matrix and embedding starts at this standard deviation
MUON_UNDER_FSDP = ("--optimizer muon orthogonalises whole weight matrices, which --fsdp shards; train with DDP "
                   "(--ddp, the default) or --optimizer adamw")


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer."""

    vocab_size: int = 8192
    context_length: int = 128  # the longest sequence the model reads (and learned positions cover)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # hidden width of the MLP; 0 picks 4 x d_model (GELU, ReLU²) or ~8/3 x d_model (SwiGLU); 0 with none
    pos_encoding: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"  # gelu | swiglu | relu2 (ReLU squared) | none (attention-only blocks)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before comparing them
    bias: bool = True
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The speedrun's techniques (modded-nanogpt, nanochat), each off by default; see docs/training.md.
    residual_scalars: bool = False  # block input = λr·x + λ0·x0 (x0: the embedding), learned per layer, from 1 and 0
    logit_softcap: float = 0.0  # > 0: logits become c·tanh(logits / c)
    value_embeddings: bool = False  # gated per-token tables added to the attention values on alternating layers
    smear: bool = False  # each token's embedding mixes in a gated share of the previous token's
    bigram_buckets: int = 0  # > 0: a zero-initialised table of this many rows, indexed by hash(previous, current)
    qk_gain: float = 1.0  # queries and keys multiplied by this after QK-norm (> 1: sharper attention)
    head_init_std: float = DEFAULT_INIT_STD  # the untied output head's initial standard deviation
    zero_init_projections: bool = False  # attention and MLP output projections start at zero

    def __post_init__(self) -> None:
        if self.d_ff == 0 and self.mlp != "none":
            self.d_ff = _swiglu_width(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> ModelConfig:
        """Raise `UsageError` naming the first impossible setting; return self when all is well."""
        _choice("--pos-encoding", self.pos_encoding, POS_ENCODINGS)
        _choice("--norm", self.norm, NORMS)
        _choice("--mlp", self.mlp, MLPS)
        if self.mlp == "none" and self.d_ff:
            raise UsageError(f"--d-ff {self.d_ff} sizes an MLP, and --mlp none builds blocks without one; drop --d-ff")
        for flag, value in (("--vocab-size", self.vocab_size), ("--context-length", self.context_length),
                            ("--n-layer", self.n_layer), ("--n-head", self.n_head), ("--d-model", self.d_model),
                            ("--d-ff", self.d_ff if self.mlp != "none" else 1)):
            if value < 1:
                raise UsageError(f"{flag} must be a positive whole number, got {value}")
        if self.d_model % self.n_head:
            raise UsageError(f"--n-head {self.n_head} does not divide --d-model {self.d_model}; choose a head "
                             f"count that does (e.g. {_divisor_near(self.d_model, self.n_head)})")
        if self.pos_encoding in ("rope", "sinusoidal") and self.d_head % 2:
            raise UsageError(f"{self.pos_encoding} positions need an even head width, but d_model/n_head = "
                             f"{self.d_head}; change --d-model or --n-head")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (self.logit_softcap >= 0 and math.isfinite(self.logit_softcap)):
            raise UsageError(f"--logit-softcap must be 0 (off) or a positive cap such as 15, got {self.logit_softcap}")
        if self.bigram_buckets < 0 or self.bigram_buckets == 1:
            raise UsageError(f"--bigram-buckets must be 0 (off) or at least 2, got {self.bigram_buckets}")
        if not (self.qk_gain > 0 and math.isfinite(self.qk_gain)):
            raise UsageError(f"--qk-gain must be a positive factor (1: off), got {self.qk_gain}")
        if self.qk_gain != 1.0 and not self.qk_norm:
            raise UsageError(f"--qk-gain {self.qk_gain:g} scales queries and keys after QK-norm; add --qk-norm")
        if not (self.head_init_std > 0 and math.isfinite(self.head_init_std)):
            raise UsageError(f"--head-init-std must be positive, got {self.head_init_std}")
        if self.head_init_std != DEFAULT_INIT_STD and self.tie_embeddings:
            raise UsageError(f"--head-init-std {self.head_init_std:g} needs its own output head: the tied head is "
                             "the token embedding; add --no-tie-embeddings")
        return self

    def techniques(self) -> list[str]:
        """The speedrun techniques this model's forward pass uses, by option (`--smear`, ...), in a fixed order."""
        used = {"--residual-scalars": self.residual_scalars, "--logit-softcap": self.logit_softcap > 0,
                "--value-embeddings": self.value_embeddings, "--smear": self.smear,
                "--bigram-buckets": self.bigram_buckets > 0, "--qk-gain": self.qk_gain != 1.0}
        return [flag for flag, on in used.items() if on]

    @property
    def reads_previous_token(self) -> bool:
        """Whether each position also reads the token before it (smear, bigram table): a cache keeps the ids."""
        return self.smear or self.bigram_buckets > 0


@dataclass
class TrainConfig:
    """How to train: schedule, batch, optimiser and machine settings."""

    max_steps: int = 2000
    batch_size: int = 16  # windows per micro-batch, all processes together (each takes its share)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr x this
    warmup_steps: int = 100
    warmdown: float = 0.0  # 0: cosine decay; else hold lr, then fall linearly over this last share of the run
    warmdown_shape: str = "linear"  # linear | 1-sqrt: the multiplier falls as 1 - t or 1 - sqrt(t) over the warmdown
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    muon_lr_scale: float = 1.0  # Muon's lr = lr x this (its updates are scaled to AdamW's size)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (torch.optim.Muon's ns_steps)
    muon_momentum: float = 0.95  # how much of Muon's running gradient carries over per step (Nesterov's momentum)
    time_budget: float = 0.0  # seconds; > 0: train until then (evaluation and saving included), not max_steps
    weight_decay: float = 0.1
    muon_cautious_wd: bool = False  # Muon decays only where update and weight agree in sign, the decay cosine to 0
    muon_polar_express: bool = False  # Muon orthogonalises with Polar Express's quintics (lm.optim.POLAR_EXPRESS)
    normuon_beta2: float = 0.0  # > 0: NorMuon evens out each neuron's update (lm.optim.normalize_neurons)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    embed_lr_scale: float = 1.0  # AdamW's lr for the lookup tables (token, position, value, bigram) = lr x this
    head_lr_scale: float = 1.0  # for an untied output head
    scalar_lr_scale: float = 1.0  # for the techniques' scalars and gates (residual scalars, smear, value gates)
    ema_decay: float = 0.0  # > 0: keep an average of the weights (decay per step), saved as the run's weights
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # 0: save at each evaluation
    sample_tokens: int = 48
    track_heads: bool = False  # record head detectors and the in-context score at each evaluation (lm.heads)
    repeat_windows: float = 0.0  # this share of training windows is a passage given twice (lm.data)
    # epochs | random: each epoch reads every token once, or each window starts anywhere (lm.data.BatchSampler).
    # "random" here, the order of runs saved before there was a choice; the tiny preset reads in epochs.
    windows: str = "random"
    val_fraction: float = 0.05
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False  # with several processes: shard the model with FSDP2 instead of copying it (DDP)

    def validate(self) -> TrainConfig:
        _choice("--device", self.device, DEVICES)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--windows", self.windows, WINDOW_ORDERS)
        for flag, value in (("--max-steps", self.max_steps), ("--batch-size", self.batch_size),
                            ("--grad-accum", self.grad_accum), ("--eval-every", self.eval_every),
                            ("--eval-batches", self.eval_batches), ("--log-every", self.log_every)):
            if value < 1:
                raise UsageError(f"{flag} must be a positive whole number, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.sample_tokens < 0:
            raise UsageError("--warmup-steps, --save-every and --sample-tokens cannot be negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}; 0.05 is typical")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.repeat_windows <= 1.0:
            raise UsageError("--repeat-windows must be a share of the windows between 0 and 1, "
                             f"got {self.repeat_windows:g}")
        if not 0.0 <= self.warmdown <= 1.0:
            raise UsageError(f"--warmdown must be a share of the run between 0 and 1, got {self.warmdown}")
        if self.time_budget < 0 or not math.isfinite(self.time_budget):
            raise UsageError(f"--time-budget cannot be negative, got {self.time_budget}")
        if not self.muon_lr_scale > 0:
            raise UsageError(f"--muon-lr-scale must be positive, got {self.muon_lr_scale}")
        if not 0 <= self.muon_momentum < 1:
            raise UsageError(f"--muon-momentum must be at least 0 and below 1, such as 0.95, got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps <= 20:
            raise UsageError(f"--muon-ns-steps must be 1 to 20, got {self.muon_ns_steps}")
        _choice("--warmdown-shape", self.warmdown_shape, WARMDOWN_SHAPES)
        if self.warmdown_shape != "linear" and self.warmdown == 0:
            raise UsageError(f"--warmdown-shape {self.warmdown_shape} shapes the warmdown; give --warmdown F too "
                             "(e.g. 0.5)")
        muon_options = {"--muon-cautious-wd": self.muon_cautious_wd, "--muon-polar-express": self.muon_polar_express,
                        "--normuon-beta2": self.normuon_beta2 > 0}
        for flag, on in muon_options.items():
            if on and self.optimizer != "muon":
                raise UsageError(f"{flag} is an option of Muon's; add --optimizer muon")
        if not 0 <= self.normuon_beta2 < 1:
            raise UsageError(f"--normuon-beta2 must be at least 0 (off) and below 1, such as 0.9, "
                             f"got {self.normuon_beta2}")
        if not (0 < self.adam_eps < 1):
            raise UsageError(f"--adam-eps must be a small positive number such as 1e-10, got {self.adam_eps}")
        if not (0 <= self.beta2 < 1):
            raise UsageError(f"--adam-beta2 must be at least 0 and below 1, such as 0.99, got {self.beta2}")
        for flag, value in (("--embed-lr-scale", self.embed_lr_scale), ("--head-lr-scale", self.head_lr_scale),
                            ("--scalar-lr-scale", self.scalar_lr_scale)):
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{flag} must be a positive multiple of --lr, got {value}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"--ema-decay must be in [0, 1) (0: off; e.g. 0.99), got {self.ema_decay}")
        if self.ema_decay and self.fsdp:
            raise UsageError("--ema-decay averages whole weights, which --fsdp shards; train with DDP (--ddp)")
        return self

    @property
    def checkpoint_every(self) -> int:
        return self.save_every or self.eval_every


# What a resumed run cannot change: the optimizer's saved state is laid out in these groups, and the saved
# weights are the average (or not).
FIXED_ON_RESUME = ("embed_lr_scale", "head_lr_scale", "scalar_lr_scale", "ema_decay")


def check_together(model: ModelConfig, train: TrainConfig) -> None:
    """Raise `UsageError` for a training option that has nothing to act on in this model."""
    if train.head_lr_scale != 1.0 and model.tie_embeddings:
        raise UsageError("--head-lr-scale needs its own output head: the tied head is the token embedding "
                         "(--embed-lr-scale sets its lr); add --no-tie-embeddings")
    if train.scalar_lr_scale != 1.0 and not (model.residual_scalars or model.smear or model.value_embeddings):
        raise UsageError("--scalar-lr-scale sets the lr of the residual scalars, smear and value-embedding gates, "
                         "which this model lacks; add --residual-scalars, --smear or --value-embeddings")


def check_resume_keeps(saved: TrainConfig, requested: TrainConfig) -> None:
    """On --resume, name the first option in FIXED_ON_RESUME that tries to change."""
    for name in FIXED_ON_RESUME:
        old, new = getattr(saved, name), getattr(requested, name)
        if new != old:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--resume keeps {flag} as the run started ({old:g}; its saved optimizer state and "
                             f"weights depend on it), but {new:g} was given; drop {flag} or start a new run")


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


def preset(name: str) -> Preset:
    """A fresh copy of a named preset (callers may change its fields)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], model=dataclasses.replace(PRESETS[name].model),
                               train=dataclasses.replace(PRESETS[name].train))


# A run started from trained weights (--init-from) nudges them rather than shaping them: a tenth of the
# source's learning rate, a short warmup, a short run, and evaluation often enough to see it work.
FINETUNE_LR_SCALE = 0.1
FINETUNE_DEFAULTS = {"max_steps": 200, "warmup_steps": 20, "eval_every": 50, "save_every": 0}


def finetune_defaults(source: TrainConfig) -> TrainConfig:
    """The schedule of a run started with --init-from: the source run's settings, fine-tuning's schedule."""
    return dataclasses.replace(source, lr=source.lr * FINETUNE_LR_SCALE, **FINETUNE_DEFAULTS)


def with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """`config` with the fields in `overrides` that are not None replaced (d_ff re-derived if left at 0)."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, ModelConfig) and "d_ff" not in changes and ({"d_model", "mlp"} & changes.keys()):
        changes["d_ff"] = 0
    return dataclasses.replace(config, **changes)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build `cls` from saved JSON, ignoring keys a newer or older version of lm may have written."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '10m', '1.5h' (a time budget); raises `UsageError` on anything else."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"--time-budget {text!r} is not a duration; write seconds or e.g. 90s, 10m, 2h") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UsageError(f"--time-budget must be positive, got {text!r}")
    return seconds


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")


def _swiglu_width(d_model: int) -> int:
    # Three matrices instead of two: 8/3 x d keeps the parameter count of a 4 x d GELU MLP. Rounded
    # up to a multiple of 64, which matrix kernels prefer.
    return 64 * math.ceil(8 * d_model / 3 / 64)


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


# The block designs of the families lm exports (transformers and llama.cpp share their names).
FAMILY_DESIGNS: dict[str, dict[str, Any]] = {
    "gpt2": {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": False},
    "qwen3": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True},
}


def _preset(name: str, description: str, model: dict[str, Any], train: dict[str, Any]) -> Preset:
    return Preset(name, description, ModelConfig(**model), TrainConfig(**train))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # tiny and small: the design and schedule that won bench/sweep.py on held-out text (README, Benchmarks):
    # Qwen3's block (rotary positions, RMSNorm, SwiGLU, no biases, QK-norm) and Muon, at twice the
    # learning rate AdamW alone trained best with; tiny holds that rate for the first half of the run and
    # brings it down in a straight line over the second (warmdown 0.5, sweeps 8-10; small keeps the
    # cosine, not swept at its size), and saves the weights' average (--ema-decay 0.99: the one speedrun
    # technique that won, sweeps 15-18; not measured at small's size), with weight decay (sweeps 19-20:
    # in its minutes it sees a small text several times over, and decay against that overfitting won on
    # tinyshakespeare and on the demo corpus; 1.0, Muon's lr x1.4 and AdamW's beta2 0.99 since sweep 23),
    # three layers (sweep 21: with the vocabulary sized to the text, better on tinyshakespeare in every
    # seed, natively and on AVX2, and level on the demo corpus in 23% less time), and Muon's update by Polar
    # Express's quintics evened out over the neurons by NorMuon (sweep 24: better at every seed by steps,
    # the medians 0.008 better natively and under AVX2), reading its text in epochs (sweep 25: every token
    # once per epoch instead of random windows; better in all six seed pairs by 0.025-0.063, 0.741x nanoGPT
    # natively and 0.756x under AVX2). Exportable to transformers (Qwen3) and llama.cpp (qwen3): the
    # optimizer's choices and the windows' order leave the model's shape alone.
    _preset("tiny", "the CPU demo: 2-3 minutes on a 2-core CPU",
            {"n_layer": 3, "n_head": 4, "d_model": 128, "context_length": 128, **FAMILY_DESIGNS["qwen3"]},
            {"max_steps": 600, "batch_size": 16, "lr": 4e-3, "optimizer": "muon", "warmup_steps": 50,
             "warmdown": 0.5, "weight_decay": 1.0, "muon_lr_scale": 1.4, "beta2": 0.99, "ema_decay": 0.99,
             "muon_polar_express": True, "normuon_beta2": 0.9, "windows": "epochs",
             "eval_every": 150, "eval_batches": 8, "log_every": 20}),
    _preset("small", "about 14M parameters: hours on a CPU, minutes on a GPU",
            {"n_layer": 6, "n_head": 6, "d_model": 384, "context_length": 256, **FAMILY_DESIGNS["qwen3"]},
            {"max_steps": 5000, "batch_size": 32, "lr": 2e-3, "optimizer": "muon", "warmup_steps": 200,
             "eval_every": 500, "eval_batches": 16, "log_every": 25}),
    _preset("gpt2", "GPT-2 small's shape, for a GPU",
            {"n_layer": 12, "n_head": 12, "d_model": 768, "context_length": 1024},
            {"max_steps": 5000, "batch_size": 16, "grad_accum": 4, "lr": 6e-4, "warmup_steps": 200,
             "eval_every": 500, "eval_batches": 20, "log_every": 10, "compile": True}),
    _preset("llama", "GPT-2 small's scale, Llama's design (no biases), for a GPU",
            {"n_layer": 12, "n_head": 12, "d_model": 768, "context_length": 1024, **FAMILY_DESIGNS["llama"]},
            {"max_steps": 5000, "batch_size": 16, "grad_accum": 4, "lr": 6e-4, "warmup_steps": 200,
             "eval_every": 500, "eval_batches": 20, "log_every": 10, "compile": True}),
)}
