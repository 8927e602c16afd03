"""The attention explorer page (`lm inspect-attention --save FILE.html`): its data, its size, and how it
behaves in a real browser (headless Chromium, skipped with a notice where none is installed).

Screenshots of each view go to $LM_SCREENSHOT_DIR when it is set (the README's come from
`LM_SCREENSHOT_RUN=runs/demo LM_SCREENSHOT_DIR=docs/images pytest tests/test_page.py -k screenshots`),
else to a temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
from browser import Browser, find_chromium
from conftest import run_lm
from safetensors.torch import save_file

from lm import rundir
from lm.checkpoint import model_state_dict
from lm.cli.page import WEIGHT_STEPS, attention_page
from lm.config import ModelConfig, TrainConfig
from lm.inspect import inspection_data
from lm.model import GPT

TEXT = "ROMEO: But soft, what light through yonder window breaks?\n\tIt is the east, and Juliet is the sun."
OTHER = "JULIET: The sun is down, and the light of the east is gone."


def sharp_model(vocab: int, n_layer: int, n_head: int, d_model: int, context: int, sharpness: float = 12.0) -> GPT:
    """A random model whose queries and keys are scaled up, so its heads attend to a few tokens each
    (at initialisation they spread evenly, which would make every picture and size test trivial)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, context_length=context, n_layer=n_layer, n_head=n_head,
                            d_model=d_model))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:2 * d_model] *= sharpness
    return model.eval()


@pytest.fixture(scope="module")
def page_run(tmp_path_factory: pytest.TempPathFactory, sample_tokenizer) -> Path:
    run = tmp_path_factory.mktemp("page") / "run"
    run.mkdir()
    model = sharp_model(sample_tokenizer.vocab_size, n_layer=2, n_head=4, d_model=32, context=64)
    save_file(model_state_dict(model), str(run / rundir.WEIGHTS))
    sample_tokenizer.save(run / rundir.TOKENIZER)
    rundir.write_config(run, model.config, TrainConfig(), {"parameters": model.num_parameters()})
    return run


def page_document(html: str) -> dict:
    """The JSON document inside the page, its weights unpacked as the page's script unpacks them."""
    embedded = re.search(r'<script type="application/json" id="lm-data">(.*?)</script>', html, re.S)
    assert embedded is not None
    document = json.loads(embedded.group(1))
    for text in [document] + ([document["compare"]] if "compare" in document else []):
        packed = text.pop("packed_weights")
        codes = zlib.decompress(base64.b64decode(packed["data"]))
        n, offset = len(text["tokens"]), 0
        for entry in text["attention"]:
            entry["weights"] = []
            for query in range(n):
                entry["weights"].append([code / packed["steps"] for code in codes[offset:offset + query + 1]])
                offset += query + 1
        assert offset == len(codes)
    return document


@pytest.fixture(scope="module")
def page(page_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page of TEXT compared with OTHER, written by `lm inspect-attention --save`."""
    path = tmp_path_factory.mktemp("html") / "page.html"
    shown = run_lm("inspect-attention", page_run, "--text", TEXT, "--compare", OTHER, "--save", path)
    assert shown.returncode == 0, shown.stderr
    assert f"file://{path.resolve()}" in shown.stderr.replace("\n", "")  # it says where the page is
    return path


def test_the_page_carries_the_json_document(page_run: Path, page: Path) -> None:
    json_out = run_lm("inspect-attention", page_run, "--text", TEXT, "--compare", OTHER, "--format", "json",
                      "--layer", "all", "--head", "all")
    expected = json.loads(json_out.stdout)
    html = page.read_text(encoding="utf-8")
    found = page_document(html)
    assert found.pop("opening") == {"layer": 1, "head": "mean", "view": "head"}
    for text_found, text_expected in ((found, expected), (found["compare"], expected["compare"])):
        for entry_found, entry_expected in zip(text_found["attention"], text_expected["attention"], strict=True):
            for row_found, row_expected in zip(entry_found.pop("weights"), entry_expected.pop("weights"), strict=True):
                assert row_found == pytest.approx(row_expected, abs=0.5 / WEIGHT_STEPS + 1e-6)
    assert found == expected  # everything else: tokens, heads, gravity, the second text, exactly
    every_head = {(layer, head) for layer in (0, 1) for head in range(4)}
    assert {(s["layer"], s["head"]) for s in expected["heads"]} == every_head
    shown_tokens = "".join(t["text"] for t in found["tokens"])
    assert "↵" in shown_tokens and "→" in shown_tokens and "\n" not in shown_tokens  # whitespace made visible
    # Self-contained: the script and styles are inline and nothing is fetched.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|@import|url\(\s*["']?https?:""", html)
    assert "/*SCRIPT*/" not in html and "/*STYLE*/" not in html and "__DATA__" not in html


def test_gravity_moves_are_the_attention_update(sample_tokenizer) -> None:
    """The arrows run from the layer's input to input + attention output, projected on the top two
    principal axes of all those vectors."""
    model = sharp_model(sample_tokenizer.vocab_size, n_layer=2, n_head=4, d_model=32, context=64)
    data = inspection_data(model, sample_tokenizer, TEXT, [1], [None])
    ids = torch.tensor([[t["id"] for t in data["tokens"]]])
    captured = {}
    model.blocks[1].attn.register_forward_hook(lambda module, args, output: captured.update(out=output[0]))
    with torch.no_grad():
        hidden = model.trace(ids).hidden[1][0]
    after = hidden + captured["out"][0]
    gravity = data["gravity"][0]
    kept = [t["position"] for t in data["tokens"] if not t["special"]]
    assert gravity["before"][0][0] is None and kept[0] == 1  # <|endoftext|> is left out
    points = torch.cat([hidden[kept], after[kept]])
    centred = points - points.mean(dim=0)
    axes = torch.linalg.svd(centred, full_matrices=False).Vh[:2]
    projected = torch.tensor([gravity["before"][0][p] for p in kept] + [gravity["after"][0][p] for p in kept])
    # Same plane up to each axis's sign: compare absolute coordinates and the distances between points.
    assert torch.allclose((centred @ axes.T).abs(), projected.abs(), atol=1e-3)
    share = sum(gravity["variance"])
    assert 0 < share <= 1.0001


