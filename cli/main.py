"""The `lm` entry point: registers the subcommands and turns library errors into one-line messages."""

from __future__ import annotations

import os
import sys

import typer

from lm.cli import (
    chat,
    corpus,
    evaluate,
    export,
    generate,
    import_hf,
    info,
    inspect_attention,
    inspect_embeddings,
    inspect_heads,
    presets,
    serve,
    tokenize_text,
    train,
    train_tokenizer,
)
from lm.cli.help_panels import GroupedHelpCommand

app = typer.Typer(
    name="lm",
    help="From raw text to a small GPT you can train, sample from and look inside.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
app.command("corpus")(corpus.command)
app.command("train-tokenizer")(train_tokenizer.command)
app.command("tokenize")(tokenize_text.command)
app.command("train")(train.command)
app.command("generate")(generate.command)
app.command("chat")(chat.command)
app.command("serve")(serve.command)
app.command("eval")(evaluate.command)
app.command("inspect-attention")(inspect_attention.command)
app.command("inspect-heads")(inspect_heads.command)
app.command("inspect-embeddings")(inspect_embeddings.command)
app.command("export")(export.command)
app.command("import")(import_hf.command)
app.command("info")(info.command)
app.command("presets")(presets.command)
for registered in app.registered_commands:
    registered.cls = GroupedHelpCommand  # --help lists options under their panels (cli/help_panels.py)


def _version(value: bool) -> None:
    if value:
        from lm import __version__

        typer.echo(f"lm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """From raw text to a small GPT you can train, sample from and look inside."""


def main(argv: list[str] | None = None) -> None:
    """Run `lm`. Errors become one line on standard error and a non-zero exit, unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is honoured anywhere on the line (before a bare `--`), not only before the subcommand.
    cut = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:cut] or os.environ.get("LM_DEBUG", "") not in ("", "0")
    if "--debug" in args[:cut]:
        args.remove("--debug")
    from lm.errors import LmError

    try:
        result = typer.main.get_command(app).main(args=args, prog_name="lm", standalone_mode=False)
    except LmError as err:
        if debug:
            raise
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as err:
        # Typer raises click's exceptions, or since 0.2x those of its own copy of click: recognise them
        # by shape (a usage error carries a message and an exit code) rather than by import.
        if _is_a(err, "Abort"):
            _fail("interrupted", 130)
        if _is_a(err, "UsageError", "ClickException", "TyperException") and not debug:
            context = getattr(err, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if _is_a(err, "UsageError") and context else ""
            _fail(f"{err.format_message()}{hint}", getattr(err, "exit_code", 2))
        if debug:
            raise
        _fail(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback and "
              "report it)", 1)
    sys.exit(result if isinstance(result, int) else 0)


def _is_a(err: BaseException, *class_names: str) -> bool:
    return any(cls.__name__ in class_names for cls in type(err).__mro__)


def _fail(message: str, code: int) -> None:
    first_line = " ".join(message.split())  # one line, whatever the message held
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
