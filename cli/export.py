"""`lm export`: write a run as a Hugging Face transformers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False, help="Folder for the transformers checkpoint.")],
    output_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT", help="hf: a folder transformers' from_pretrained loads.")] = "hf",
    force: Annotated[bool, typer.Option("--force", "-f", metavar="", help="Replace --out if it is not empty.")] = False,
) -> None:
    """Export a run for Hugging Face transformers (GPT2LMHeadModel or LlamaForCausalLM).

    The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json and
    tokenizer_config.json; AutoModelForCausalLM and AutoTokenizer load it offline, with no custom code.
    """
    from lm.errors import UsageError

    if output_format != "hf":
        raise UsageError(f"--format {output_format!r} is not supported; the one format is hf")
    from cli.render import stdout
    from lm.hf import export_run

    architecture = export_run(run_dir, out, force=force)
    stdout().print(f"Exported {run_dir} as {architecture} to {out}\n"
                   f"Load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
                   f"AutoTokenizer.from_pretrained({str(out)!r})", highlight=False, soft_wrap=True)
