/* lm inspect-attention's page. It reads the document in #lm-data (what `--format json` writes, its
   weights packed as cli/page.py describes) and draws three views of it: the head view (lines from each
   token to the tokens it attends to), the model view (every layer x head as a small heat map) and the
   gravity view (where each layer's attention moves the tokens' vectors). Pages written by
   `lm inspect-heads --save` also carry that command's `--format json` document as `inspect_heads`: a
   fourth view, head effects (the ablation heat map, the tokens each head helps most, the attribution
   bars), and the detector scores as labels in the model view. No network, no libraries. */
"use strict";

const ROW = 18; // pixels per token in the head view
const LINES_WIDTH = 200; // pixels between the two columns of the head view
const CELL = 72; // pixels of a heat map in the model view
const LOW = [22, 24, 48], HIGH = [255, 176, 0]; // the terminal's heat colours: no attention .. all of it
const MASKED = [24, 27, 46]; // the causal mask's blank triangle in the model view
const MIN_LINE = 0.005; // lines for smaller weights would be invisible: not drawn
const TEXT_NAMES = ["A", "B"];
const TEXT_COLOURS = ["#4fc3f7", "#ff8a65"];
const ROLES = {
  "previous-token": ["prev", "attends to the token just before"],
  "induction": ["ind", "continues a pattern seen earlier (induction)"],
  "sink": ["sink", "rests on the first token (an attention sink)"],
  "self": ["self", "attends to the token itself"],
  "broad": ["broad", "spreads its attention widely"],
  "mixed": ["mixed", "no single behaviour dominates"],
};
const SCORE_OF = {"previous-token": "previous", "induction": "induction", "sink": "first", "self": "itself"};
// What labels each head in the model view: its role here, or (inspect-heads pages) a score of `inspect_heads`.
const LABELS = {
  "role": "its role on this text",
  "previous_token": "previous-token score",
  "duplicate_token": "duplicate-token score",
  "induction": "induction score",
  "ablation": "loss change when ablated",
};
const DETECTOR_MEANINGS = {
  "previous_token": "the share of its attention on the token just before",
  "duplicate_token": "the share of its attention on earlier copies of the token itself",
  "induction": "on random tokens repeated twice, the share of its attention on the token after an earlier copy " +
    "of the token itself (about 0.5 at most: only the second copy can match)",
};
// The diverging scale of loss changes: the loss rises without the head (it helps) .. no change .. it falls.
const HELPS = [229, 83, 75], NO_CHANGE = [36, 40, 64], HURTS = [66, 146, 230];
const BARS_SHOWN = 24; // attribution parts drawn unless all are asked for

const state = { view: "head", layer: 0, head: "mean", pinned: null, hover: null, label: "role", bars: "largest" };
let data = null; // the document, with each text's weights unpacked
let texts = []; // data, and data.compare when there is one
let painters = []; // functions that repaint the current view after a change of focus

function heat(weight, alpha) {
  const w = Math.max(0, Math.min(1, weight));
  const [r, g, b] = LOW.map((lo, i) => Math.round(lo + (HIGH[i] - lo) * w));
  return alpha === undefined ? `rgb(${r},${g},${b})` : `rgba(${r},${g},${b},${alpha})`;
}

