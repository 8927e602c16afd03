"""Checkpoints: the tensors of a run directory (weights and training state), written atomically.

A checkpoint is first written to a temporary folder, flushed, and renamed into place as
`train_state/step-NNNNNN/`; only then does `train_state/latest.json` (itself replaced atomically) point
to it, and only then is the top-level `model.safetensors` swapped for a hard link to the new weights.
A crash at any instant therefore leaves `latest.json` naming a complete checkpoint and
`model.safetensors` holding whole weights. Weights are stored with safetensors; the training state
with `torch.save`, and it is read back only with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers. The bookkeeping around them lives in `lm.rundir`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm.atomic import atomic_open, atomic_write_text
from lm.config import ModelConfig
from lm.errors import InputError
from lm.model import GPT
from lm.rundir import CONFIG, STATE, STATE_DIR, TOKENIZER, WEIGHTS, RunInfo, latest_checkpoint, read_config
from lm.tokenizer import Tokenizer


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: each tensor once (a tied output head is the embedding), no compile prefixes."""
    model = getattr(model, "_orig_mod", model)
    return deduplicate(model.state_dict(), model.config)


def deduplicate(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A gathered state dict in the saved form: the tied output head is the embedding, stored once."""
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_weights(model: GPT, path: Path, *, shorter_context: bool = False, grow_vocab: bool = False) -> None:
    """Fill `model` from a safetensors file, checking that every tensor is there and of the right shape.

    With `shorter_context`, a table of learned positions longer than the model's context is cut to its
    first rows (a model fine-tuned with a smaller --context-length keeps the positions it knows). With
    `grow_vocab`, token rows the file lacks are added (a base run fine-tuned on conversations gains the
    chat tokens: `lm.chat.grow_vocab_weights`).
    """
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path} cannot be read ({err}); the run directory is damaged") from None
    if grow_vocab:
        from lm.chat import grow_vocab_weights

        weights = grow_vocab_weights(weights, model.config.vocab_size)
    positions = weights.get("pos_emb.weight")
    if shorter_context and positions is not None and len(positions) > model.config.context_length:
        weights["pos_emb.weight"] = positions[:model.config.context_length].contiguous()
    expected = model_state_dict(model)
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    wrong = [k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {sorted(missing)[:3]}" if missing else
                  f"unexpected {sorted(unexpected)[:3]}" if unexpected else f"shape of {wrong[:3]}")
        raise InputError(f"{path} does not match {CONFIG} ({detail}); the run directory is damaged or mixed up")
    model.load_state_dict(weights, strict=False)  # the tied head is the embedding, not saved twice


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], step: int) -> None:
    """Write weights and training state for `step` as one all-or-nothing checkpoint (see module docstring)."""
    state_dir = path / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    name = f"step-{step:06d}"
    final = state_dir / name
    staging = Path(tempfile.mkdtemp(dir=state_dir, prefix=f".{name}.", suffix=".partial"))
    try:
        save_file(weights, str(staging / WEIGHTS), metadata={"step": str(step)})
        torch.save(state, staging / STATE)
        for file in staging.iterdir():
            _fsync(file)
        if final.exists():  # the same step saved again (a resumed run interrupted at once)
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(state_dir / "latest.json", json.dumps({"checkpoint": name, "step": step}) + "\n")
    _publish_weights(final / WEIGHTS, path / WEIGHTS)
    for old in state_dir.iterdir():
        if old.name.startswith(("step-", ".step-")) and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint's folder and its training state (tensors and plain containers only)."""
    folder = latest_checkpoint(path)
    if folder is None:
        raise InputError(f"{path} has no complete checkpoint to resume; start the run without --resume")
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    return folder, state


def load_run(path: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, RunInfo]:
    """The trained model (in eval mode) and tokenizer of a run directory, checked against each other."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a run directory; give the --out folder of an `lm train` run")
    info = read_config(path)
    tokenizer = Tokenizer.from_file(path / TOKENIZER)
    if tokenizer.vocab_size != info.model.vocab_size:
        raise InputError(f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model was built for "
                         f"{info.model.vocab_size}; the run directory is mixed up")
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{path} has no {WEIGHTS} yet; train (or resume) until the first checkpoint is saved")
    model = GPT(info.model)
    load_weights(model, path / WEIGHTS)
    return model.to(device).eval(), tokenizer, info


def _publish_weights(source: Path, target: Path) -> None:
    """Point `target` at `source`'s bytes atomically: a hard link if the filesystem allows, else a copy."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        with source.open("rb") as src, atomic_open(target) as out:
            shutil.copyfileobj(src, out)


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
