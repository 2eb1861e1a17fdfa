"""A self-contained HTML page for one inspection: the prompt's tokens coloured by the steps they need; hovering or
clicking a token shows its convergence curves (inline SVG drawn by inline script) and its logit lens per step.

Everything is in the one file: the data as JSON in a `<script type="application/json">` block, the style, the
script and the PNG figures as data URIs. The page loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recurrent_depth.inspection.convergence import COUNT_CRITERIA

IMAGE_TITLES = {"convergence": "Step length per token", "exit_steps": "Exit step per criterion",
                "trajectories": "Latent trajectories", "logit_lens": "Logit lens"}


def _num(x: float, digits: int = 4) -> float | None:
    """A JSON-safe number: rounded to `digits` significant digits, None if not finite."""
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def page_data(result: Any, colour_by: str = "kl") -> dict[str, Any]:
    """The plain data the page's script reads (tokens, exit steps, per-step values, logit lens)."""
    conv = result.convergence
    criteria = conv.criteria
    if colour_by not in criteria:
        raise ValueError(f"unknown criterion {colour_by!r} to colour by; choose from {', '.join(criteria)}")
    return {
        "prompt": result.prompt,
        "meta": {k: v for k, v in result.meta.items() if isinstance(v, str | int | float | bool)},
        "num_steps": conv.num_steps,
        "criteria": criteria,
        "at_least": sorted(COUNT_CRITERIA & set(criteria)),
        "colour_by": colour_by,
        "thresholds": conv.thresholds,
        "tokens": [{"text": t, "id": int(i)} for t, i in zip(result.texts, result.trace.input_ids.tolist())],
        "exit_step": {c: conv.exit_step[c].tolist() for c in criteria},
        "exited": {c: conv.exited[c].tolist() for c in criteria},
        "values": {c: [[_num(v) for v in row] for row in conv.values[c].T.tolist()] for c in criteria},
        "lens": [[[[e.text, _num(e.prob, 3)] for e in step] for step in pos] for pos in result.lens],
    }