def test_a_gpt2_shaped_page_stays_small(sample_tokenizer) -> None:
    """12 layers x 12 heads x 256 tokens: every weight is in the page, packed, and it stays under 2 MB."""
    model = sharp_model(sample_tokenizer.vocab_size, n_layer=12, n_head=12, d_model=48, context=256, sharpness=4.0)
    text = (Path(__file__).parents[1] / "data" / "sample.txt").read_text(encoding="utf-8")[:3000]
    data = inspection_data(model, sample_tokenizer, text, range(12), list(range(12)))
    assert len(data["tokens"]) == 256 and len(data["attention"]) == 144
    below = torch.ones(256, 256).tril().bool()
    spread = sum(int(((w > 0.005) & (w < 0.5) & below).sum()) for w in (e["weights"] for e in data["attention"]))
    assert spread > 200_000  # irregular attention, not an easy case for the compressor
    size = len(attention_page(data, layer=11, head=None).encode("utf-8"))
    assert size < 2_000_000, size


# In a browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("NOTICE: no Chromium found, so the attention page was not tested in a browser; install it "
                    "(apt-get install chromium, or set LM_CHROMIUM) to run these tests")
    with Browser(executable) as instance:
        yield instance


def lines(browser: Browser, text: int = 0) -> dict:
    return browser.evaluate(f"(() => {{ const c = document.querySelector('canvas.lines[data-text=\"{text}\"]'); "
                            "return {lines: Number(c.dataset.lines), queries: c.dataset.queries, "
                            "focus: c.dataset.focus}; })()")


def test_the_page_in_a_browser(browser: Browser, page: Path) -> None:
    browser.open(page)
    assert browser.errors() == []
    n = browser.evaluate("lmPage.data.tokens.length")
    # Head view: every query draws its lines until a token is clicked; then only that token's.
    before = lines(browser)
    assert before["focus"] == "" and len(before["queries"].split(",")) >= n - 3
    position = browser.evaluate("lmPage.data.tokens.findIndex(t => t.text === '·light')")
    browser.click(f".panel.text-a .queries .tok[data-pos='{position}']")
    browser.move_away()  # the click pins the token, so it stays isolated once the pointer leaves
    after = lines(browser)
    visible = browser.evaluate(f"lmPage.rows(lmPage.data, 1, 'mean')[{position}]"
                               ".filter(w => w >= lmPage.MIN_LINE).length")
    assert after == {"lines": visible, "queries": str(position), "focus": f"q{position}"}
    assert before["lines"] > 5 * after["lines"] > 0
    # The same word in the other text is focused too (' light' is in both).
    other = browser.evaluate("lmPage.data.compare.tokens.findIndex(t => t.text === '·light')")
    assert lines(browser, 1)["focus"] == f"q{other}"
    browser.click(f".panel.text-a .queries .tok[data-pos='{position}']")  # a second click lets go
    browser.move_away()
    assert lines(browser)["focus"] == ""
    # Model view: one heat map per layer x head, with its role; a click opens that head in the head view.
    browser.click("nav button[data-view='model']")
    cells = browser.evaluate("[...document.querySelectorAll('.cell')].map(c => c.querySelector('.role').textContent)")
    assert len(cells) == 8 and all(re.match(r"(prev|ind|sink|self|broad|mixed) ", role) for role in cells)
    browser.click(".cell[data-layer='0'][data-head='2']")
    assert browser.evaluate("[document.body.dataset.view, lmPage.state.layer, lmPage.state.head]") == ["head", 0, 2]
    # Gravity: an arrow per ordinary token of both texts.
    browser.click("nav button[data-view='gravity']")
    ordinary = browser.evaluate("[lmPage.data, lmPage.data.compare].map(t => t.tokens.filter(x => !x.special).length)")
    assert browser.evaluate("document.querySelectorAll('svg.gravity g.token').length") == sum(ordinary)
    assert browser.errors() == []


def test_screenshots(browser: Browser, page: Path, tmp_path: Path) -> None:
    """A picture of each view, for the README (see the module docstring)."""
    folder = Path(os.environ.get("LM_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get("LM_SCREENSHOT_RUN"):
        page = tmp_path / "page.html"
        shown = run_lm("inspect-attention", os.environ["LM_SCREENSHOT_RUN"], "--text", TEXT, "--compare", OTHER,
                       "--save", page)
        assert shown.returncode == 0, shown.stderr
    browser.open(page)
    position = browser.evaluate("lmPage.data.tokens.findIndex(t => t.text === '·light')")
    browser.click(f".panel.text-a .queries .tok[data-pos='{position}']")
    for view in ("head", "model", "gravity"):
        browser.click(f"nav button[data-view='{view}']")
        browser.move_away()
        browser.evaluate("window.scrollTo(0, 0)")
        browser.screenshot(folder / f"{view}-view.png", selector="body")  # the page, without empty viewport
        data = (folder / f"{view}-view.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert browser.errors() == []
