"""`lm inspect-embeddings`: the tokens nearest a word in embedding space, and a logit lens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False, help="A run directory written by `lm train`.")],
    word: Annotated[str, typer.Argument(
        metavar="TOKEN_OR_WORD", show_default=False, help="A word or token to look up.")],
    top: Annotated[int, typer.Option("--top", metavar="K", help="How many tokens to list.")] = 10,
    context: Annotated[str | None, typer.Option(
        "--context", metavar="TEXT", show_default=False,
        help="Also follow the token through the layers inside this text (a logit lens).")] = None,
) -> None:
    """Show the tokens nearest a word in embedding space, and how its prediction forms layer by layer.

    Words the model uses alike end up with similar embedding vectors (cosine similarity near 1).
    With --context, the residual stream at the word's position is read out after the embedding and
    after every block, as if the model stopped there.
    """
    from rich.table import Table
    from rich.text import Text

    from lm.errors import UsageError

    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if context is not None and not context:
        raise UsageError("--context is empty; give a text that contains the word")

    from lm.checkpoint import load_run
    from lm.cli.render import stdout
    from lm.inspect import logit_lens, nearest_tokens, resolve_token
    from lm.tokenizer import visible_text

    model, tokenizer, _ = load_run(run_dir)
    ids = resolve_token(tokenizer, word)
    shown = " + ".join(visible_text(tokenizer.token_bytes(i)) for i in ids)
    how = "token" if len(ids) == 1 else f"mean of its {len(ids)} tokens"
    table = Table(title=f"nearest to {shown} ({how}) by cosine similarity of embeddings", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    table.add_column("id", justify="right", style="dim")
    table.add_column("similarity", justify="right")
    for rank, (token_id, similarity) in enumerate(nearest_tokens(model, tokenizer, ids, top), start=1):
        table.add_row(str(rank), Text(visible_text(tokenizer.token_bytes(token_id))), str(token_id),
                      f"{similarity:.3f}")
    stdout().print(table)
    if context is None:
        return
    position, layers = logit_lens(model, tokenizer, context, ids, min(top, 5))
    lens = Table(title=f"logit lens at position {position} ({shown}): the likeliest next tokens, read out after "
                       "each stage", title_justify="left")
    lens.add_column("after")
    lens.add_column("likeliest next tokens (probability)")
    for stage, best in enumerate(layers):
        line = Text()
        for token_id, prob in best:
            line.append(visible_text(tokenizer.token_bytes(token_id)), style="bold")
            line.append(f" {prob:.2f}   ", style="dim")
        lens.add_row("embedding" if stage == 0 else f"block {stage - 1}", line)
    stdout().print(lens)