function el(tag, attributes = {}, ...children) {
  const svg = ["svg", "g", "line", "circle", "text", "title", "path", "marker", "defs"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function unpack(text) {
  // Bytes of round(steps x weight), every entry's rows one after another (see cli/page.py).
  const binary = atob(text.packed_weights.data);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  const codes = new Uint8Array(await new Response(stream).arrayBuffer());
  const n = text.tokens.length, perEntry = n * (n + 1) / 2, steps = text.packed_weights.steps;
  if (codes.length !== perEntry * text.attention.length) throw new Error("the page's weights are damaged");
  const all = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) all[i] = codes[i] / steps;
  text.attention.forEach((entry, e) => {
    const rows = [];
    for (let q = 0, offset = e * perEntry; q < n; offset += ++q) rows.push(all.subarray(offset, offset + q + 1));
    entry.weights = rows;
  });
  text.byHead = new Map(text.attention.map((entry) => [`${entry.layer}/${entry.head}`, entry.weights]));
}

function rows(text, layer, head) {
  // Query i's weights on keys 0..i; the mean of the heads is computed once, when first asked for.
  const key = `${layer}/${head}`;
  if (!text.byHead.has(key) && head === "mean") {
    const heads = text.attention.filter((entry) => entry.layer === layer).map((entry) => entry.weights);
    text.byHead.set(key, heads[0].map((row, q) => row.map((_, k) => heads.reduce((s, h) => s + h[q][k], 0) / heads.length)));
  }
  return text.byHead.get(key);
}

function stats(layer, head) {
  return data.heads.find((s) => s.layer === layer && s.head === head);
}

function roleText(s) {
  const score = s[SCORE_OF[s.label]];
  return score === undefined ? `${ROLES[s.label][0]} ${s.entropy.toFixed(1)}b` : `${ROLES[s.label][0]} ${score.toFixed(2)}`;
}

function statsText(s) {
  const induction = s.induction === null ? "-" : s.induction.toFixed(2);
  return `${s.label}: entropy ${s.entropy.toFixed(2)} bits, previous ${s.previous.toFixed(2)}, first ${s.first.toFixed(2)}, ` +
    `self ${s.itself.toFixed(2)}, induction ${induction}`;
}

// Focus: the token under the pointer, else the one clicked. A token focused in one text focuses its
// last occurrence in the other, so a shared word can be followed across both.

function focus() { return state.hover || state.pinned; }

function focusIn(ti) {
  const f = focus();
  if (!f) return null;
  if (f.text === ti) return f;
  const id = texts[f.text].tokens[f.pos].id;
  const partner = texts[ti].tokens.map((t) => t.id).lastIndexOf(id);
  return partner < 0 || isSpecial(texts[ti].tokens[partner]) ? null : { text: ti, pos: partner, side: f.side };
}

function isSpecial(token) { return token.special; }

function tokenHandlers(ti, pos, side) {
  return {
    onmouseenter: () => { state.hover = { text: ti, pos, side }; paint(); },
    onmouseleave: () => { state.hover = null; paint(); },
    onclick: () => {
      const p = state.pinned;
      state.pinned = p && p.text === ti && p.pos === pos && p.side === side ? null : { text: ti, pos, side };
      paint();
    },
  };
}

function paint() {
  for (const painter of painters) painter();
  document.querySelectorAll("#texts .tok").forEach((node) => {
    const f = focusIn(Number(node.dataset.text));
    node.classList.toggle("focus", Boolean(f) && f.pos === Number(node.dataset.pos));
  });
}

// The strips of tokens at the top: the text as the model reads it, whitespace made visible.

function drawStrips() {
  const box = document.getElementById("texts");
  box.replaceChildren();
  texts.forEach((text, ti) => {
    const strip = el("div", { class: `strip text-${"ab"[ti]}` }, el("span", { class: "name", text: texts.length > 1 ? `text ${TEXT_NAMES[ti]}` : "text" }));
    for (const token of text.tokens) {
      strip.append(el("span", {
        class: `tok${isSpecial(token) ? " special" : ""}`, text: token.text, "data-text": ti, "data-pos": token.position,
        title: `position ${token.position}, id ${token.id}`, ...tokenHandlers(ti, token.position, "q"),
      }));
    }
    if (text.dropped_tokens) strip.append(el("span", { class: "note", text: ` (the first ${text.dropped_tokens} tokens did not fit the context and are left out)` }));
    box.append(strip);
  });
}

// The head view: queries on the left, keys on the right, a line per weight.

function headView(main) {
  const panels = el("div", { class: "panels" });
  texts.forEach((text, ti) => panels.append(headPanel(text, ti)));
  main.append(panels);
  const s = state.head === "mean" ? null : stats(state.layer, state.head);
  document.getElementById("help").textContent = "Each line joins a token (left) to a token it attends to (right); " +
    "the brighter the line, the larger the weight. Point at a token to see only its lines (on the left: what it " +
    "attends to; on the right: who attends to it); click to keep it, click again to let go." +
    (s ? ` This head: ${statsText(s)}.` : "");
}

function headPanel(text, ti) {
  const n = text.tokens.length;
  const weights = rows(text, state.layer, state.head);
  const title = el("h2", {}, texts.length > 1 ? el("b", { text: `text ${TEXT_NAMES[ti]}  ` }) : "",
    `layer ${state.layer}, ${state.head === "mean" ? "mean of the heads" : `head ${state.head}`}`);
  const canvas = el("canvas", { class: "lines", "data-text": ti });
  const ratio = window.devicePixelRatio || 1;
  canvas.width = LINES_WIDTH * ratio;
  canvas.height = n * ROW * ratio;
  canvas.style.width = `${LINES_WIDTH}px`;
  canvas.style.height = `${n * ROW}px`;
  const column = (side) => el("div", { class: `column ${side === "q" ? "queries" : "keys"}` },
    ...text.tokens.map((token) => el("span", {
      class: `tok${isSpecial(token) ? " special" : ""}`, text: token.text, "data-text": ti, "data-pos": token.position,
      "data-side": side, ...tokenHandlers(ti, token.position, side),
    })));
  const queries = column("q"), keys = column("k");
  const panel = el("div", { class: `panel text-${"ab"[ti]}` }, title, el("div", { class: "headview" }, queries, canvas, keys));

  painters.push(() => {
    const f = focusIn(ti);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, LINES_WIDTH, n * ROW);
    context.lineWidth = 2;
    let lines = 0;
    const drawn = new Set();
    for (let q = 0; q < n; q++) {
      if (f && f.side === "q" && f.pos !== q) continue;
      for (let k = 0; k <= q; k++) {
        const w = weights[q][k];
        if (w < MIN_LINE || (f && f.side === "k" && f.pos !== k)) continue;
        // One token's lines are few: a square root lets its small weights show; all lines: as they are.
        context.strokeStyle = heat(1, f ? Math.sqrt(w) : 0.8 * w);
        context.beginPath();
        context.moveTo(0, q * ROW + ROW / 2);
        context.lineTo(LINES_WIDTH, k * ROW + ROW / 2);
        context.stroke();
        lines++;
        drawn.add(q);
      }
    }
    // What was drawn, for tests and for anyone reading the page's state.
    canvas.dataset.lines = lines;
    canvas.dataset.queries = [...drawn].join(",");
    canvas.dataset.focus = f ? `${f.side}${f.pos}` : "";
    for (const [side, box] of [["q", queries], ["k", keys]]) {
      for (const node of box.children) {
        const pos = Number(node.dataset.pos);
        let w = null;
        if (f && f.side === "q" && side === "k" && pos <= f.pos) w = weights[f.pos][pos];
        if (f && f.side === "k" && side === "q" && pos >= f.pos) w = weights[pos][f.pos];
        node.style.background = w === null ? "" : heat(w);
        node.style.color = w !== null && w > 0.45 ? "#000" : "";
        node.title = w === null ? `position ${pos}` : `position ${pos}: weight ${w.toFixed(2)}`;
        node.classList.toggle("focus", Boolean(f) && f.side === side && f.pos === pos);
      }
    }
  });
  return panel;
}

