"""The attention explorer: one self-contained HTML page filled with `lm.inspect.inspection_data`.

The page is `assets/attention.html` with `attention.css`, `attention.js` and the data inlined: it needs
no network and opens from disk. The data is the `--format json` document, with one change for size:
each text's weights travel as bytes, round(100 x weight) (to the nearest 0.01, the precision the
terminal shows), the rows' lower triangles one after another, compressed (zlib) and base64-encoded;
the page unpacks them into the same `weights` rows. As JSON, 12 layers x 12 heads x 256 tokens take
about 60 MB; packed, even attention as irregular as random logits (the hard case) takes 1.5 MB.

`lm inspect-heads --save` writes the same page with its own `--format json` document added to the data
as `inspect_heads`: the page then shows the head-effects view (the ablation heat map, the tokens each
head helps most, the attribution bars) and the detector scores in the model view.
"""

from __future__ import annotations

import base64
import json
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch

WEIGHT_STEPS = 100  # weights to the nearest 0.01, as the terminal shows them: the page stays small
PACKING = "uint8 = round(100 x weight), row by row (query 0..n-1, keys 0..query), entry by entry; zlib; base64"


VIEWS = ("head", "model", "gravity", "effects")  # "effects" needs the data's `inspect_heads`


def attention_page(data: dict[str, Any], *, layer: int, head: int | None, view: str = "head") -> str:
    """The page for `data` (as `inspection_data` returns it, every layer and head, with `inspect_heads`
    optionally), opening on `view` (one of VIEWS) at `layer` and `head` (None: the mean of the heads)."""
    if view not in VIEWS or (view == "effects" and "inspect_heads" not in data):
        raise ValueError(f"no {view!r} view for this data")
    assets = resources.files("lm.cli") / "assets"
    page = dict(data, opening={"layer": layer, "head": "mean" if head is None else head, "view": view})
    page = pack_weights(page)
    if "compare" in page:
        page["compare"] = pack_weights(page["compare"])
    # "<" never appears in the JSON outside strings, where \u003c means the same: no "</script>" or "<!--"
    # in a token can end the script element early.
    payload = json.dumps(page, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    html = (assets / "attention.html").read_text(encoding="utf-8")
    for marker, asset in (("/*STYLE*/", "attention.css"), ("/*SCRIPT*/", "attention.js")):
        html = html.replace(marker, (assets / asset).read_text(encoding="utf-8"))
    return html.replace("__DATA__", payload, 1)  # last, so nothing in the data is taken for a marker


def pack_weights(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of one text's data whose attention entries hold no weights, with `packed_weights` instead."""
    entries = data["attention"]
    below = tuple(torch.tril_indices(len(data["tokens"]), len(data["tokens"])))  # row by row, keys 0..query
    flat = torch.cat([entry["weights"][below] for entry in entries]) if entries else torch.zeros(0)
    quantized = (flat.clamp(0.0, 1.0) * WEIGHT_STEPS).round().to(torch.uint8).numpy()
    # Run-length matching only: 10x faster than deflate's default search on these bytes (mostly short
    # runs of small codes) and smaller too (see the module docstring).
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    packed = base64.b64encode(compressor.compress(quantized.tobytes()) + compressor.flush()).decode("ascii")
    return dict(data, attention=[{k: v for k, v in entry.items() if k != "weights"} for entry in entries],
                packed_weights={"format": PACKING, "steps": WEIGHT_STEPS, "data": packed})


def write_page(path: Path, data: dict[str, Any], *, layer: int, head: int | None, view: str) -> None:
    """Write `attention_page` to `path` (`announce_page` then says where it is)."""
    from lm.atomic import atomic_write_text

    atomic_write_text(path, attention_page(data, layer=layer, head=head, view=view))


def announce_page(path: Path) -> None:
    from lm.cli.render import human_bytes, stderr

    stderr().print(f"wrote the attention explorer to {path} ({human_bytes(path.stat().st_size)}): open it in a web "
                   f"browser, e.g. file://{path.resolve()}", soft_wrap=True)