def _image_tag(name: str, path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    title = html.escape(IMAGE_TITLES.get(name, name))
    return (f'<figure><figcaption>{title}</figcaption>'
            f'<img alt="{title}" src="data:image/png;base64,{data}"></figure>')


def render_page(result: Any, images: Mapping[str, Path] | None = None, colour_by: str = "kl") -> str:
    """The whole page as one HTML string (data inline, figures as data URIs, no external resource)."""
    data = json.dumps(page_data(result, colour_by), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    figures = "\n".join(_image_tag(name, path) for name, path in (images or {}).items())
    return (_TEMPLATE.replace("__TITLE__", html.escape(f"rdepth inspect: {result.prompt[:60]}"))
            .replace("__DATA__", data).replace("__FIGURES__", figures))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
  h1 { font-size: 1.3em; margin-bottom: 0.2em; }
  .meta { color: #666; font-size: 0.85em; }
  #controls { margin: 0.8em 0; }
  #text { font-family: monospace; font-size: 1.15em; line-height: 2.1; white-space: pre-wrap;
          border: 1px solid #ddd; padding: 0.6em; border-radius: 4px; }
  .tok { padding: 0.15em 0.05em; margin-right: 1px; border-radius: 3px; cursor: pointer; outline-offset: 1px;
         border-bottom: 3px solid transparent; }
  .tok.notexit { border-bottom: 3px dotted #d00; }
  .tok.active { outline: 2px solid #000; }
  #legend { display: flex; align-items: center; gap: 0.4em; font-size: 0.8em; margin-top: 0.4em; }
  #legend .bar { width: 240px; height: 12px; border: 1px solid #aaa; }
  #detail { margin-top: 1em; border-top: 1px solid #ddd; padding-top: 0.6em; }
  #detail h2 { font-size: 1.1em; margin: 0.2em 0; }
  #curves { display: flex; flex-wrap: wrap; gap: 0.8em; }
  #curves figure { margin: 0; }
  #curves figcaption { font-size: 0.8em; }
  table { border-collapse: collapse; font-size: 0.85em; }
  td, th { border: 1px solid #ddd; padding: 0.15em 0.45em; text-align: left; }
  #lens td.tokcell { font-family: monospace; white-space: pre; }
  #lens tr.exitrow { background: #fff4c2; }
  #lenswrap { max-height: 420px; overflow-y: auto; display: inline-block; margin-top: 0.6em; }
  #figures img { max-width: 100%; }
  #figures figure { margin: 1em 0; }
</style>
</head>
<body>
<h1>Latent thought, token by token</h1>
<div class="meta" id="meta"></div>
<div id="controls">
  <label for="criterion">Colour tokens by the steps needed under</label>
  <select id="criterion"></select>
  <span class="meta">(hover a token for its curves and logit lens; click to pin it)</span>
</div>
<div id="text" aria-label="prompt tokens"></div>
<div id="legend"><span id="legendmin"></span><span class="bar" id="legendbar"></span><span id="legendmax"></span>
  <span style="border-bottom: 3px dotted #d00; padding: 0 0.3em">not converged</span></div>
<section id="detail"><p class="meta" id="hint">Hover or click a token.</p></section>
<section id="figures"><h2>Figures</h2>
__FIGURES__
</section>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const R = D.num_steps;
const STOPS = ["#fde725", "#5ec962", "#21918c", "#3b528b", "#440154"];  // few steps: light; many: dark
let current = D.colour_by, pinned = null;

function hex(c) { return [1, 3, 5].map(i => parseInt(c.slice(i, i + 2), 16)); }
function colour(f) {
  f = Math.min(1, Math.max(0, f)) * (STOPS.length - 1);
  const i = Math.min(Math.floor(f), STOPS.length - 2), u = f - i;
  const a = hex(STOPS[i]), b = hex(STOPS[i + 1]);
  return "rgb(" + a.map((v, k) => Math.round(v + (b[k] - v) * u)).join(",") + ")";
}
function range_of(c) { const s = D.exit_step[c]; return [Math.min.apply(null, s), Math.max.apply(null, s)]; }
function shade(step) { const r = range_of(current); return r[1] > r[0] ? (step - r[0]) / (r[1] - r[0]) : 0; }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
function shown(t) { return t.replace(/\\n/g, "\\u23ce\\n"); }

function paint() {
  document.querySelectorAll(".tok").forEach(span => {
    const p = +span.dataset.pos, step = D.exit_step[current][p], ok = D.exited[current][p];
    span.style.background = colour(shade(step));
    span.style.color = shade(step) > 0.5 ? "#fff" : "#000";
    span.classList.toggle("notexit", !ok);
    span.title = "position " + p + ": " + (ok ? step + " steps" : "not converged in " + R) + " (" + current + ")";
  });
  const r = range_of(current);
  document.getElementById("legendmin").textContent = r[0] + (r[0] === 1 ? " step" : " steps");
  document.getElementById("legendmax").textContent = r[1] + " steps (of " + R + ")";
}

function chart(p, c) {
  const W = 250, H = 120, L = 38, B = 22, T = 8, Rm = 8;
  const vals = D.values[c][p], log = D.at_least.indexOf(c) < 0;
  // exact zeros and float noise far below the threshold sit on a floor (a threshold of 0 never exits: no line)
  const floor = D.thresholds[c] > 0 ? D.thresholds[c] * 1e-4 : 1e-12;
  const ys = vals.map(v => v === null ? null : (log ? Math.log10(Math.max(v, floor, 1e-30)) : v));
  const thr = D.thresholds[c] > 0 ? (log ? Math.log10(D.thresholds[c]) : D.thresholds[c]) : null;
  const finite = ys.filter(v => v !== null).concat(thr === null ? [] : [thr]);
  if (finite.length === 0) finite.push(0);
  let lo = Math.min.apply(null, finite), hi = Math.max.apply(null, finite);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const X = s => L + (W - L - Rm) * (R > 1 ? (s - 1) / (R - 1) : 0.5);
  const Y = v => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const g = svg("svg", {width: W, height: H, class: "curve", "data-criterion": c});
  g.appendChild(svg("rect", {x: L, y: T, width: W - L - Rm, height: H - T - B, fill: "#fafafa", stroke: "#ccc"}));
  const pts = [];
  ys.forEach((v, i) => { if (v !== null) pts.push(X(i + 1).toFixed(1) + "," + Y(v).toFixed(1)); });
  g.appendChild(svg("polyline", {points: pts.join(" "), fill: "none", stroke: "#1f5fbf", "stroke-width": 1.5}));
  if (thr !== null) {
    g.appendChild(svg("line", {x1: L, x2: W - Rm, y1: Y(thr), y2: Y(thr), stroke: "#d00", "stroke-dasharray": "4 3"}));
  }
  if (D.exited[c][p]) {
    const s = D.exit_step[c][p];
    g.appendChild(svg("line", {x1: X(s), x2: X(s), y1: T, y2: H - B, stroke: "#090", "stroke-width": 1.5}));
  }
  const label = (x, y, text, anchor) => {
    const t = svg("text", {x: x, y: y, "font-size": 9, "text-anchor": anchor || "middle"});
    t.textContent = text; g.appendChild(t);
  };
  label(X(1), H - 8, "1"); label(X(R), H - 8, String(R)); label((L + W) / 2, H - 8, "step");
  const fmt = v => log ? Math.pow(10, v).toExponential(0) : v.toFixed(0);
  label(L - 3, T + 8, fmt(hi), "end"); label(L - 3, H - B, fmt(lo), "end");
  return g;
}

function show(p) {
  const tok = D.tokens[p], box = document.getElementById("detail");
  box.textContent = "";
  box.appendChild(el("h2", {id: "detail-title"}, "Token " + JSON.stringify(tok.text) + " (position " + p +
                                                  ", id " + tok.id + ")"));
  box.appendChild(el("p", {class: "meta"}, "Its state predicts the next token. Curves: the value each exit " +
                      "criterion compares at every step (red dashed: threshold, green: exit step)."));
  const steps = el("table", {id: "exit-table"});
  const head = el("tr"); head.appendChild(el("th", {}, "criterion"));
  const row = el("tr"); row.appendChild(el("th", {}, "exit step"));
  D.criteria.forEach(c => {
    head.appendChild(el("th", {}, c));
    row.appendChild(el("td", {}, D.exited[c][p] ? String(D.exit_step[c][p]) : "> " + R));
  });
  steps.appendChild(head); steps.appendChild(row); box.appendChild(steps);
  const curves = el("div", {id: "curves"});
  D.criteria.forEach(c => {
    const f = el("figure"); f.appendChild(el("figcaption", {}, c + (D.at_least.indexOf(c) < 0 ? " (log10)" : "")));
    f.appendChild(chart(p, c)); curves.appendChild(f);
  });
  box.appendChild(curves);
  const wrap = el("div", {id: "lenswrap"}), table = el("table", {id: "lens"});
  const k = D.lens[p][0].length, h = el("tr");
  h.appendChild(el("th", {}, "step"));
  for (let i = 0; i < k; i++) h.appendChild(el("th", {}, "top " + (i + 1)));
  table.appendChild(h);
  const exitStep = D.exit_step[current][p];
  D.lens[p].forEach((cands, s) => {
    const tr = el("tr", s + 1 === exitStep && D.exited[current][p] ? {class: "exitrow"} : {});
    tr.appendChild(el("td", {}, String(s + 1)));
    cands.forEach(c => tr.appendChild(el("td", {class: "tokcell"},
                                         JSON.stringify(c[0]) + " " + (c[1] === null ? "?" : c[1].toFixed(3)))));
    table.appendChild(tr);
  });
  box.appendChild(el("h2", {}, "Logit lens (highlighted: exit step under " + current + ")"));
  wrap.appendChild(table); box.appendChild(wrap);
  document.querySelectorAll(".tok").forEach(s => s.classList.toggle("active", +s.dataset.pos === p));
}

function init() {
  const meta = Object.entries(D.meta).map(kv => kv[0] + "=" + kv[1]).join("  ");
  document.getElementById("meta").textContent = meta + "  thresholds: " +
    D.criteria.map(c => c + (D.at_least.indexOf(c) < 0 ? "<" : ">=") + D.thresholds[c]).join(", ");
  const sel = document.getElementById("criterion");
  D.criteria.forEach(c => { const o = el("option", {value: c}, c); if (c === current) o.selected = true;
                            sel.appendChild(o); });
  sel.addEventListener("change", () => { current = sel.value; paint(); if (pinned !== null) show(pinned); });
  const box = document.getElementById("text");
  D.tokens.forEach((t, p) => {
    const span = el("span", {class: "tok", tabindex: 0, "data-pos": p}, shown(t.text));
    span.addEventListener("mouseenter", () => { if (pinned === null) show(p); });
    span.addEventListener("focus", () => { if (pinned === null) show(p); });
    span.addEventListener("click", () => { pinned = pinned === p ? null : p; show(p); });
    box.appendChild(span);
  });
  const bar = document.getElementById("legendbar");
  bar.style.background = "linear-gradient(to right, " + STOPS.join(", ") + ")";
  paint();
}
init();
</script>
</body>
</html>
"""
