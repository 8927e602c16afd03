"""`lm presets`: the named model + training configurations `lm train --preset` accepts."""

from __future__ import annotations

from typing import Annotated

import typer


def command(
    vocab_size: Annotated[int, typer.Option(
        "--vocab-size", metavar="N", help="Vocabulary to count parameters with.")] = 8192,
) -> None:
    """List the presets: shape, parameter count and training defaults."""
    import torch
    from rich.table import Table

    from lm.cli.render import stdout
    from lm.config import PRESETS, with_overrides
    from lm.model import GPT

    table = Table(title="lm train --preset NAME", title_justify="left")
    for column in ("name", "shape", "design", "parameters", "steps x tokens", "lr", "about"):
        table.add_column(column, justify="right" if column in ("parameters", "lr") else "left")
    for preset in PRESETS.values():
        model, train = with_overrides(preset.model, {"vocab_size": vocab_size}), preset.train
        with torch.device("meta"):  # shapes only: no memory, no time
            parameters = GPT(model).num_parameters()
        tokens = train.batch_size * train.grad_accum * model.context_length
        table.add_row(preset.name, f"{model.n_layer} x {model.d_model}, {model.n_head} heads, T={model.context_length}",
                      f"{model.pos_encoding}, {model.norm}, {model.mlp}{', qk-norm' if model.qk_norm else ''}; "
                      f"{train.optimizer}{', weights averaged' if train.ema_decay else ''}",
                      f"{parameters / 1e6:.1f}M",
                      f"{train.max_steps:,} x {tokens:,}", f"{train.lr:g}", preset.description)
    stdout().print(table)
