"""The attention explorer page (`lm inspect-attention --save FILE.html`, and `lm inspect-heads --save`, which
adds the heads' effects): its data, its size, and how it behaves in a real browser (headless Chromium,
skipped with a notice where none is installed).

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


def _screenshot_folder(tmp_path: Path) -> Path:
    """$LM_SCREENSHOT_DIR (made if missing), else the test's own folder."""
    folder = Path(os.environ.get("LM_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _screenshot_page(page: Path, fresh: Path, command: str, *options: str) -> Path:
    """`page`, or with $LM_SCREENSHOT_RUN set, `fresh` written by `command` from that run (--text TEXT)."""
    if not os.environ.get("LM_SCREENSHOT_RUN"):
        return page
    shown = run_lm(command, os.environ["LM_SCREENSHOT_RUN"], "--text", TEXT, *options, "--save", fresh)
    assert shown.returncode == 0, shown.stderr
    return fresh


def test_screenshots(browser: Browser, page: Path, tmp_path: Path) -> None:
    """A picture of each view, for the README (see the module docstring)."""
    folder = _screenshot_folder(tmp_path)
    page = _screenshot_page(page, tmp_path / "page.html", "inspect-attention", "--compare", OTHER)
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


# The page of `lm inspect-heads --save`: the attention page with the heads' effects -------------------


@pytest.fixture(scope="module")
def heads_page(page_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("heads-html") / "heads.html"
    shown = run_lm("inspect-heads", page_run, "--text", TEXT, "--save", path)
    assert shown.returncode == 0, shown.stderr
    assert "direct logit attribution" in shown.stdout  # the terminal's tables, as without --save
    assert f"file://{path.resolve()}" in shown.stderr.replace("\n", "")
    return path


@pytest.fixture(scope="module")
def heads_json(page_run: Path) -> dict:
    """`lm inspect-heads --format json` on TEXT: the numbers the page must show."""
    shown = run_lm("inspect-heads", page_run, "--text", TEXT, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_the_heads_page_carries_both_documents(page_run: Path, heads_page: Path, heads_json: dict) -> None:
    found = page_document(heads_page.read_text(encoding="utf-8"))
    assert found.pop("inspect_heads") == heads_json  # inspect-heads' document, exactly
    top = heads_json["top_heads"][0]
    assert found.pop("opening") == {"layer": top["layer"], "head": top["head"], "view": "effects"}
    attention = json.loads(run_lm("inspect-attention", page_run, "--text", TEXT, "--format", "json", "--layer", "all",
                                  "--head", "all").stdout)
    for entry_found, entry_expected in zip(found["attention"], attention["attention"], strict=True):
        for row_found, row_expected in zip(entry_found.pop("weights"), entry_expected.pop("weights"), strict=True):
            assert row_found == pytest.approx(row_expected, abs=0.5 / WEIGHT_STEPS + 1e-6)
    assert found == attention  # and inspect-attention's, as its own page carries it
    # Every head's most-helped tokens: those of the top heads, and a rise in loss each.
    helped = heads_json["ablation_helped"]
    assert [len(row) for row in helped] == [4, 4]
    assert helped[top["layer"]][top["head"]] == top["helped"]
    assert all(e["increase_nats"] > 0 and heads_json["tokens"][e["position"]] == e["token"]
               for row in helped for head in row for e in head)


def test_heads_save_wants_an_html_file(page_run: Path, tmp_path: Path) -> None:
    from conftest import assert_one_line_error

    assert_one_line_error(run_lm("inspect-heads", page_run, "--text", TEXT, "--save", tmp_path / "heads.svg"),
                          "must end in .html")
    assert not (tmp_path / "heads.svg").exists()


def test_heads_page_with_compare_shows_both_texts(browser: Browser, page_run: Path, tmp_path: Path) -> None:
    """With --compare (activation patching), the page holds the corrupt text's attention too, and the
    patching tables in the inspect-heads document."""
    clean = "But soft, what light through yonder window breaks? It is the east, and it is the"
    corrupt = clean.replace("and it is", "and he is")
    path = tmp_path / "heads.html"
    shown = run_lm("inspect-heads", page_run, "--text", clean, "--compare", corrupt, "--target", "the", "--versus", "a",
                   "--save", path)
    assert shown.returncode == 0, shown.stderr
    found = page_document(path.read_text(encoding="utf-8"))
    assert found["compare"]["text"] == corrupt and len(found["compare"]["tokens"]) == len(found["tokens"])
    patching = found["inspect_heads"]["patching"]
    assert patching["compare"] == corrupt and len(patching["heads"]) == 2
    browser.open(path)
    assert browser.evaluate("document.querySelectorAll('#texts .strip').length") == 2
    browser.click("#head-detail button.open-head")
    assert browser.evaluate("document.querySelectorAll('canvas.lines').length") == 2
    assert browser.errors() == []


HEADS = [(layer, head) for layer in range(2) for head in range(4)]  # page_run's model


def test_the_heads_page_in_a_browser(browser: Browser, heads_page: Path, heads_json: dict, page: Path) -> None:
    browser.open(heads_page)
    assert browser.errors() == []
    assert browser.evaluate("[document.body.dataset.view, document.title]") == ["effects", "lm inspect-heads"]
    # The heat map: one cell per head, each the head's loss change (in millinats when all are below 0.1 nat).
    ablation = heads_json["ablation"]
    factor = 1000 if max(abs(v) for row in ablation for v in row) < 0.1 else 1
    cells = browser.evaluate("[...document.querySelectorAll('button.effect')].map(c => "
                             "[Number(c.dataset.layer), Number(c.dataset.head), c.textContent, c.style.background])")
    assert sorted((layer, head) for layer, head, _, _ in cells) == HEADS
    for layer, head, text, _ in cells:
        assert float(text) == pytest.approx(ablation[layer][head] * factor, abs=0.005 + 1e-9)
    assert len({background for *_, background in cells}) > 1  # coloured by the change
    # It opened on the head that matters most; clicking another shows that one's tokens.
    top = heads_json["top_heads"][0]
    assert browser.evaluate("[lmPage.state.layer, lmPage.state.head]") == [top["layer"], top["head"]]
    helped = heads_json["ablation_helped"]
    others = [pair for pair in HEADS if pair != (top["layer"], top["head"])]
    layer, head = max(others, key=lambda pair: len(helped[pair[0]][pair[1]]))
    assert helped[layer][head], "the test wants a second head that helps some token"
    browser.click(f"button.effect[data-layer='{layer}'][data-head='{head}']")
    detail = browser.evaluate("(() => { const d = document.getElementById('head-detail'); return {"
                              "layer: Number(d.dataset.layer), head: Number(d.dataset.head), "
                              "listed: [...d.querySelectorAll('ol.helped li')].map(li => [Number(li.dataset.pos), "
                              "li.querySelector('.tok').textContent, li.querySelector('b').textContent]), "
                              "highlighted: [...d.querySelectorAll('.helped-text .tok.helped')].map(t => "
                              "Number(t.dataset.pos)), "
                              "detectors: Object.fromEntries([...d.querySelectorAll('.detector')].map(s => "
                              "[s.dataset.detector, s.textContent.split(' ').pop()])), "
                              "direct: d.querySelector('.direct b').textContent}; })()")
    assert (detail["layer"], detail["head"]) == (layer, head)
    expected = helped[layer][head]
    assert [(pos, token) for pos, token, _ in detail["listed"]] == [(e["position"], e["token"]) for e in expected]
    for (_, _, rise), e in zip(detail["listed"], expected, strict=True):
        assert float(rise) == pytest.approx(e["increase_nats"], abs=5e-5)
    assert sorted(detail["highlighted"]) == sorted(e["position"] for e in expected)
    detectors = heads_json["detectors"]
    assert {name: float(score) for name, score in detail["detectors"].items()} == {
        name: pytest.approx(detectors[name][layer][head], abs=0.005 + 1e-9)
        for name in ("previous_token", "duplicate_token", "induction")}
    parts = {part["name"]: part["contribution"] for part in heads_json["attribution"]["parts"]}
    assert float(detail["direct"]) == pytest.approx(parts[f"L{layer}.H{head}"], abs=5e-5)
    # The head choice follows, so the head view opens on it.
    assert browser.evaluate("[lmPage.state.layer, lmPage.state.head, document.getElementById('head').value]") == \
        [layer, head, str(head)]
    # The attribution bars: one per part, each its contribution; the sum of the parts is the logit.
    browser.evaluate("(() => { const s = document.getElementById('bar-order'); s.value = 'model'; "
                     "s.dispatchEvent(new Event('change')); })()")
    bars = browser.evaluate("[...document.querySelectorAll('.bar-row')].map(r => [r.dataset.part, "
                            "r.querySelector('.value').textContent, r.querySelector('.bar').classList.contains('up')])")
    attribution = heads_json["attribution"]
    assert [name for name, _, _ in bars] == [part["name"] for part in attribution["parts"]]
    for name, value, up in bars:
        assert float(value) == pytest.approx(parts[name], abs=5e-5) and up == (parts[name] >= 0)
    logit, total = browser.evaluate("['dla-logit', 'dla-sum'].map(id => document.getElementById(id).textContent)")
    assert float(logit) == pytest.approx(attribution["logit"], abs=5e-5)
    assert float(total) == pytest.approx(sum(parts.values()), abs=5e-5)
    assert float(total) == pytest.approx(float(logit), abs=2e-4)
    # A head's bar chooses that head.
    browser.click(".bar-row[data-part='L0.H1'] .name")
    chosen = browser.evaluate("[lmPage.state.layer, lmPage.state.head, "
                              "document.getElementById('head-detail').dataset.head]")
    assert chosen == [0, 1, "1"]
    browser.click("#head-detail button.open-head")
    assert browser.evaluate("[document.body.dataset.view, lmPage.state.layer, lmPage.state.head]") == ["head", 0, 1]
    # The model view labels each head with a detector's score, or its loss change, on request.
    browser.click("nav button[data-view='model']")
    for label, table, scale, digits in (("previous_token", detectors["previous_token"], 1, 0.005),
                                        ("induction", detectors["induction"], 1, 0.005),
                                        ("ablation", ablation, factor, 0.005)):
        browser.evaluate(f"(() => {{ const s = document.getElementById('cell-label'); s.value = '{label}'; "
                         "s.dispatchEvent(new Event('change')); })()")
        shown = browser.evaluate("[...document.querySelectorAll('.cell')].map(c => [Number(c.dataset.layer), "
                                 "Number(c.dataset.head), c.querySelector('.role').dataset.label, "
                                 "c.querySelector('.role').textContent])")
        assert len(shown) == 8
        for layer, head, shown_label, text in shown:
            assert shown_label == label and float(text) == pytest.approx(table[layer][head] * scale, abs=digits + 1e-9)
    assert browser.errors() == []
    # The attention page alone has no head-effects view and no score labels.
    browser.open(page)
    assert browser.evaluate("document.querySelector(\"nav button[data-view='effects']\").hidden") is True
    browser.click("nav button[data-view='model']")
    assert browser.evaluate("document.getElementById('cell-label')") is None
    assert browser.errors() == []


def test_heads_screenshots(browser: Browser, heads_page: Path, tmp_path: Path) -> None:
    """Pictures of the head-effects view and the model view's detector labels (see the module docstring)."""
    folder = _screenshot_folder(tmp_path)
    heads_page = _screenshot_page(heads_page, tmp_path / "heads.html", "inspect-heads")
    browser.open(heads_page)
    browser.move_away()
    browser.screenshot(folder / "effects-view.png", selector="body")
    browser.click("nav button[data-view='model']")
    browser.evaluate("(() => { const s = document.getElementById('cell-label'); s.value = 'previous_token'; "
                     "s.dispatchEvent(new Event('change')); })()")
    browser.move_away()
    browser.evaluate("window.scrollTo(0, 0)")
    browser.screenshot(folder / "model-view-detectors.png", selector="body")
    for name in ("effects-view.png", "model-view-detectors.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert browser.errors() == []