// The model view: every layer x head as a heat map, labelled with its role on this text.

function modelView(main) {
  const text = texts[0];
  const layers = [...new Set(text.attention.map((e) => e.layer))];
  const heads = [...new Set(text.attention.map((e) => e.head))].filter((h) => h !== "mean");
  const effects = data.inspect_heads;
  if (effects) {
    const choice = el("select", { id: "cell-label", onchange: () => { state.label = choice.value; render(); } },
      ...Object.entries(LABELS).map(([value, text]) => el("option", { value, text })));
    choice.value = state.label;
    main.append(el("label", { class: "label-choice" }, "label each head with ", choice));
  }
  const grid = el("div", { class: "grid", style: `grid-template-columns: auto repeat(${heads.length}, max-content)` },
    el("div", { class: "corner", text: "layer \\ head" }), ...heads.map((h) => el("div", { class: "colhead", text: `head ${h}` })));
  for (const layer of layers) {
    grid.append(el("div", { class: "rowhead", text: `layer ${layer}` }));
    for (const head of heads) {
      const s = stats(layer, head);
      const cell = el("div", {
        class: `cell${layer === state.layer && head === state.head ? " current" : ""}`, "data-layer": layer, "data-head": head,
        title: `layer ${layer}, head ${head}: ${s ? statsText(s) : ""}${effects ? `; ${effectsText(layer, head)}` : ""}. ` +
          "Click to open it in the head view.",
        onclick: () => openHead(layer, head),
      }, heatMap(rows(text, layer, head), text.tokens.length), cellLabel(layer, head, s));
      grid.append(cell);
    }
  }
  main.append(grid, modelLegend());
  document.getElementById("help").textContent = "Each square is one head: row = token looking, column = token looked " +
    "at, brighter = more attention. The label is its dominant behaviour and score (for broad and mixed heads, the " +
    "entropy of its rows in bits)" + (effects ? ", or the score chosen above" : "") +
    ". Click a square to open it in the head view." + (texts.length > 1 ? " (Text A.)" : "");
}

