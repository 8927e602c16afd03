"""`lm export`: write a run as a Hugging Face transformers checkpoint or as a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="PATH", show_default=False,
        help="Folder for the transformers checkpoint (hf), or the .gguf file to write (gguf).")],
    output_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT",
        help="hf: a folder transformers' from_pretrained loads; gguf: one file llama.cpp, Ollama and LM Studio run.",
    )] = "hf",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="TYPE", show_default=False,
        help="gguf only: weight type f32 (default), f16, bf16 or q8_0 (8-bit, a quarter of f32's size).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", metavar="", help="Replace --out if it exists.")] = False,
) -> None:
    """Export a run for Hugging Face transformers (GPT2LMHeadModel or LlamaForCausalLM) or llama.cpp (GGUF).

    --format hf writes a folder with config.json, model.safetensors, generation_config.json, tokenizer.json
    and tokenizer_config.json; AutoModelForCausalLM and AutoTokenizer load it offline, with no custom code.
    --format gguf writes one file with the weights, hyper-parameters and tokenizer, for llama.cpp's gpt2
    or llama architecture (needs the gguf package: pip install 'lm-from-text[gguf]').
    """
    from lm.errors import UsageError

    if output_format not in ("hf", "gguf"):
        raise UsageError(f"--format {output_format!r} is not supported; choose hf or gguf")
    from lm.cli.render import stdout

    if output_format == "gguf":
        from lm.gguf import export_gguf

        written = export_gguf(run_dir, out, dtype=dtype or "f32", force=force)
        stdout().print(f"Exported {run_dir} as llama.cpp {written.architecture} ({written.dtype}, "
                       f"{written.tensors} tensors, {written.bytes / 2**20:.1f} MiB, pre-tokenizer "
                       f"{written.pre_tokenizer}) to {out}\n"
                       f"Run it with llama.cpp: llama-completion -m {str(out)!r} -no-cnv -p 'ROMEO:'",
                       highlight=False, soft_wrap=True)
        return
    if dtype is not None:
        raise UsageError("--dtype is for --format gguf; a transformers export keeps the run's float32 weights")
    from lm.hf import export_run

    architecture = export_run(run_dir, out, force=force)
    stdout().print(f"Exported {run_dir} as {architecture} to {out}\n"
                   f"Load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
                   f"AutoTokenizer.from_pretrained({str(out)!r})", highlight=False, soft_wrap=True)
