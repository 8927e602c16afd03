"""`lm tokenize`: show how a text splits into tokens, one row per token."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def command(
    tokenizer: Annotated[Path, typer.Argument(
        show_default=False,
        help="A tokenizer.json, or a folder that holds one.")],
    text: Annotated[str, typer.Argument(
        show_default=False,
        help="The text to split; - reads standard input.")],
    allow_special: Annotated[bool, typer.Option(
        "--allow-special", metavar="",
        help="Read special-token strings such as <|endoftext|> as those tokens.")] = False,
) -> None:
    """Show the tokens a text becomes.

    One row per token: its id, the token with whitespace made visible, and its bytes.
    """
    from rich.table import Table
    from rich.text import Text

    from lm.cli.render import stdout
    from lm.errors import InputError
    from lm.tokenizer import Tokenizer, enclosing_characters, visible_text

    if text == "-":
        text = sys.stdin.read()
    if not text:
        raise InputError("the text is empty; give some text to tokenize (or - to read standard input)")
    tok = Tokenizer.from_file(tokenizer)
    ids = tok.encode(text, allow_special=allow_special)
    special_ids = set(tok.special_tokens.values())
    text_bytes = text.encode("utf-8")
    size = len(text_bytes)
    table = Table(title=f"{len(ids):,} tokens for {size:,} bytes ({size / len(ids):.2f} bytes/token)",
                  title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("token")
    table.add_column("bytes", style="dim")
    offset = 0
    for position, token_id in enumerate(ids):
        data = tok.token_bytes(token_id)
        # Text(), not a markup string: a token such as "[bold]" must be shown, never interpreted.
        token = Text(visible_text(data), style="bold magenta" if token_id in special_ids else "")
        if not _is_whole_utf8(data):
            token.append(f"  part of {enclosing_characters(text_bytes, offset, offset + len(data))}", style="dim")
        table.add_row(str(position), str(token_id), token, data.hex(" "))
        offset += len(data)
    stdout().print(table)


def _is_whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
