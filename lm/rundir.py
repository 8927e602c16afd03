"""Run directories: the folder a training run writes and every other command reads.

    RUN_DIR/
      config.json          model and training configuration, tokenizer and corpus facts
      tokenizer.json       the tokenizer the model was trained with
      model.safetensors    the latest weights, for `lm generate` and friends
      metrics.jsonl        one JSON object per logged step (see README: "metrics.jsonl")
      train_state/
        latest.json        names the newest complete checkpoint: the commit point
        step-000400/       model.safetensors + state.pt (optimizer, step, RNG and data-sampler states)

This module keeps the bookkeeping (configuration, metrics, which checkpoint is current) and needs no
torch, so commands that only read a run's facts start at once; `lm.checkpoint` reads and writes tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm import __version__
from lm.atomic import atomic_write_text
from lm.config import ModelConfig, TrainConfig, from_dict, to_dict
from lm.errors import InputError, OutputError, UsageError

CONFIG, WEIGHTS, TOKENIZER, METRICS, STATE_DIR = (
    "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "train_state")
RUN_FILES = (CONFIG, WEIGHTS, TOKENIZER, METRICS, STATE_DIR)
STATE = "state.pt"


@dataclass
class RunInfo:
    """What config.json holds besides the two configurations."""

    model: ModelConfig
    train: TrainConfig
    extra: dict[str, Any]


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> None:
    """Check that `path` may receive a run, before any work; with `force`, clear an old run out of it.

    Only the files a run consists of are removed; anything else in the folder is left alone.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file; --out needs a folder for the run")
    # A tokenizer.json alone is not a run (users may keep the one they pass with --tokenizer there).
    has_run_files = path.is_dir() and any((path / name).exists() for name in (CONFIG, WEIGHTS, STATE_DIR))
    if resume:
        if latest_checkpoint(path) is None:
            raise InputError(f"{path} has no checkpoint to resume; start the run without --resume")
        return
    if has_run_files and not force:
        raise OutputError(f"{path} already holds a run; pass --resume to continue it or --force to replace it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {path} ({err.strerror}); choose another --out") from None
    if has_run_files:
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def write_config(path: Path, model: ModelConfig, train: TrainConfig, extra: dict[str, Any]) -> None:
    payload = {"lm_version": __version__, "model": to_dict(model), "train": to_dict(train), **extra}
    atomic_write_text(path / CONFIG, json.dumps(payload, indent=2) + "\n")


def read_config(path: Path) -> RunInfo:
    try:
        payload = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is not a run directory (no {CONFIG}); train one with `lm train`") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path / CONFIG} cannot be read ({err}); the run directory is damaged") from None
    model = from_dict(ModelConfig, payload.get("model", {}))
    train = from_dict(TrainConfig, payload.get("train", {}))
    extra = {k: v for k, v in payload.items() if k not in ("model", "train")}
    return RunInfo(model.validate(), train, extra)


def latest_checkpoint(path: Path) -> Path | None:
    """The folder of the newest complete checkpoint, or None."""
    try:
        pointer = json.loads((path / STATE_DIR / "latest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = path / STATE_DIR / pointer.get("checkpoint", "")
    return folder if (folder / WEIGHTS).is_file() and (folder / STATE).is_file() else None


def check_same_model(saved: ModelConfig, requested: ModelConfig) -> None:
    """On --resume the architecture is fixed: name the first option that tries to change it."""
    for field_name, old in to_dict(saved).items():
        new = getattr(requested, field_name)
        if new != old:
            flag = "--" + field_name.replace("_", "-")
            raise UsageError(f"--resume keeps the model's shape, but {flag} is {new!r} and the run has {old!r}; "
                             f"drop {flag} or start a new run")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with (path / METRICS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl (a line torn by a crash is skipped)."""
    records = []
    try:
        lines = (path / METRICS).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from, so no step appears twice."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


@dataclass
class LearningCurves:
    """What metrics.jsonl says about how a run learned, against wall-clock time and tokens seen."""

    name: str
    time_s: list[float]  # training loss, at every logged step
    tokens: list[int]
    loss: list[float]  # nats per token
    val_time_s: list[float]  # validation, at every evaluation
    val_tokens: list[int]
    val_bpb: list[float]
    # With --track-heads, at every evaluation: the best head's scores (the largest over every layer and head)
    # and the in-context score, nats
    head_steps: list[int] = field(default_factory=list)
    previous_token: list[float] = field(default_factory=list)
    induction: list[float] = field(default_factory=list)
    in_context: list[float] = field(default_factory=list)


def learning_curves(path: Path, name: str | None = None) -> LearningCurves:
    """The run's curves so far (a run still training gives what it has logged).

    Tokens seen are the record's `tokens` when it has one, else step x batch x accumulation x context
    (the batch counts every process's windows, so this holds for distributed runs too).
    """
    info = read_config(path)
    per_step = info.train.batch_size * info.train.grad_accum * info.model.context_length
    curves = LearningCurves(name or path.name or str(path), [], [], [], [], [], [])
    for record in read_metrics(path):
        if "step" not in record or "time_s" not in record:
            continue
        tokens = int(record.get("tokens", record["step"] * per_step))
        if "loss" in record:
            curves.time_s.append(record["time_s"])
            curves.tokens.append(tokens)
            curves.loss.append(record["loss"])
        if "val_bpb" in record:
            curves.val_time_s.append(record["time_s"])
            curves.val_tokens.append(tokens)
            curves.val_bpb.append(record["val_bpb"])
        if "induction" in record:
            curves.head_steps.append(record["step"])
            curves.previous_token.append(max(max(layer) for layer in record["previous_token"]))
            curves.induction.append(max(max(layer) for layer in record["induction"]))
            curves.in_context.append(record["in_context"])
    return curves