function openHead(layer, head) {
  Object.assign(state, { view: "head", layer, head, pinned: null, hover: null });
  render();
}

function cellLabel(layer, head, s) {
  // The role (from the attention statistics), or one of inspect-heads' numbers on a coloured ground.
  if (state.label === "role" || !data.inspect_heads) {
    return el("div", { class: `role role-${s ? s.label : ""}`, text: s ? roleText(s) : "" });
  }
  const effects = data.inspect_heads;
  if (state.label === "ablation") {
    const unit = ablationUnit(effects), nats = effects.ablation[layer][head];
    return el("div", { class: "role score", "data-label": "ablation", text: signed(nats * unit.factor),
      style: `background:${diverging(nats, unit.largest)}` });
  }
  const score = effects.detectors[state.label][layer][head];
  return el("div", { class: "role score", "data-label": state.label, text: score.toFixed(2),
    style: `background:${heat(score)};color:${score > 0.45 ? "#000" : ""}` });
}

function modelLegend() {
  if (state.label === "role" || !data.inspect_heads) {
    return el("div", { class: "legend" }, "Roles on this text: ",
      ...Object.entries(ROLES).map(([label, [code, meaning]]) => el("span", { class: `role-${label}` }, `${code}: ${meaning}`)));
  }
  const effects = data.inspect_heads;
  if (state.label === "ablation") {
    return el("div", { class: "legend" }, `Under each head: the change in the mean loss per predicted token when it is ` +
      `${effects.ablation_mode}-ablated, in ${ablationUnit(effects).name}. ${ABLATION_MEANING}`);
  }
  const d = effects.detectors;
  return el("div", { class: "legend" }, `Under each head: its ${LABELS[state.label]} (TransformerLens's head detector, ` +
    `0 to 1): ${DETECTOR_MEANINGS[state.label]}` +
    (state.label === "induction" ? ` (${d.induction_length} random tokens, seed ${d.induction_seed}; a perfect ` +
      `induction head scores ${d.induction_perfect.toFixed(2)}: the first copy's tokens have nothing earlier to find).`
      : " on this text."));
}

// The head-effects view (pages of `lm inspect-heads --save`): a layer x head heat map of the loss change
// when each head is ablated; the chosen head's numbers and the tokens it helps most; the attribution bars.

const ABLATION_MEANING = "Positive (red): the model predicts the text worse without the head, which helps. " +
  "Negative (blue): it predicts the text better without it: on this text the head hurts.";

function signed(value, digits = 2) { return `${value >= 0 ? "+" : ""}${value.toFixed(digits)}`; }

