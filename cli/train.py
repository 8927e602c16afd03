"""`lm train`: train a GPT on text files, with checkpoints, resume and a live progress display."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from lm.cli.train_tokenizer import VOCAB_SIZE_DEFAULT

if TYPE_CHECKING:
    from lm.config import ModelConfig, TrainConfig
    from lm.data import Splits, TextSplit, TokenCorpus
    from lm.distributed import Distributed
    from lm.heads import HeadTracking
    from lm.textfiles import TextFiles
    from lm.tokenizer import Tokenizer
    from lm.train import CpuChoices, Evaluation, Trainer, TrainOutcome, TrainUpdate

# `lm train --help` lists its options under these headings (cli/help_panels.py), in the order `command` first uses them.
RUN = "Run"
DATA = "Data"
MODEL = "Model"
OPTIMIZER = "Optimizer and schedule"
EVALUATION = "Evaluation and logging"
HARDWARE = "Hardware"
# Refinements of Muon's update a preset may turn on: a run that trains with AdamW leaves them out unless given.
PRESET_MUON_REFINEMENTS = ("muon_polar_express", "normuon_beta2")


def command(
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="RUN_DIR", rich_help_panel=RUN, show_default=False,
        help="Run directory: config, weights, tokenizer, checkpoints, metrics.")],
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", metavar="N", rich_help_panel=RUN, help="Optimiser steps in the whole run.")] = None,
    time_budget: Annotated[str | None, typer.Option(
        "--time-budget", metavar="DURATION", rich_help_panel=RUN, show_default=False,
        help="Train for this long instead of --max-steps (90, 90s, 10m, 2h), evaluation and saving included; "
             "the learning-rate schedule runs over the time.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", metavar="", rich_help_panel=RUN,
        help="Continue the run in --out from its last checkpoint. Options repeated from the command that started "
             "it are accepted; ones that conflict are named.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", "-f", metavar="", rich_help_panel=RUN, help="Replace a run already in --out.")] = False,
    save_every: Annotated[int | None, typer.Option(
        "--save-every", metavar="N", rich_help_panel=RUN,
        help="Steps between checkpoints (0: at each evaluation).")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="S", rich_help_panel=RUN, help="Seed for initialisation, batches and samples.")] = None,
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH", rich_help_panel=DATA, show_default=False,
        help="Text files, folders or globs; with --resume, defaults to the run's own.")] = None,
    val: Annotated[list[str] | None, typer.Option(
        "--val", metavar="PATH", rich_help_panel=DATA, show_default=False,
        help="Validation text: files, folders or globs (repeat --val for several). They are kept out of "
             "training and out of the tokenizer trained here. Default: the last --val-fraction of the text.")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", metavar="FILE", rich_help_panel=DATA, show_default=False,
        help="A tokenizer.json; without it one is trained on the training text (never the validation text).")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(
        "--vocab-size", metavar="N", rich_help_panel=DATA, show_default=False,
        help=f"Vocabulary size of the tokenizer trained when --tokenizer is not given {VOCAB_SIZE_DEFAULT}.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", metavar="F", rich_help_panel=DATA,
        help="Without --val: share of the text's bytes (the last, cut at a line end) kept for validation, "
             "set aside before the tokenizer is trained.")
    ] = None,
    windows: Annotated[str | None, typer.Option(
        "--windows", metavar="ORDER", rich_help_panel=DATA,
        help="epochs | random: training windows read every token once per epoch (tiled from a random phase, "
             "shuffled), or start anywhere (nanoGPT's way).")] = None,
    repeat_windows: Annotated[float | None, typer.Option(
        "--repeat-windows", metavar="SHARE", rich_help_panel=DATA, show_default=False,
        help="Make this share of the training windows a passage (of a random length up to half the context) "
             "and the same passage again (validation stays plain text): copying pays, so induction heads form "
             "sooner (`make demo-circuits`) [default: 0].")
    ] = None,
    text_field: Annotated[str | None, typer.Option(
        "--text-field", metavar="NAME", rich_help_panel=DATA, show_default=False,
        help="JSON Lines and Parquet files: the field (column) that holds each record's text [default: text].")
    ] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", metavar="NAME", rich_help_panel=MODEL, show_default=False,
        help="tiny | small | gpt2 | llama (see `lm presets`) [default: tiny].")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", metavar="RUN_DIR", rich_help_panel=MODEL, show_default=False,
        help="Start a new run in --out from this run's weights, shape and tokenizer (`lm import`ed checkpoints "
             "too), with a fresh optimizer and fine-tuning defaults: lr a tenth of the source run's, 20 warmup "
             "steps, 200 steps, evaluation every 50 and before the first step. Shape options are refused; "
             "--context-length may shrink.")] = None,
    n_layer: Annotated[int | None, typer.Option(
        "--n-layer", metavar="N", rich_help_panel=MODEL, help="Transformer blocks.")] = None,
    n_head: Annotated[int | None, typer.Option(
        "--n-head", metavar="N", rich_help_panel=MODEL, help="Attention heads per block.")] = None,
    d_model: Annotated[int | None, typer.Option(
        "--d-model", metavar="N", rich_help_panel=MODEL, help="Width of the residual stream.")] = None,
    context_length: Annotated[int | None, typer.Option(
        "--context-length", "-T", metavar="N", rich_help_panel=MODEL,
        help="Tokens per training window and the model's longest context.")] = None,
    d_ff: Annotated[int | None, typer.Option(
        "--d-ff", metavar="N", rich_help_panel=MODEL, help="Hidden width of the MLP (0: automatic).")] = None,
    pos_encoding: Annotated[str | None, typer.Option(
        "--pos-encoding", metavar="KIND", rich_help_panel=MODEL, help="learned | sinusoidal | rope.")] = None,
    norm: Annotated[str | None, typer.Option(
        "--norm", metavar="KIND", rich_help_panel=MODEL, help="layernorm | rmsnorm.")] = None,
    mlp: Annotated[str | None, typer.Option(
        "--mlp", metavar="KIND", rich_help_panel=MODEL,
        help="gelu | swiglu | relu2 (ReLU squared) | none (attention-only blocks: cannot be exported).")] = None,
    qk_norm: Annotated[bool | None, typer.Option(
        "--qk-norm/--no-qk-norm", rich_help_panel=MODEL, show_default=False,
        help="RMS-normalise each head's queries and keys (as Qwen3 does).")] = None,
    bias: Annotated[bool | None, typer.Option(
        "--bias/--no-bias", rich_help_panel=MODEL, show_default=False,
        help="Bias vectors in linear layers and norms.")] = None,
    tie_embeddings: Annotated[bool | None, typer.Option(
        "--tie-embeddings/--no-tie-embeddings", rich_help_panel=MODEL, show_default=False,
        help="Share the token embedding with the output head.")] = None,
    dropout: Annotated[float | None, typer.Option(
        "--dropout", metavar="P", rich_help_panel=MODEL, help="Dropout probability (0 for short runs).")] = None,
    residual_scalars: Annotated[bool | None, typer.Option(
        "--residual-scalars/--no-residual-scalars", rich_help_panel=MODEL, show_default=False,
        help="Each block reads λr·x + λ0·x0, x0 the embedding, both learned per layer from 1 and 0 "
             "(not exportable).")] = None,
    logit_softcap: Annotated[float | None, typer.Option(
        "--logit-softcap", metavar="C", rich_help_panel=MODEL,
        help="Cap the logits smoothly at ±C: C·tanh(logits/C), e.g. 15 (0: off; not exportable).")] = None,
    value_embeddings: Annotated[bool | None, typer.Option(
        "--value-embeddings/--no-value-embeddings", rich_help_panel=MODEL, show_default=False,
        help="Add gated per-token tables to the attention values on alternating layers (not exportable).")] = None,
    smear: Annotated[bool | None, typer.Option(
        "--smear/--no-smear", rich_help_panel=MODEL, show_default=False,
        help="Mix a gated share of the previous token's embedding into each token's (not exportable).")] = None,
    bigram_buckets: Annotated[int | None, typer.Option(
        "--bigram-buckets", metavar="N", rich_help_panel=MODEL,
        help="Add a hashed bigram embedding: N rows, zero at the start, indexed by (previous, current) token "
             "(0: off; not exportable).")] = None,
    qk_gain: Annotated[float | None, typer.Option(
        "--qk-gain", metavar="G", rich_help_panel=MODEL,
        help="Multiply queries and keys by G after QK-norm: sharper attention, e.g. 1.2 (needs --qk-norm; "
             "exported folded into the QK-norm gains).")] = None,
    head_init_std: Annotated[float | None, typer.Option(
        "--head-init-std", metavar="S", rich_help_panel=MODEL,
        help="Initial standard deviation of an untied output head (e.g. 0.001: tiny logits at the start).")] = None,
    zero_init_projections: Annotated[bool | None, typer.Option(
        "--zero-init-proj/--no-zero-init-proj", rich_help_panel=MODEL, show_default=False,
        help="Start the attention and MLP output projections at zero: every block starts as the identity.")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", metavar="LR", rich_help_panel=OPTIMIZER, help="Peak learning rate (after warmup).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-B", metavar="N", rich_help_panel=OPTIMIZER,
        help="Windows per micro-batch, all processes together.")] = None,
    optimizer: Annotated[str | None, typer.Option(
        "--optimizer", metavar="NAME", rich_help_panel=OPTIMIZER,
        help="adamw | muon (Muon for the blocks' weight matrices, AdamW for embeddings, head, norms, biases).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(
        "--grad-accum", metavar="K", rich_help_panel=OPTIMIZER, help="Micro-batches per optimiser step.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(
        "--warmup-steps", metavar="N", rich_help_panel=OPTIMIZER,
        help="Steps of linear warmup before the cosine decay.")] = None,
    warmdown: Annotated[float | None, typer.Option(
        "--warmdown", metavar="F", rich_help_panel=OPTIMIZER,
        help="0: cosine decay after warmup; else constant lr, then a linear fall over the run's last F.")] = None,
    warmdown_shape: Annotated[str | None, typer.Option(
        "--warmdown-shape", metavar="SHAPE", rich_help_panel=OPTIMIZER,
        help="linear | 1-sqrt: how the lr falls over the warmdown (1-sqrt stays high longer, then drops).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", metavar="W", rich_help_panel=OPTIMIZER,
        help="AdamW weight decay on weight matrices.")] = None,
    grad_clip: Annotated[float | None, typer.Option(
        "--grad-clip", metavar="X", rich_help_panel=OPTIMIZER,
        help="Clip the gradient norm to this (0: off).")] = None,
    muon_lr_scale: Annotated[float | None, typer.Option(
        "--muon-lr-scale", metavar="X", rich_help_panel=OPTIMIZER, help="Muon's learning rate as a multiple of --lr.")
    ] = None,
    muon_ns_steps: Annotated[int | None, typer.Option(
        "--muon-ns-steps", metavar="N", rich_help_panel=OPTIMIZER,
        help="Newton-Schulz iterations in each Muon update (fewer: a cheaper, rougher orthogonalisation).")
    ] = None,
    muon_momentum: Annotated[float | None, typer.Option(
        "--muon-momentum", metavar="M", rich_help_panel=OPTIMIZER,
        help="How much of Muon's running gradient carries into each step (Nesterov momentum; 0.95).")] = None,
    muon_cautious_wd: Annotated[bool | None, typer.Option(
        "--muon-cautious-wd/--no-muon-cautious-wd", rich_help_panel=OPTIMIZER, show_default=False,
        help="Muon decays a weight only where its update shrinks it too, the decay falling to 0 over the run "
             "(a cosine).")] = None,
    muon_polar_express: Annotated[bool | None, typer.Option(
        "--muon-polar-express/--no-muon-polar-express", rich_help_panel=OPTIMIZER, show_default=False,
        help="Muon orthogonalises with Polar Express's five quintics (singular values nearer 1 in as many "
             "iterations).")] = None,
    normuon_beta2: Annotated[float | None, typer.Option(
        "--normuon-beta2", metavar="B", rich_help_panel=OPTIMIZER,
        help="NorMuon: even out each neuron's share of Muon's update by a running mean of its squares decaying "
             "by B per step (0: off; 0.9 is NorMuon's).")] = None,
    adam_eps: Annotated[float | None, typer.Option(
        "--adam-eps", metavar="EPS", rich_help_panel=OPTIMIZER, help="AdamW's epsilon (e.g. 1e-10).")] = None,
    adam_beta2: Annotated[float | None, typer.Option(
        "--adam-beta2", metavar="B", rich_help_panel=OPTIMIZER,
        help="AdamW's second-moment decay: how many steps of squared gradients (about 1/(1-B)) scale its "
             "updates.")] = None,
    embed_lr_scale: Annotated[float | None, typer.Option(
        "--embed-lr-scale", metavar="X", rich_help_panel=OPTIMIZER,
        help="Learning rate of the embedding tables as a multiple of --lr (not weight-decayed when not 1).")
    ] = None,
    head_lr_scale: Annotated[float | None, typer.Option(
        "--head-lr-scale", metavar="X", rich_help_panel=OPTIMIZER,
        help="Learning rate of an untied output head as a multiple of --lr.")] = None,
    scalar_lr_scale: Annotated[float | None, typer.Option(
        "--scalar-lr-scale", metavar="X", rich_help_panel=OPTIMIZER,
        help="Learning rate of the residual scalars, smear and value-embedding gates as a multiple of --lr.")
    ] = None,
    ema_decay: Annotated[float | None, typer.Option(
        "--ema-decay", metavar="D", rich_help_panel=OPTIMIZER,
        help="Keep an exponential moving average of the weights (e.g. 0.99 per step), evaluated and saved as "
             "the run's weights; the trained ones are kept to resume from (0: off).")] = None,
    eval_every: Annotated[int | None, typer.Option(
        "--eval-every", metavar="N", rich_help_panel=EVALUATION, help="Steps between validation runs (and samples).")
    ] = None,
    eval_batches: Annotated[int | None, typer.Option(
        "--eval-batches", metavar="N", rich_help_panel=EVALUATION, help="Batches of validation windows per evaluation.")
    ] = None,
    sample_tokens: Annotated[int | None, typer.Option(
        "--sample-tokens", metavar="N", rich_help_panel=EVALUATION,
        help="Tokens in the sample shown at each evaluation.")] = None,
    log_every: Annotated[int | None, typer.Option(
        "--log-every", metavar="N", rich_help_panel=EVALUATION, help="Steps between lines in metrics.jsonl.")] = None,
    track_heads: Annotated[bool | None, typer.Option(
        "--track-heads/--no-track-heads", rich_help_panel=EVALUATION, show_default=False,
        help="At each evaluation also record every head's previous-token and induction score and the in-context "
             "score (loss late in a window minus early) in metrics.jsonl, for `lm info --plot` [default: off].")
    ] = None,
    device: Annotated[str | None, typer.Option(
        "--device", metavar="DEV", rich_help_panel=HARDWARE, help="auto | cpu | cuda | mps.")] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="TYPE", rich_help_panel=HARDWARE,
        help="auto | float32 | bfloat16 | float16 (auto: bf16 on capable GPUs, fp32 on CPU).")] = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", rich_help_panel=HARDWARE, show_default=False,
        help="Compile the model with torch.compile (on GPUs: faster steps after a slow first one).")] = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", metavar="N", rich_help_panel=HARDWARE,
        help="Train with N processes on this machine (starts torchrun for you).")] = 1,
    fsdp: Annotated[bool | None, typer.Option(
        "--fsdp/--ddp", rich_help_panel=HARDWARE, show_default=False,
        help="With several processes: shard the model (FSDP2) instead of copying it (DDP, the default).")] = None,
) -> None:
    """Train a GPT on text: next-token prediction, checkpointed, resumable.

    Presets set the model and its training defaults; any option overrides one field, and options that
    show no default take the preset's (`lm presets` lists them). Ctrl-C saves a checkpoint; --resume
    continues exactly where it stopped.
    """
    from lm.cli.render import stderr

    model_overrides = {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, "d_ff": d_ff,
                       "context_length": context_length, "pos_encoding": pos_encoding, "norm": norm, "mlp": mlp,
                       "qk_norm": qk_norm, "bias": bias, "tie_embeddings": tie_embeddings, "dropout": dropout,
                       "residual_scalars": residual_scalars, "logit_softcap": logit_softcap,
                       "value_embeddings": value_embeddings, "smear": smear, "bigram_buckets": bigram_buckets,
                       "qk_gain": qk_gain, "head_init_std": head_init_std,
                       "zero_init_projections": zero_init_projections}
    train_overrides = {"max_steps": max_steps, "time_budget": _time_budget(time_budget, max_steps),
                       "optimizer": optimizer, "muon_lr_scale": muon_lr_scale, "muon_ns_steps": muon_ns_steps,
                       "muon_momentum": muon_momentum,
                       "warmdown": warmdown, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                       "warmup_steps": warmup_steps, "weight_decay": weight_decay, "grad_clip": grad_clip,
                       "eval_every": eval_every, "eval_batches": eval_batches, "log_every": log_every,
                       "save_every": save_every, "sample_tokens": sample_tokens, "track_heads": track_heads,
                       "repeat_windows": repeat_windows, "windows": windows,
                       "val_fraction": val_fraction, "seed": seed, "device": device, "dtype": dtype, "compile": compile,
                       "fsdp": fsdp, "warmdown_shape": warmdown_shape, "muon_cautious_wd": muon_cautious_wd,
                       "muon_polar_express": muon_polar_express, "normuon_beta2": normuon_beta2,
                       "adam_eps": adam_eps, "beta2": adam_beta2, "embed_lr_scale": embed_lr_scale,
                       "head_lr_scale": head_lr_scale, "scalar_lr_scale": scalar_lr_scale, "ema_decay": ema_decay}
    # Everything that can be wrong is checked before anything is written or deleted.
    plan = _plan_run(out, paths, val=val, tokenizer=tokenizer, vocab_size=vocab_size, preset=preset,
                     text_field=text_field, val_fraction=val_fraction, init_from=init_from, resume=resume, force=force,
                     model_overrides=model_overrides, train_overrides=train_overrides)
    _check_plan(plan, nproc, optimizer_given=optimizer is not None, ema_given=ema_decay is not None,
                muon_update_given={name for name in PRESET_MUON_REFINEMENTS if train_overrides[name] is not None},
                console=stderr())
    from lm.distributed import launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(_launch_processes(nproc))
    _check_run_dir(plan)
    outcome = _train(plan)
    if outcome.status == "interrupted":
        raise typer.Exit(130)


@dataclass
class RunPlan:
    """What `lm train` will do, settled from its flags (and, resuming, from the run's config.json)."""

    out: Path
    model: ModelConfig
    train: TrainConfig
    paths: list[str]
    val: list[str] | None
    tokenizer: Path | None  # the tokenizer.json to use; None: train one on the training text
    vocab_size: int | None  # of a tokenizer trained here
    text_field: str
    resume: bool
    force: bool
    init_from: Path | None
    init_weights: Path | None  # --init-from's weights file
    saved: dict[str, Any]  # config.json facts carried over: the preset's name, --init-from's origin, the run's own
    resumed_model: ModelConfig | None  # the shape of the run --resume continues

    @property
    def chat(self) -> bool:
        """Fine-tuning on conversations (`messages` records), settled once the files are found."""
        from lm.chat import MESSAGES_FIELD

        return self.text_field == MESSAGES_FIELD


@dataclass
class TrainingText:
    """The run's text, encoded, and what config.json says about it."""

    tokenizer: Tokenizer
    splits: Splits
    model: ModelConfig  # the plan's, with the tokenizer's vocabulary
    facts: dict[str, Any]


def _time_budget(text: str | None, max_steps: int | None) -> float | None:
    """--time-budget in seconds (None without it); it replaces --max-steps."""
    from lm.config import parse_duration
    from lm.errors import UsageError

    budget = parse_duration(text) if text is not None else None
    if budget is not None and max_steps is not None:
        raise UsageError("--time-budget replaces --max-steps; give one of them")
    return budget


def _plan_run(out: Path, paths: list[str] | None, *, val: list[str] | None, tokenizer: Path | None,
              vocab_size: int | None, preset: str | None, text_field: str | None, val_fraction: float | None,
              init_from: Path | None, resume: bool, force: bool, model_overrides: dict[str, Any],
              train_overrides: dict[str, Any]) -> RunPlan:
    """The configs and text of the run: the run's own on --resume, the source's with --init-from, else a
    preset's; the flags given override them."""
    from lm import rundir
    from lm.config import check_resume_keeps, with_overrides
    from lm.config import preset as named_preset
    from lm.errors import UsageError

    init_weights: Path | None = None
    resumed_model: ModelConfig | None = None
    if resume:
        info = rundir.read_config(out)
        _check_resume_agrees(out, info, paths=paths, val=val, tokenizer=tokenizer, vocab_size=vocab_size,
                             preset=preset, text_field=text_field, val_fraction=val_fraction, init_from=init_from,
                             model_overrides=model_overrides)
        model, train, saved = info.model, with_overrides(info.train, train_overrides), info.extra
        check_resume_keeps(info.train, train)
        resumed_model = info.model
        paths = saved.get("corpus", {}).get("paths") or paths
        if not paths:
            raise UsageError(f"{out}/config.json does not say what text the run was trained on; pass the PATHs")
        tokenizer = out / rundir.TOKENIZER
        val = saved.get("validation", {}).get("paths")
        text_field = saved.get("corpus", {}).get("text_field", "text")
    elif init_from is not None:
        model, train, init_weights, saved = _init_from(
            init_from, out, tokenizer=tokenizer, vocab_size=vocab_size, preset=preset,
            model_overrides=model_overrides, train_overrides=train_overrides)
        tokenizer = init_from / rundir.TOKENIZER
    else:
        if not paths:
            raise UsageError("no training text given; pass text files, folders or globs (see `lm train --help`)")
        chosen = named_preset(preset or "tiny")
        model = with_overrides(chosen.model, model_overrides)
        train = with_overrides(chosen.train, train_overrides)
        saved = {"preset": chosen.name}
    if not paths:
        raise UsageError("no training text given; pass text files, folders or globs (see `lm train --help`)")
    return RunPlan(out, model, train, paths, val, tokenizer, vocab_size, text_field or "text", resume, force,
                   init_from, init_weights, saved, resumed_model)


def _check_plan(plan: RunPlan, nproc: int, *, optimizer_given: bool, ema_given: bool, muon_update_given: set[str],
                console: Console) -> None:
    """Validate the configs and the process count; under FSDP the preset's Muon gives way to AdamW and its
    weight average is left out; without Muon, the preset's refinements of Muon's update are too."""
    from lm.config import MUON_UNDER_FSDP, TrainConfig, check_together
    from lm.distributed import launched_by_torchrun
    from lm.errors import UsageError

    train = plan.train
    if train.fsdp and train.optimizer == "muon" and not optimizer_given and not plan.resume:
        # The preset's Muon orthogonalises whole matrices, which FSDP shards: AdamW, unless asked for.
        train.optimizer = "adamw"
        if not launched_by_torchrun():
            console.print("note: --fsdp shards the weight matrices Muon treats whole, so this run uses AdamW "
                          "(the preset's Muon needs --ddp)")
    if train.fsdp and train.ema_decay and not ema_given and not plan.resume:
        train.ema_decay = 0.0  # the average is of whole weights, which FSDP shards
        if not launched_by_torchrun():
            console.print("note: --fsdp shards the weights the preset's average (--ema-decay) keeps whole, so "
                          "this run keeps none (it needs --ddp)")
    if train.optimizer != "muon" and not plan.resume:  # the preset's refinements of Muon's update, unless asked for
        for name in set(PRESET_MUON_REFINEMENTS) - muon_update_given:
            setattr(train, name, getattr(TrainConfig(), name))
    if train.fsdp and train.optimizer == "muon" and nproc > 1:
        raise UsageError(MUON_UNDER_FSDP)  # here, once, rather than from every process it would start
    train.validate()
    plan.model.validate()
    check_together(plan.model, train)
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and not launched_by_torchrun():
        from lm.train import check_batch_split

        check_batch_split(train.batch_size, nproc)


def _check_run_dir(plan: RunPlan) -> None:
    """--resume needs a run in --out; a new run refuses to replace one without --force."""
    from lm import rundir

    if plan.resume:
        rundir.prepare_run_dir(plan.out, resume=True, force=False)
    elif rundir.is_run(plan.out) and not plan.force:
        rundir.prepare_run_dir(plan.out, resume=False, force=False)  # raises: a run is there already


def _train(plan: RunPlan) -> TrainOutcome:
    """Prepare the text, build the trainer and run it with a progress display, in each process of the run."""
    # Only now the heavy imports (torch): the checks above answer at once.
    from lm import distributed, rundir
    from lm.cli.render import stderr
    from lm.device import resolve_device, resolve_dtype

    torch_device = resolve_device(plan.train.device)
    resolve_dtype(plan.train.dtype, torch_device)
    text = _split_text(plan)
    context = distributed.init(torch_device.type)
    # Other processes print nothing: their errors still reach standard error.
    console = stderr() if context.is_main else Console(quiet=True)
    try:
        encoded = _prepare_data(plan, text, context, console)
        if not plan.resume and context.is_main:  # every check has passed: only now is an old run replaced
            rundir.prepare_run_dir(plan.out, resume=False, force=plan.force)
        distributed.barrier(context)
        trainer = _build_trainer(plan, encoded, context, console)
        outcome = _run_with_progress(trainer, console)
        if context.is_main:
            _describe_end(outcome, plan.out)
        # Every process waits until all are done before any tears the group down: once, in CI, gloo aborted a
        # two-process --fsdp run ("terminate called without an active exception") before process 0 had closed.
        distributed.barrier(context)
    finally:
        distributed.shutdown(context)
    return outcome


def _split_text(plan: RunPlan) -> TextSplit:
    """The training and validation text; conversation records (`messages`) make the run a chat fine-tuning."""
    from lm import rundir
    from lm.chat import MESSAGES_FIELD, holds_conversations
    from lm.data import split_text

    text = split_text(plan.paths, plan.val, plan.train.val_fraction, exclude=[plan.out / rundir.TOKENIZER],
                      text_field=plan.text_field)
    if plan.text_field != MESSAGES_FIELD and holds_conversations(text.train):
        plan.text_field = MESSAGES_FIELD
        return _split_text(plan)
    return text


def _prepare_data(plan: RunPlan, text: TextSplit, context: Distributed, console: Console) -> TrainingText:
    """The tokenizer (given, or trained by the first process) and both splits encoded, checked to be the same
    in every process."""
    from lm import distributed, rundir
    from lm.config import to_dict, with_overrides
    from lm.data import Splits, check_splits
    from lm.tokenizer import Tokenizer
    from lm.train import check_batch_split

    check_batch_split(plan.train.batch_size, context.world_size)
    _describe_validation(console, text.record, val_given=bool(plan.val),
                         tokenizer=None if plan.resume or plan.init_from else plan.tokenizer, train_paths=plan.paths)
    tok = Tokenizer.from_file(plan.tokenizer) if plan.tokenizer is not None else _shared_tokenizer(
        context, text.train, plan.vocab_size, console)
    if plan.chat:
        tok = _with_chat_tokens(tok, console)
    model = with_overrides(plan.model, {"vocab_size": tok.vocab_size})
    if plan.resumed_model is not None:
        rundir.check_same_model(plan.resumed_model, model)
    if plan.chat:
        return _prepare_conversations(plan, text, tok, model, context, console)
    corpus = _shared_corpus(context, text.train, tok, console)
    val_corpus = _shared_corpus(context, text.val, tok, console, what="validation")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its threads are done; torch's take over
    splits = check_splits(Splits(train=corpus.tokens, val=val_corpus.tokens), model.context_length)
    facts = [to_dict(model), to_dict(plan.train), len(corpus.tokens), corpus.path.name, val_corpus.path.name]
    distributed.check_same(context, "configuration or training text", facts)
    return TrainingText(tok, splits, model, _config_facts(
        plan, text.record, train_tokens=len(corpus.tokens), val_tokens=len(val_corpus.tokens), files=corpus.files,
        text_bytes=corpus.text_bytes))


def _with_chat_tokens(tok: Tokenizer, console: Console) -> Tokenizer:
    """The tokenizer with the chat format's role markers and end-of-turn token, added when it lacks them."""
    from lm.chat import DEFAULT_CHAT_FORMAT, add_chat_tokens, has_chat_tokens

    if has_chat_tokens(tok):
        return tok
    grown = add_chat_tokens(tok)
    added = [token for token in DEFAULT_CHAT_FORMAT.tokens if token not in tok.special_tokens]
    console.print(f"Chat tokens: {', '.join(added)} added as ids {tok.vocab_size:,}-{grown.vocab_size - 1:,}; the "
                  f"token embedding (and an untied output head) grows by {len(added)} rows, each the mean of the "
                  "trained rows")
    return grown


def _prepare_conversations(plan: RunPlan, text: TextSplit, tok: Tokenizer, model: ModelConfig,
                           context: Distributed, console: Console) -> TrainingText:
    """Chat fine-tuning's text: conversations rendered to ids, learned on the assistant's turns only."""
    from lm import distributed
    from lm.config import to_dict
    from lm.data import check_splits, tokenize_conversation_split

    splits = tokenize_conversation_split(text, tok, model.context_length)
    counts = splits.conversations
    assert counts is not None
    for name, cut in (("training", counts.train), ("validation", counts.val)):
        note = "".join([f", {cut.cut:,} cut at a turn to fit the context of {model.context_length}" if cut.cut else "",
                        f", {cut.dropped:,} left out (the first exchange alone is longer)" if cut.dropped else ""])
        console.print(f"Conversations ({name}): {cut.kept:,}{note}")
    if counts.bad_records:
        console.print(f"[yellow]{counts.bad_records:,} conversation record(s) skipped; first: "
                      f"{counts.first_bad_record}[/]")
    learned = int(splits.train_mask.sum()) if splits.train_mask is not None else 0
    console.print(f"Learning the assistant's turns only: {learned:,} of {len(splits.train):,} training tokens; "
                  f"validation scores the assistant's tokens of held-out conversations")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_splits(splits, model.context_length)
    distributed.check_same(context, "configuration or conversations",
                           [to_dict(model), to_dict(plan.train), len(splits.train), len(splits.val)])
    facts = _config_facts(plan, text.record, train_tokens=len(splits.train), val_tokens=len(splits.val),
                          files=len(text.train.files), text_bytes=text.train.total_bytes)
    facts["chat"] = {"conversations": counts.train.kept, "cut": counts.train.cut, "left_out": counts.train.dropped,
                     "learned_tokens": learned}
    return TrainingText(tok, splits, model, facts)


def _config_facts(plan: RunPlan, validation: dict[str, Any], *, train_tokens: int, val_tokens: int, files: int,
                  text_bytes: int) -> dict[str, Any]:
    """What config.json records beside the configs: the text trained and validated on, and the plan's own facts."""
    # Absolute paths, so that --resume (which reuses them) works from any folder.
    return {**plan.saved, "corpus": {"paths": [os.path.abspath(p) for p in plan.paths], "files": files,
                                     "text_bytes": text_bytes, "tokens": train_tokens,
                                     "text_field": plan.text_field},
            "validation": {**validation, "tokens": val_tokens,
                           "tokenizer": plan.saved.get("validation", {}).get("tokenizer") or (
                               f"from --init-from {plan.init_from}" if plan.init_from is not None
                               else "given with --tokenizer" if plan.tokenizer is not None
                               else "trained here, on the training text only")}}


def _build_trainer(plan: RunPlan, encoded: TrainingText, context: Distributed, console: Console) -> Trainer:
    """The trainer, its CPU choices settled (in every process: they must agree on Muon's precision), described."""
    from lm.chat import DEFAULT_CHAT_FORMAT
    from lm.train import Trainer, TrainingSetup

    setup = TrainingSetup(plan.out, encoded.model, plan.train, encoded.tokenizer, encoded.splits,
                          resume=plan.resume, distributed=context, extra_config=encoded.facts,
                          init_weights=plan.init_weights, evaluate_at_start=plan.init_from is not None,
                          chat_format=DEFAULT_CHAT_FORMAT if plan.chat else None)
    trainer = Trainer(setup)
    cpu_choices = trainer.choose_cpu_options()
    _describe_start(console, trainer)
    if cpu_choices is not None:
        console.print(_describe_cpu(cpu_choices))
    return trainer


SHAPE_OPTIONS = ("n_layer", "n_head", "d_model", "d_ff", "pos_encoding", "norm", "mlp", "bias", "tie_embeddings",
                 "residual_scalars", "logit_softcap", "value_embeddings", "smear", "bigram_buckets", "qk_gain")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _init_from(source: Path, out: Path, *, tokenizer: Path | None, vocab_size: int | None, preset: str | None,
               model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> tuple[Any, Any, Path, dict]:
    """The model, schedule, weights and config.json facts of a new run that starts from `source`'s weights."""
    from lm import rundir
    from lm.config import finetune_defaults, with_overrides
    from lm.errors import InputError, UsageError

    if source.resolve() == out.resolve():
        raise UsageError("--init-from starts a new run; to continue the run in --out itself, use --resume")
    info = rundir.read_config(source)
    weights = source / rundir.WEIGHTS
    if not weights.is_file() or not (source / rundir.TOKENIZER).is_file():
        raise InputError(f"{source} has no {rundir.WEIGHTS} and {rundir.TOKENIZER} to start from; "
                         "train it until its first checkpoint, or `lm import` a checkpoint")
    for given, flag in ((tokenizer, "--tokenizer"), (vocab_size, "--vocab-size"), (preset, "--preset")):
        if given is not None:
            what = "tokenizer" if flag != "--preset" else "model shape"
            raise UsageError(f"--init-from uses {source}'s {what}, so {flag} cannot apply; drop {flag}")
    for name in SHAPE_OPTIONS:
        value = model_overrides.get(name)
        if value is not None and value != getattr(info.model, name):
            raise UsageError(f"--init-from keeps {source}'s shape, but {_flag(name)} {value} would change it "
                             f"(the model has {getattr(info.model, name)}); drop {_flag(name)}")
    context = model_overrides.get("context_length")
    if context is not None and context > info.model.context_length:
        raise UsageError(f"--context-length {context} is longer than {source}'s {info.model.context_length}: the "
                         "model has learned no positions beyond it; use a length up to that, or leave it out")
    model_config = with_overrides(info.model, {"context_length": context, "dropout": model_overrides.get("dropout")})
    train_config = with_overrides(finetune_defaults(info.train), train_overrides)
    checkpoint = rundir.latest_checkpoint(source)
    origin = {"run": str(source.resolve()), "step": int(checkpoint.name.removeprefix("step-")) if checkpoint else None}
    for key in ("imported_from", "architecture"):
        if key in info.extra:
            origin[key] = info.extra[key]
    return model_config, train_config, weights, {"init_from": origin}


def _check_resume_agrees(out: Path, info: Any, *, paths: list[str] | None, val: list[str] | None,
                         tokenizer: Path | None, vocab_size: int | None, preset: str | None,
                         text_field: str | None, val_fraction: float | None, init_from: Path | None,
                         model_overrides: dict[str, Any]) -> None:
    """--resume accepts the options of the command that started the run; name every one that disagrees."""
    from lm import rundir
    from lm.config import preset as named_preset
    from lm.config import to_dict, with_overrides
    from lm.errors import UsageError
    from lm.textfiles import find_text_files
    from lm.tokenizer import Tokenizer

    saved, conflicts = info.extra, []
    corpus, validation = saved.get("corpus", {}), saved.get("validation", {})
    if paths and corpus.get("paths") and [os.path.abspath(p) for p in paths] != corpus["paths"]:
        conflicts.append(f"PATH {' '.join(paths)} (the run trains on {' '.join(corpus['paths'])})")
    if tokenizer is not None and (Tokenizer.from_file(tokenizer).to_str()
                                  != Tokenizer.from_file(out / rundir.TOKENIZER).to_str()):
        conflicts.append(f"--tokenizer {tokenizer} (not the tokenizer the run was trained with)")
    if vocab_size is not None and vocab_size != info.model.vocab_size:
        conflicts.append(f"--vocab-size {vocab_size} (the run has {info.model.vocab_size})")
    if preset is not None:
        recorded = saved.get("preset")
        shape = with_overrides(named_preset(preset).model, {**model_overrides, "vocab_size": info.model.vocab_size})
        if recorded != preset and (recorded is not None or to_dict(shape) != to_dict(info.model)):
            conflicts.append(f"--preset {preset} (the run was started with {recorded or 'another shape'})")
    if text_field is not None and text_field != corpus.get("text_field", "text"):
        conflicts.append(f"--text-field {text_field} (the run reads {corpus.get('text_field', 'text')!r})")
    if val:
        given = sorted(str(p.resolve()) for p in find_text_files(val).files)
        if given != sorted(validation.get("paths") or []):
            conflicts.append("--val (the run validates on " + (
                "other files)" if validation.get("paths") else f"the last {info.train.val_fraction:.0%} of its text)"))
    if val_fraction is not None and val_fraction != info.train.val_fraction and not validation.get("paths"):
        conflicts.append(f"--val-fraction {val_fraction} (the run holds out {info.train.val_fraction})")
    if init_from is not None and str(init_from.resolve()) != saved.get("init_from", {}).get("run"):
        conflicts.append(f"--init-from {init_from} (the run did not start from it)")
    if conflicts:
        raise UsageError(f"--resume continues {out} as it was started, and these options conflict with it: "
                         f"{'; '.join(conflicts)}; drop them, or start a new run")
    rundir.check_same_model(info.model, with_overrides(info.model, model_overrides))


def _launch_processes(nproc: int) -> int:
    """Run this same command under torchrun with `nproc` processes on this machine; return its exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from lm.distributed import DistributedError

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the processes speak for themselves
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "lm", *args]))
    except SignalException:  # Ctrl-C or SIGTERM reached the launcher; the processes stopped and saved
        return 130
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes <= {130, -2, -15}:  # stopped by Ctrl-C or SIGTERM: process 0 said how to resume
            return 130
        rank, failure = min(err.failures.items())
        raise DistributedError(f"process {rank} of {nproc} failed (exit code {failure.exitcode}); its message is "
                               "above") from None
    return 0


def _shared_tokenizer(context: Distributed, sources: TextFiles, vocab_size: int | None,
                      console: Console) -> Tokenizer:
    """Trained once, by process 0, and handed to the others."""
    from lm import distributed
    from lm.tokenizer import Tokenizer

    text = [_train_tokenizer(sources, vocab_size, console).to_str()] if context.is_main else [""]
    distributed.broadcast(context, text)
    return Tokenizer.from_str(text[0])


def _shared_corpus(context: Distributed, sources: TextFiles, tok: Tokenizer, console: Console,
                   what: str = "Corpus") -> TokenCorpus:
    """Encoded once, by process 0; the others then find it in the cache."""
    from lm import distributed

    corpus = _tokenize(sources, tok, console, what) if context.is_main else None
    distributed.barrier(context)
    return corpus if corpus is not None else _tokenize(sources, tok, console, what)


def _describe_validation(console: Console, record: dict[str, Any], *, val_given: bool, tokenizer: Path | None,
                         train_paths: list[str]) -> None:
    """Say what the run validates on, and when its figures could flatter it."""
    from lm.cli.render import human_bytes

    size = f"{human_bytes(record['text_bytes'])} in {record['files']:,} file{'s' if record['files'] != 1 else ''}"
    if val_given:
        console.print(f"Validation: the --val text ({size}), kept out of training.")
    else:
        console.print(f"Validation: the last {record['fraction']:.0%} of the text ({size}, from byte "
                      f"{record['at_byte']:,} of {Path(record['starts_in']).name}), kept out of training.")
    if tokenizer is not None:
        leave_out = "without the --val files" if val_given else "on the text minus its validation tail (or use --val)"
        console.print(f"[yellow]Note:[/] bits per byte are honest only if {tokenizer} was trained without the "
                      "validation text (a tokenizer that saw it makes it look 7-12% easier); train one with "
                      f"`lm train-tokenizer {' '.join(train_paths)}` {leave_out}, or drop --tokenizer.")


def _train_tokenizer(sources: TextFiles, vocab_size: int | None, console: Console) -> Tokenizer:
    from lm.cli.render import byte_progress, human_bytes
    from lm.textfiles import text_bytes
    from lm.tokenizer import TokenizerConfig, default_vocab_size, train_tokenizer

    text = text_bytes(sources)
    config = TokenizerConfig(vocab_size=default_vocab_size(text) if vocab_size is None else vocab_size)
    sized = "" if vocab_size is not None else f" (sized to its {human_bytes(text)}; --vocab-size to choose)"
    console.print(f"No --tokenizer given: training a {config.vocab_size:,}-token BPE tokenizer on the training text "
                  f"first{sized}.")
    with byte_progress(console) as progress:
        task = progress.add_task("tokenizer", total=sources.total_bytes)
        tok, report = train_tokenizer(sources, config, lambda n, _: progress.update(task, completed=n))
    console.print(f"Tokenizer: {report.vocab_size:,} tokens, {report.bytes_per_token:.2f} bytes/token "
                  f"({report.seconds:.1f} s); it is saved in the run directory.")
    return tok


def _tokenize(sources: TextFiles, tok: Tokenizer, console: Console, what: str = "Corpus") -> TokenCorpus:
    from lm.cli.render import byte_progress, human_bytes
    from lm.data import tokenize_corpus

    with byte_progress(console) as progress:
        task = progress.add_task("encoding", total=sources.total_bytes)
        corpus = tokenize_corpus(sources, tok, lambda done, total: progress.update(task, completed=done))
    how = "cached" if corpus.reused else "encoded"
    files = f"{corpus.files:,} file{'s' if corpus.files != 1 else ''}"
    console.print(f"{what.capitalize()}: {files}, {human_bytes(corpus.text_bytes)} -> {len(corpus.tokens):,} "
                  f"tokens ({how}: {corpus.path})")
    if corpus.bad_records:
        console.print(f"[yellow]Skipped {corpus.bad_records:,} bad record{'s' if corpus.bad_records != 1 else ''}"
                      f"[/] (first: {corpus.first_bad_record})", highlight=False)
    return corpus


def _describe_start(console: Console, trainer: Trainer) -> None:
    setup, config, model = trainer.setup, trainer.config, trainer.model
    shape = setup.model_config
    console.print(
        f"Model: {model.num_parameters():,} parameters ({shape.n_layer} layers x {shape.d_model} wide, "
        f"{shape.n_head} heads, {shape.pos_encoding} positions, {shape.norm}, {shape.mlp}"
        f"{', qk-norm' if shape.qk_norm else ''}), "
        f"context {shape.context_length}")
    precision = str(trainer.dtype).removeprefix("torch.")
    compiled = ", compiled" if config.compile else ""
    length = (f"{config.time_budget:,.0f} s of steps (evaluation and saving included)" if config.time_budget
              else f"{config.max_steps:,} steps")
    iterations = "Polar Express" if config.muon_polar_express else "Newton-Schulz"
    normuon = f", NorMuon {config.normuon_beta2:g}" if config.normuon_beta2 else ""
    optimizer = (f"{config.optimizer} (Muon lr x {config.muon_lr_scale:g}, {config.muon_ns_steps} {iterations} steps"
                 f"{normuon})" if config.optimizer == "muon" else "adamw")
    console.print(
        f"Training: {length} x {trainer.tokens_per_step:,} tokens (batch {config.batch_size}"
        + (f" over {trainer.dist.world_size} processes" if trainer.dist.world_size > 1 else "")
        + f" x accum {config.grad_accum} x context {shape.context_length}), {optimizer}, lr {config.lr:g}, on "
        f"{trainer.device.type} in {precision}{compiled}"
        + ("; windows read in epochs (--windows)" if config.windows == "epochs" else "")
        + (f"; saves the weights' average (--ema-decay {config.ema_decay:g})" if config.ema_decay else "")
        + (f"; {config.repeat_windows:.0%} of the windows a passage given twice (--repeat-windows)"
           if config.repeat_windows else "")
        + (f"; resuming at step {trainer.step:,}" if setup.resume else ""))


def _describe_cpu(choices: CpuChoices) -> str:
    """'CPU: AMD EPYC, PyTorch's AVX2 kernels, 2 threads; products by oneDNN for 4 of 5 layer shapes (measured); ...'"""
    def how(forced: bool, variable: str) -> str:
        return f"forced by {variable}" if forced else "measured here"

    parts = [f"CPU: {choices.cpu}, PyTorch's {choices.vector_kernels} kernels, {choices.threads} threads"]
    if choices.matmul:
        onednn = sum(kernel == "onednn" for kernel in choices.matmul.values())
        parts.append(f"float32 products by oneDNN for {onednn} of {len(choices.matmul)} layer shapes, MKL for the "
                     f"rest ({how(choices.matmul_forced, 'LM_CPU_MATMUL')})")
    if choices.newton_schulz:
        precisions = sorted(set(choices.newton_schulz.values()))
        parts.append(f"Muon's Newton-Schulz in {' and '.join(precisions)} "
                     f"({how(choices.newton_schulz_forced, 'LM_MUON_NS_DTYPE')})")
    return "; ".join(parts)


def _run_with_progress(trainer: Trainer, console: Console) -> TrainOutcome:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        # A second Ctrl-C stops at once (the last checkpoint on disk is complete). Under torchrun the
        # launcher forwards a SIGTERM right after the terminal's SIGINT: that one must not abort the save.
        if stop_requested and not trainer.dist.enabled:
            raise KeyboardInterrupt
        stop_requested = True
        console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(press Ctrl-C again to stop at once)[/]")

    budget = trainer.config.time_budget
    # With a time budget the bar counts seconds (the steps are shown in the status), else steps.
    counter = TextColumn("{task.completed:,.0f}/{task.total:,.0f} s") if budget else MofNCompleteColumn()
    progress = Progress(
        TextColumn("step" if not budget else "time"), counter, BarColumn(), TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    task = progress.add_task("train", total=budget or trainer.config.max_steps,
                             completed=trainer.elapsed_s if budget else trainer.step, status="")

    def on_update(update: TrainUpdate) -> None:
        if update.loss is not None:
            status = (f"step {update.step:,}  " if budget else "") + \
                f"loss {update.loss:.3f}  {update.tokens_per_s:,.0f} tok/s"
            if update.mfu is not None:
                status += f"  MFU {update.mfu:.0%}"
            progress.update(task, status=status)
        progress.update(task, completed=update.elapsed_s if budget else update.step)
        if update.evaluation is not None:
            _print_evaluation(progress.console, update.step, update.elapsed_s, update.evaluation)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress:
            return trainer.run(on_update, lambda: stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_evaluation(console: Console, step: int, elapsed: float, evaluation: Evaluation) -> None:
    from rich.text import Text

    train = f"train {evaluation.train_loss:.3f}  " if evaluation.train_loss is not None else ""
    console.print(f"step {step:>6,}  {train}val {evaluation.val_loss:.3f}  "
                  f"[bold]{evaluation.val_bpb:.3f} bits/byte[/]  {elapsed:,.0f} s")
    if evaluation.heads is not None:
        console.print("  " + _describe_heads(evaluation.heads), highlight=False)
    if evaluation.sample:
        console.print(Text("  " + evaluation.sample.strip().replace("\n", "\n  "), style="dim"))


def _describe_heads(heads: HeadTracking) -> str:
    """'best previous-token 0.62 (L1.H0), best induction 0.31 (L1.H3), in-context -0.52 nats'"""
    def best(scores: list[list[float]]) -> str:
        value, layer, head = max((score, layer, head) for layer, row in enumerate(scores)
                                 for head, score in enumerate(row))
        return f"{value:.2f} (L{layer}.H{head})"

    return (f"best previous-token {best(heads.previous_token)}, best induction {best(heads.induction)}, "
            f"in-context {heads.in_context:+.2f} nats")


def _describe_end(outcome: TrainOutcome, out: Path) -> None:
    from lm.cli.render import stderr, stdout

    of = f" of {outcome.max_steps:,}" if outcome.max_steps else ""
    if outcome.status == "already-done":
        more = "raise --max-steps" if outcome.max_steps else f"raise --time-budget (spent {outcome.elapsed_s:,.0f} s)"
        stderr().print(f"{out} is already at step {outcome.step:,}{of}; {more} to train further")
        return
    if outcome.status == "interrupted":
        stderr().print(f"Stopped at step {outcome.step:,}{of}; the checkpoint is saved. "
                       f"Continue with: lm train --out {out} --resume")
        return
    evaluation = outcome.evaluation
    summary = f"Trained {out}: {outcome.step:,} steps in {outcome.elapsed_s:,.0f} s"
    if evaluation is not None:
        summary += f", val loss {evaluation.val_loss:.3f}, {evaluation.val_bpb:.3f} bits/byte"
    stdout().print(summary)
    stdout().print(f"Look at it: lm info {out}")
