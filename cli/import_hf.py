"""`lm import`: turn a local Hugging Face transformers checkpoint into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    folder: Annotated[Path, typer.Argument(
        metavar="DIR", show_default=False, help="A transformers checkpoint folder (GPT-2 or Llama family).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="RUN_DIR", show_default=False, help="The run directory to create.")],
    force: Annotated[bool, typer.Option("--force", "-f", metavar="", help="Replace --out if it is not empty.")] = False,
) -> None:
    """Import a transformers checkpoint (safetensors, single file or sharded) as a run directory.

    `lm generate` and `lm inspect-attention` then work on it.
    """
    from lm.cli.render import stdout
    from lm.hf import import_checkpoint

    architecture, config = import_checkpoint(folder, out, force=force)
    stdout().print(f"Imported {architecture} ({config.n_layer} layers x {config.d_model}, vocab "
                   f"{config.vocab_size:,}, context {config.context_length:,}) into {out}", highlight=False)