function visible(text) { return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→"); }

function diverging(value, largest) {
  const share = largest > 0 ? Math.min(1, Math.abs(value) / largest) : 0;
  const end = value > 0 ? HELPS : HURTS;
  return `rgb(${NO_CHANGE.map((zero, i) => Math.round(zero + (end[i] - zero) * share)).join(",")})`;
}

function ablationUnit(effects) {
  // An untrained or redundant model's changes are small: in thousandths of a nat then, as in the terminal.
  const largest = Math.max(...effects.ablation.flat().map(Math.abs));
  return largest < 0.1 ? { name: "millinats", factor: 1000, largest } : { name: "nats", factor: 1, largest };
}

function effectsText(layer, head) {
  const effects = data.inspect_heads, d = effects.detectors;
  return `loss ${signed(effects.ablation[layer][head], 4)} nats when ablated, previous-token ` +
    `${d.previous_token[layer][head].toFixed(2)}, duplicate-token ${d.duplicate_token[layer][head].toFixed(2)}, ` +
    `induction ${d.induction[layer][head].toFixed(2)}`;
}

function logitName(a) {
  return `“${visible(a.target_token)}”` + (a.versus === null ? "" : ` minus that of “${visible(a.versus_token)}”`);
}

function chooseHead(layer, head) {
  Object.assign(state, { layer, head });
  render();
}

function effectsView(main) {
  const effects = data.inspect_heads, unit = ablationUnit(effects);
  const chosen = state.head !== "mean";
  const heads = effects.ablation[0].length;
  const grid = el("div", { class: "grid effects", style: `grid-template-columns: auto repeat(${heads}, max-content)` },
    el("div", { class: "corner", text: "layer \\ head" }),
    ...effects.ablation[0].map((_, head) => el("div", { class: "colhead", text: `head ${head}` })));
  effects.ablation.forEach((row, layer) => {
    grid.append(el("div", { class: "rowhead", text: `layer ${layer}` }));
    row.forEach((nats, head) => grid.append(el("button", {
      type: "button", class: `effect${chosen && layer === state.layer && head === state.head ? " current" : ""}`,
      "data-layer": layer, "data-head": head, text: signed(nats * unit.factor),
      style: `background:${diverging(nats, unit.largest)}`,
      title: `layer ${layer}, head ${head}: ${effectsText(layer, head)}. Click for the tokens it helps most.`,
      onclick: () => chooseHead(layer, head),
    })));
  });
  const scale = el("div", { class: "scale" }, `${signed(-unit.largest * unit.factor)} hurts`,
    el("span", { class: "ramp", style: `background:linear-gradient(to right, ${diverging(-1, 1)}, ${diverging(0, 1)}, ` +
      `${diverging(1, 1)})` }), `helps ${signed(unit.largest * unit.factor)} ${unit.name}`);
  const map = el("div", { class: "panel" },
    el("h2", { text: `Loss change per predicted token when each head is ${effects.ablation_mode}-ablated (${unit.name})` }),
    el("p", { class: "note", text: `${effects.tokens.length} tokens; the model's mean loss is ${effects.loss.nats.toFixed(4)} nats per ` +
      `predicted token (${effects.loss.bits_per_byte.toFixed(4)} bits per byte). ${ABLATION_MEANING}` }),
    grid, scale);
  if (effects.joint) {
    const joint = effects.joint;
    const alone = [...new Set(joint.heads.map(([l, h]) => `${l}/${h}`))].map((key) => key.split("/").map(Number))
      .reduce((sum, [l, h]) => sum + effects.ablation[l][h], 0);
    map.append(el("p", { class: "joint", text: `${joint.heads.map(([l, h]) => `L${l}.H${h}`).join(" + ")} ablated together: ` +
      `${signed(joint.nats, 4)} nats (${signed(joint.bits_per_byte, 4)} bits per byte); one at a time they sum to ${signed(alone, 4)}` }));
  }
  const detail = chosen ? headDetail(effects, state.layer, state.head)
    : el("div", { class: "panel detail", id: "head-detail" }, el("p", { class: "note", text: "Click a head in the map to see the tokens it helps predict most." }));
  main.append(el("div", { class: "panels" }, map, detail), attributionBars(effects));
  document.getElementById("help").textContent = "Each square of the map is one head, coloured by how much the model's " +
    "loss on this text changes when that head's output is replaced (by its mean over the text, or zeros): the causal " +
    "test of whether it matters. Click one for its detector scores, its direct effect on the attributed logit and the " +
    "tokens whose prediction it helps most; the head choice above follows, so the head view opens on it. The bars " +
    "split one logit into the direct contribution of each part of the model; click a head's bar to choose it.";
}

function headDetail(effects, layer, head) {
  const nats = effects.ablation[layer][head], bpb = effects.ablation_bits_per_byte[layer][head];
  const helped = effects.ablation_helped[layer][head];
  const part = effects.attribution.parts.find((p) => p.name === `L${layer}.H${head}`);
  const verdict = nats > 0 ? "the model predicts the text worse without it" : nats < 0 ? "the model predicts the text better without it" : "no change";
  const box = el("div", { class: "panel detail", id: "head-detail", "data-layer": layer, "data-head": head },
    el("h2", { text: `layer ${layer}, head ${head}` }),
    el("p", { class: "ablated" }, `${effects.ablation_mode}-ablated: `, el("b", { text: `${signed(nats, 4)} nats` }),
      ` per predicted token (${signed(bpb, 4)} bits per byte): ${verdict}.`),
    el("p", { class: "detectors" }, "detector scores: ", ...Object.keys(DETECTOR_MEANINGS).map((key) => el("span", {
      class: "detector", "data-detector": key, title: DETECTOR_MEANINGS[key],
      text: `${LABELS[key].replace(" score", "")} ${effects.detectors[key][layer][head].toFixed(2)}`,
    }))),
    el("p", { class: "direct" }, `direct contribution to the logit of ${logitName(effects.attribution)}: `,
      el("b", { text: signed(part.contribution, 4) })));
  if (!helped.length) {
    box.append(el("p", { class: "note", text: "Ablating it raises no token's loss on this text." }));
  } else {
    box.append(el("p", { text: "The tokens it helps predict most (the rise in each one's loss, in nats, when it is ablated):" }),
      el("ol", { class: "helped" }, ...helped.map((e) => el("li", { "data-pos": e.position },
        el("span", { class: "tok", text: e.token }), ` at position ${e.position}: `, el("b", { text: signed(e.increase_nats, 4) })))));
  }
  // The text, those tokens on the scale of the map's red (the most helped one the strongest).
  const rise = new Map(helped.map((e) => [e.position, e.increase_nats]));
  const most = helped.length ? helped[0].increase_nats : 1;
  box.append(el("div", { class: "strip helped-text" }, ...texts[0].tokens.map((token) => {
    const up = rise.get(token.position);
    return el("span", {
      class: `tok${isSpecial(token) ? " special" : ""}${up === undefined ? "" : " helped"}`, "data-pos": token.position,
      text: token.text, style: up === undefined ? "" : `background:${diverging(up, most)}`,
      title: up === undefined ? `position ${token.position}` : `position ${token.position}: its loss rises ${up.toFixed(4)} nats without this head`,
    });
  })), el("button", { type: "button", class: "open-head", text: "Open in the head view", onclick: () => openHead(layer, head) }));
  return box;
}

function attributionBars(effects) {
  const a = effects.attribution;
  const total = a.parts.reduce((sum, p) => sum + p.contribution, 0);
  const ordered = state.bars === "model" ? a.parts : [...a.parts].sort((x, y) => Math.abs(y.contribution) - Math.abs(x.contribution));
  const shown = state.bars === "largest" ? ordered.slice(0, BARS_SHOWN) : ordered;
  const largest = Math.max(...shown.map((p) => Math.abs(p.contribution))) || 1;
  const context = effects.tokens.slice(Math.max(0, a.position - 5), a.position + 1).join("");
  const order = el("select", { id: "bar-order", onchange: () => { state.bars = order.value; render(); } },
    el("option", { value: "largest", text: `the ${Math.min(BARS_SHOWN, a.parts.length)} largest` }),
    el("option", { value: "all", text: "all, largest first" }), el("option", { value: "model", text: "all, in model order" }));
  order.value = state.bars;
  const bars = el("div", { class: "bars" });
  for (const part of shown) {
    const head = /^L(\d+)\.H(\d+)$/.exec(part.name);
    const current = head && Number(head[1]) === state.layer && Number(head[2]) === state.head;
    bars.append(el("div", {
      class: `bar-row${head ? " head" : ""}${current ? " current" : ""}`, "data-part": part.name,
      ...(head ? { onclick: () => chooseHead(Number(head[1]), Number(head[2])), title: "Click to choose this head" } : {}),
    }, el("span", { class: "name", text: part.name }), el("span", { class: "value", text: signed(part.contribution, 4) }),
    el("span", { class: "track" }, el("span", {
      class: `bar ${part.contribution >= 0 ? "up" : "down"}`, style: `width:${(50 * Math.abs(part.contribution) / largest).toFixed(2)}%`,
    }))));
  }
  const rest = ordered.slice(shown.length);
  return el("section", { class: "attribution" },
    el("h2", { text: "Direct logit attribution" }),
    el("p", {}, `The logit of ${logitName(a)} after position ${a.position} (…${context}) is `,
      el("b", { id: "dla-logit", text: a.logit.toFixed(4) }), `; its ${a.parts.length} parts sum to `,
      el("b", { id: "dla-sum", text: total.toFixed(4) }), ". Each part passes through the final norm with its scale " +
      "frozen at the whole stream's (green: raises the logit, red: lowers it). Show ", order, "."),
    bars, rest.length ? el("p", { class: "note", text: `${rest.length} smaller parts: ` +
      `${signed(rest.reduce((sum, p) => sum + p.contribution, 0), 4)} together` }) : "");
}

function heatMap(weights, n) {
  const source = document.createElement("canvas");
  source.width = source.height = n;
  const context = source.getContext("2d");
  const image = context.createImageData(n, n);
  const pixels = image.data;
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const at = 4 * (q * n + k), w = k <= q ? weights[q][k] : 0;
      for (let i = 0; i < 3; i++) pixels[at + i] = k <= q ? LOW[i] + (HIGH[i] - LOW[i]) * w : MASKED[i];
      pixels[at + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
  const ratio = window.devicePixelRatio || 1;
  const canvas = el("canvas", { width: CELL * ratio, height: CELL * ratio, style: `width:${CELL}px;height:${CELL}px` });
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = n > CELL * ratio; // average when shrinking, sharp squares when growing
  target.drawImage(source, 0, 0, CELL * ratio, CELL * ratio);
  return canvas;
}

// The gravity view: each token's vector at the layer's input and after its attention update, in the
// plane the vectors vary most in; the arrow is where attention moved it.

function gravityView(main) {
  const map = data.gravity.find((g) => g.layer === state.layer);
  const W = 820, H = 560, M = 36;
  const points = [];
  texts.forEach((text, ti) => text.tokens.forEach((token, pos) => {
    if (map.before[ti][pos]) points.push({ ti, pos, token, before: map.before[ti][pos], after: map.after[ti][pos] });
  }));
  if (!points.length) {
    main.append(el("p", { class: "note", text: "No ordinary tokens to place: the text is only special tokens." }));
    return;
  }
  const xs = points.flatMap((p) => [p.before[0], p.after[0]]), ys = points.flatMap((p) => [p.before[1], p.after[1]]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const scale = Math.min((W - 2 * M) / Math.max(x1 - x0, 1e-9), (H - 2 * M) / Math.max(y1 - y0, 1e-9)); // one scale: distances stay true
  const ox = (W - (x1 - x0) * scale) / 2, oy = (H - (y1 - y0) * scale) / 2;
  const X = (x) => ox + (x - x0) * scale, Y = (y) => H - oy - (y - y0) * scale;
  const svg = el("svg", { class: "gravity", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" },
    el("defs", {}, ...TEXT_COLOURS.map((colour, ti) => el("marker", {
      id: `arrow-${ti}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
    }, el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour })))),
    el("line", { class: "axis", x1: M / 2, x2: W - M / 2, y1: Y(0), y2: Y(0) }),
    el("line", { class: "axis", x1: X(0), x2: X(0), y1: M / 2, y2: H - M / 2 }),
    el("text", { class: "axis-label", x: W - M / 2, y: Y(0) - 6, "text-anchor": "end", text: `PC1: ${(100 * map.variance[0]).toFixed(0)}% of the variance` }),
    el("text", { class: "axis-label", x: X(0) + 6, y: M / 2 + 10, text: `PC2: ${(100 * map.variance[1]).toFixed(0)}%` }));
  const pulls = el("g", { class: "pulls" });
  svg.append(pulls);
  const labelled = points.length <= 80;
  const groups = points.map((p) => {
    const colour = TEXT_COLOURS[p.ti];
    const moved = Math.hypot(p.after[0] - p.before[0], p.after[1] - p.before[1]);
    const group = el("g", { class: "token", "data-text": p.ti, "data-pos": p.pos, ...tokenHandlers(p.ti, p.pos, "q") },
      el("title", { text: `${p.token.text} (${texts.length > 1 ? `text ${TEXT_NAMES[p.ti]}, ` : ""}position ${p.pos}): moved ${moved.toFixed(3)} in this plane` }),
      el("circle", { cx: X(p.before[0]), cy: Y(p.before[1]), r: 3, fill: "none", stroke: colour }),
      el("line", { x1: X(p.before[0]), y1: Y(p.before[1]), x2: X(p.after[0]), y2: Y(p.after[1]), stroke: colour, "stroke-width": 1.5, "marker-end": `url(#arrow-${p.ti})` }),
      el("text", { x: X(p.after[0]) + 5, y: Y(p.after[1]) - 4, text: labelled ? p.token.text : "", fill: colour }));
    svg.append(group);
    return { p, group };
  });
  main.append(svg);
  painters.push(() => {
    const focused = texts.map((_, ti) => focusIn(ti));
    pulls.replaceChildren();
    for (const { p, group } of groups) {
      const on = focused[p.ti] && focused[p.ti].pos === p.pos;
      group.classList.toggle("focus", Boolean(on));
      group.classList.toggle("faded", Boolean(focus()) && !on);
      group.querySelector("text").textContent = labelled || on ? p.token.text : "";
    }
    // The pull: from the focused token's new place to the tokens it attended to (mean of the heads).
    focused.forEach((f, ti) => {
      if (!f || !map.after[ti][f.pos]) return;
      const weights = rows(texts[ti], state.layer, "mean")[f.pos];
      const [ax, ay] = map.after[ti][f.pos];
      weights.forEach((w, k) => {
        const target = map.before[ti][k];
        if (w < 0.05 || !target || k === f.pos) return;
        pulls.append(el("line", { x1: X(ax), y1: Y(ay), x2: X(target[0]), y2: Y(target[1]), stroke: heat(1), "stroke-opacity": Math.min(1, w + 0.15), "stroke-dasharray": "4 3" }));
      });
    });
  });
  document.getElementById("help").textContent = `Every token's vector as layer ${state.layer} reads it (circle) and after ` +
    "the layer's attention has added what it gathered (arrow head), projected onto the two directions in which these " +
    "vectors differ most. Point at a token to see the tokens it attends to (dashed, mean of the heads)" +
    (texts.length > 1 ? "; a word both texts share is shown in both, to see context pull it two ways." : ".") +
    " The <|endoftext|> the text is read after is left out: it sits far from everything else.";
}

// Controls and rendering.

function render() {
  painters = [];
  document.querySelectorAll("#views button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.view === state.view)));
  document.getElementById("layer").value = String(state.layer);
  document.getElementById("head").value = String(state.head);
  const choosesHead = state.view === "head" || state.view === "effects";
  document.getElementById("head-choice").classList.toggle("disabled", !choosesHead);
  document.getElementById("head").disabled = !choosesHead;
  const s = state.head === "mean" ? null : stats(state.layer, state.head);
  document.getElementById("about").textContent = state.view === "head" && s ? `layer ${state.layer}, head ${state.head}: ${roleText(s)}` : "";
  const main = document.getElementById("view");
  main.replaceChildren();
  ({ head: headView, model: modelView, gravity: gravityView, effects: effectsView })[state.view](main);
  paint();
  document.body.dataset.view = state.view;
}

function setUp() {
  const layers = [...new Set(data.attention.map((e) => e.layer))];
  const heads = [...new Set(data.attention.map((e) => e.head))];
  const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
  layerSelect.replaceChildren(...layers.map((l) => el("option", { value: l, text: String(l) })));
  headSelect.replaceChildren(...["mean", ...heads.filter((h) => h !== "mean")].map((h) => el("option", { value: h, text: h === "mean" ? "mean" : String(h) })));
  layerSelect.addEventListener("change", () => { state.layer = Number(layerSelect.value); render(); });
  headSelect.addEventListener("change", () => { state.head = headSelect.value === "mean" ? "mean" : Number(headSelect.value); render(); });
  document.querySelectorAll("#views button").forEach((b) => b.addEventListener("click", () => { state.view = b.dataset.view; render(); }));
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") { state.pinned = null; paint(); } });
  const views = ["head", "model", "gravity"];
  if (data.inspect_heads) {
    views.push("effects");
    document.querySelector("#views button[data-view='effects']").hidden = false;
    document.title = document.querySelector("h1").textContent = "lm inspect-heads";
  }
  const opening = data.opening || {};
  state.view = views.includes(opening.view) ? opening.view : "head";
  state.layer = layers.includes(opening.layer) ? opening.layer : layers[layers.length - 1];
  state.head = opening.head === "mean" || heads.includes(opening.head) ? opening.head : "mean";
}

async function main() {
  try {
    data = JSON.parse(document.getElementById("lm-data").textContent);
    texts = data.compare ? [data, data.compare] : [data];
    for (const text of texts) await unpack(text);
    setUp();
    drawStrips();
    render();
    document.body.dataset.ready = "true";
  } catch (error) {
    document.getElementById("view").replaceChildren(el("p", { class: "note error", text: `This page could not be drawn: ${error.message}. It needs a current browser (one with DecompressionStream).` }));
    throw error;
  }
}

window.lmPage = { state, render, rows, MIN_LINE, get data() { return data; } }; // for tests, and the curious
main();
