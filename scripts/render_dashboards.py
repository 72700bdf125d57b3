"""Draw the generated dashboards from a Prometheus, as a person would see them in Grafana, and
screenshot each with headless Chromium (no Grafana server runs here).

Every panel's queries run exactly as generated (variables at "All", Grafana's interval
variables given values), fetched here through Prometheus's HTTP API and embedded in one static
HTML page per dashboard; plain JavaScript draws them as SVG (no CDN, no network).

    .venv/bin/python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 \\
        --out dashboards [--range 300] [--html-dir /tmp/pages]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter import dashboards  # noqa: E402
from exporter.dashboards import walk  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--hide-scrollbars", "--window-size=1600,2000")


def prom(base: str, path: str, **params: Any) -> Any:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return inner or "value"
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    while "{{" in out:  # labels the series lacks render empty, as in Grafana
        a = out.index("{{")
        out = out[:a] + out[out.index("}}", a) + 2:]
    # A legend naming labels the series lacks (no pod outside Kubernetes) falls back to the
    # labels it has.
    return " ".join(out.split()) or legend("", labels)


def _heatmap(result: list[dict[str, Any]]) -> dict[str, Any]:
    """Cumulative ``le`` series -> per-bucket counts at each time (Grafana's format=heatmap)."""
    by_le = {float(s["metric"]["le"]): {t: float(v) for t, v in s["values"]} for s in result}
    les = sorted(by_le)
    times = sorted({t for s in by_le.values() for t in s})
    counts = []
    for t in times:
        cum = [by_le[le].get(t, 0.0) for le in les]
        counts.append([max(0.0, c - (cum[i - 1] if i else 0.0)) for i, c in enumerate(cum)])
    return {"les": ["+Inf" if le == float("inf") else f"{le:g}" for le in les],
            "times": times, "counts": counts}


def fetch(base: str, board: dict[str, Any], start: float, end: float, step: float,
          intervals: dict[str, str]) -> dict[str, Any]:
    """{panel id: drawable data} for one dashboard."""
    out: dict[str, Any] = {}
    for q in walk.panel_queries(board):
        expr = walk.substitute(q.expr, intervals=intervals)
        panel = out.setdefault(str(q.panel_id), {"series": [], "exemplars": []})
        res = prom(base, "/api/v1/query_range", query=expr, start=start, end=end, step=step)
        if q.panel_type == "heatmap":
            panel["heatmap"] = _heatmap(res["result"]) if res["result"] else None
        else:
            for s in res["result"]:
                pts = [[t, float(v)] for t, v in s["values"]]
                panel["series"].append({"name": legend(q.legend, s["metric"]),
                                        "points": pts, "dashed": False})
        if q.exemplar:
            for group in prom(base, "/api/v1/query_exemplars", query=expr, start=start,
                              end=end):
                for e in group["exemplars"]:
                    panel["exemplars"].append([e["timestamp"], float(e["value"]),
                                               e["labels"].get("trace_id", "")])
    for p in walk.panels(board):  # dashed reference lines (SLO thresholds)
        names = {o["matcher"]["options"] for o in p.get("fieldConfig", {}).get("overrides", [])}
        for s in out.get(str(p["id"]), {}).get("series", []):
            s["dashed"] = s["name"] in names
    return out


def page(board: dict[str, Any], data: dict[str, Any], start: float, end: float) -> str:
    panels = []
    for p in board["panels"]:
        opts = p.get("options", {})
        steps = p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps")
        panels.append({"id": p["id"], "type": p["type"], "title": p["title"],
                       "grid": p["gridPos"], "unit": walk.unit(p),
                       "stack": p.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
                       .get("stacking", {}).get("mode") == "normal",
                       "max": p.get("fieldConfig", {}).get("defaults", {}).get("max"),
                       "decimals": p.get("fieldConfig", {}).get("defaults", {}).get("decimals"),
                       "steps": steps, "graph": opts.get("graphMode")})
    model = {"title": board["title"], "panels": panels, "data": data, "start": start,
             "end": end, "vars": [v["name"] for v in board["templating"]["list"]]}
    return HTML.replace("/*MODEL*/null", json.dumps(model))


def screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        "--virtual-time-budget=5000", f"--screenshot={png}", html.as_uri()],
                       check=True, capture_output=True, timeout=120)


def render(base: str, out: Path, range_s: float = 300, step: float = 2.0,
           rate_interval: str = "15s", html_dir: Path | None = None) -> list[Path]:
    end = time.time()
    start = end - range_s
    intervals = {"__rate_interval": rate_interval, "__interval": f"{step:g}s",
                 "__range": f"{int(range_s)}s"}
    html_dir = html_dir or Path(tempfile.mkdtemp(prefix="dashboards-"))
    html_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, board in dashboards.build_all().items():
        data = fetch(base, board, start, end, step, intervals)
        html = html_dir / f"{stem}.html"
        html.write_text(page(board, data, start, end), encoding="utf-8")
        png = out / f"{stem}.png"
        screenshot(html, png)
        written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="Prometheus base URL.")
    p.add_argument("--out", default=str(ROOT / "dashboards"), help="Where the PNGs go.")
    p.add_argument("--range", type=float, default=300, help="Seconds of history to draw.")
    p.add_argument("--step", type=float, default=2.0, help="Seconds between points.")
    p.add_argument("--rate-interval", default="15s", help="Value of $__rate_interval.")
    p.add_argument("--html-dir", help="Keep the HTML pages here.")
    a = p.parse_args(argv)
    for png in render(a.prometheus, Path(a.out), a.range, a.step, a.rate_interval,
                      Path(a.html_dir) if a.html_dir else None):
        print(png)
    return 0


HTML = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>dashboard</title>
<style>
  body { margin: 0; background: #111217; color: #ccccdc; font: 12px Inter, "Helvetica Neue",
         Arial, sans-serif; }
  #top { height: 40px; display: flex; align-items: center; padding: 0 16px; gap: 16px;
         border-bottom: 1px solid #2c2d33; }
  #top h1 { font-size: 16px; font-weight: 500; margin: 0; color: #e0e0ef; }
  .var { background: #1f2026; border: 1px solid #2c2d33; border-radius: 2px; padding: 3px 8px; }
  .var b { color: #6e9fff; font-weight: 500; margin-right: 6px; }
  #range { margin-left: auto; color: #8e8ea0; }
  #grid { position: relative; margin: 8px; }
  .panel { position: absolute; background: #181b1f; border: 1px solid #25272d;
           border-radius: 3px; box-sizing: border-box; overflow: hidden; }
  .panel .t { height: 24px; line-height: 24px; padding: 0 8px; font-weight: 500;
              color: #d8d9e0; font-size: 12.5px; white-space: nowrap; overflow: hidden; }
  .row { position: absolute; font-size: 14px; font-weight: 500; color: #e0e0ef; }
  .nodata { fill: #8e8ea0; font-size: 13px; }
  svg text { fill: #9fa0ad; font-size: 10px; }
  .legend { position: absolute; left: 8px; right: 8px; bottom: 2px; font-size: 11px;
            line-height: 15px; max-height: 46px; overflow: hidden; }
  .legend span { margin-right: 10px; white-space: nowrap; }
  .legend i { display: inline-block; width: 12px; height: 3px; margin: 0 4px 3px 0;
              vertical-align: middle; }
</style></head><body>
<div id="top"></div><div id="grid"></div>
<script>
const M = /*MODEL*/null;
const COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
                "#705da0", "#37872d", "#fade2a", "#c4162a", "#1f60c4"];
const NS = "http://www.w3.org/2000/svg";
const W = 1600 - 16, COLW = W / 24;
let maxY = 0; for (const p of M.panels) maxY = Math.max(maxY, p.grid.y + p.grid.h);
const ROWH = Math.min(36, Math.floor((2000 - 60) / maxY));

function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function fmt(v, unit, dec) {
  if (v === null || v === undefined || isNaN(v)) return "-";
  const d = (x, n) => (dec !== undefined && dec !== null) ? x.toFixed(dec) :
    (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 10 ? x.toFixed(n > 1 ? 1 : n) :
     x.toFixed(n));
  const a = Math.abs(v);
  switch (unit) {
    case "s": return a === 0 ? "0 s" : a < 1e-3 ? d(v * 1e6, 0) + " µs" :
      a < 1 ? d(v * 1e3, 1) + " ms" : a < 60 ? d(v, 2) + " s" : d(v / 60, 1) + " min";
    case "percentunit": return d(v * 100, 1) + "%";
    case "reqps": return d(v, 2) + " req/s";
    case "bytes": { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0, x = v;
      while (Math.abs(x) >= 1024 && i < 4) { x /= 1024; i++; } return d(x, 1) + " " + u[i]; }
    case "watt": return d(v, 0) + " W";
    case "celsius": return d(v, 0) + " °C";
    case "currencyUSD": return "$" + d(v, 2);
    case "x": return d(v, 2) + "×";
    default: if (Number.isInteger(v) && (dec === undefined || dec === null)) return String(v);
      return a >= 1e6 ? d(v / 1e6, 1) + " M" : a >= 1e3 ? d(v / 1e3, 1) + " K" : d(v, 2);
  }
}
function hhmmss(t) { const x = new Date(t * 1000);
  return x.toTimeString().slice(0, 8); }
function niceTicks(lo, hi, n) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = []; for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step)
    out.push(+v.toPrecision(12));
  return out;
}
function frame(div, p) {
  const w = p.grid.w * COLW - 8, h = p.grid.h * ROWH - 8;
  const svg = el("svg", {width: w, height: h - 24}, div);
  return [svg, w, h - 24];
}
function legendBox(div, items) {
  const lg = document.createElement("div"); lg.className = "legend";
  for (const [name, color, dashed] of items) {
    const s = document.createElement("span");
    const dash = dashed ? "height:2px;border-top:1px dashed " + color : "";
    s.innerHTML = `<i style="background:${color};${dash}"></i>`;
    s.appendChild(document.createTextNode(name)); lg.appendChild(s);
  }
  div.appendChild(lg);
}
function noData(svg, w, h) {
  const t = el("text", {x: w / 2, y: h / 2, "text-anchor": "middle", class: "nodata"}, svg);
  t.textContent = "No data";
}
function timeAxis(svg, x0, x1, y, sx) {
  for (const t of niceTicks(M.start, M.end, 5)) {
    if (t < M.start || t > M.end) continue;
    const x = sx(t);
    el("line", {x1: x, x2: x, y1: 0, y2: y, stroke: "#25272d"}, svg);
    const tx = el("text", {x: x, y: y + 12, "text-anchor": "middle"}, svg);
    tx.textContent = hhmmss(t);
  }
}
function drawSeries(div, p, d) {
  const [svg, w, h] = frame(div, p);
  const series = d.series;
  if (!series.length) return noData(svg, w, h);
  const items = series.map((s, i) => [s.name, s.dashed ? "#f2495c" : COLORS[i % COLORS.length],
                                      s.dashed]);
  const legendH = Math.min(46, 15 * Math.ceil(items.length / Math.max(1, Math.floor(w / 150))));
  const left = 62, top = 6, bottom = 18 + legendH, right = 10;
  const ph = h - top - bottom, pw = w - left - right;
  // stacked values
  let stacked = series.map(s => s.points.map(pt => [pt[0], pt[1]]));
  if (p.stack) {
    const acc = {};
    stacked = series.map(s => s.points.map(([t, v]) => { acc[t] = (acc[t] || 0) + v;
                                                          return [t, acc[t]]; }));
  }
  let hi = -Infinity, lo = Infinity;
  for (const s of stacked) for (const [, v] of s) { if (isFinite(v)) {
    hi = Math.max(hi, v); lo = Math.min(lo, v); } }
  // Exemplars widen the axis a little at most; far outliers stay off the chart.
  const seriesHi = hi;
  for (const e of d.exemplars) hi = Math.max(hi, Math.min(e[1], seriesHi * 1.5));
  if (p.max !== undefined && p.max !== null) hi = Math.max(hi, p.max);
  lo = Math.min(0, lo); if (!isFinite(hi)) hi = 1; if (hi === lo) hi = lo + 1;
  const ticks = niceTicks(lo, hi * 1.05, 4); hi = Math.max(hi, ticks[ticks.length - 1]);
  const sx = t => left + (t - M.start) / (M.end - M.start) * pw;
  const sy = v => top + ph - (v - lo) / (hi - lo) * ph;
  const g = el("g", {}, svg);
  for (const v of ticks) {
    el("line", {x1: left, x2: left + pw, y1: sy(v), y2: sy(v), stroke: "#25272d"}, g);
    const tx = el("text", {x: left - 6, y: sy(v) + 3, "text-anchor": "end"}, g);
    tx.textContent = fmt(v, p.unit);
  }
  timeAxis(g, left, left + pw, top + ph, sx);
  stacked.forEach((pts, i) => {
    const color = items[i][1];
    const segs = []; let cur = [];
    let prev = null;
    for (const [t, v] of pts) {
      if (!isFinite(v) || (prev !== null && t - prev > 3 * (M.end - M.start) / 150)) {
        if (cur.length) segs.push(cur); cur = []; }
      if (isFinite(v)) cur.push([sx(t), sy(v)]); prev = t;
    }
    if (cur.length) segs.push(cur);
    for (const s of segs) {
      const dpath = "M" + s.map(q => q[0].toFixed(1) + "," + q[1].toFixed(1)).join("L");
      if (!series[i].dashed) {
        const base = sy(Math.max(lo, 0));
        el("path", {d: dpath + `L${s[s.length - 1][0]},${base}L${s[0][0]},${base}Z`,
                    fill: color, "fill-opacity": p.stack ? 0.25 : 0.1, stroke: "none"}, g);
      }
      el("path", {d: dpath, fill: "none", stroke: color, "stroke-width": 1.5,
                  "stroke-dasharray": series[i].dashed ? "8,6" : "none"}, g);
    }
  });
  for (const [t, v] of d.exemplars) {
    if (t < M.start || v > hi) continue;
    const x = sx(t), y = sy(v);
    el("path", {d: `M${x},${y - 3}L${x + 3},${y}L${x},${y + 3}L${x - 3},${y}Z`,
                fill: "#ff00ff", "fill-opacity": 0.45}, g);
  }
  if (d.exemplars.length) items.push([`exemplars (${d.exemplars.length} trace ids)`,
                                      "#ff00ff", false]);
  legendBox(div, items);
}
function drawHeatmap(div, p, d) {
  const [svg, w, h] = frame(div, p);
  const hm = d.heatmap;
  if (!hm || !hm.times.length) return noData(svg, w, h);
  // Drop empty top and bottom buckets, as Grafana's le layout does visually.
  let first = hm.les.length, last = -1;
  hm.counts.forEach(r => r.forEach((c, j) => { if (c > 0) { first = Math.min(first, j);
                                                          last = Math.max(last, j); } }));
  if (last < 0) return noData(svg, w, h);
  first = Math.max(0, first - 1); last = Math.min(hm.les.length - 1, last + 1);
  const les = hm.les.slice(first, last + 1);
  const left = 62, top = 6, bottom = 36, right = 10;
  const ph = h - top - bottom, pw = w - left - right;
  let max = 0; hm.counts.forEach(r => r.forEach(c => { max = Math.max(max, c); }));
  const sx = t => left + (t - M.start) / (M.end - M.start) * pw;
  const rowH = ph / les.length, step = hm.times.length > 1 ? hm.times[1] - hm.times[0] : 1;
  const cw = Math.max(1, sx(M.start + step) - sx(M.start));
  timeAxis(svg, left, left + pw, top + ph, sx);
  hm.times.forEach((t, i) => hm.counts[i].slice(first, last + 1).forEach((c, j) => {
    if (c <= 0) return;
    const f = Math.pow(c / max, 0.5);
    const col = `rgb(${Math.round(80 + 175 * f)},${Math.round(40 + 110 * f)},` +
                `${Math.round(10 + 20 * f)})`;
    el("rect", {x: sx(t) - cw, y: top + ph - (j + 1) * rowH, width: Math.max(1, cw + 0.3),
                height: Math.max(1, rowH - 1), fill: col}, svg);
  }));
  const every = Math.ceil(les.length / Math.max(1, Math.floor(ph / 14)));
  les.forEach((le, j) => { if (j % every) return;
    const tx = el("text", {x: left - 6, y: top + ph - j * rowH - rowH / 2 + 3,
                           "text-anchor": "end"}, svg);
    tx.textContent = le === "+Inf" ? "+Inf" : fmt(parseFloat(le), p.unit); });
  // exemplars: placed in the bucket their value falls into
  for (const [t, v] of d.exemplars) {
    let j = les.findIndex(le => le === "+Inf" || v <= parseFloat(le));
    if (j < 0) continue;
    const x = sx(t), y = top + ph - j * rowH - rowH / 2;
    el("path", {d: `M${x},${y - 3}L${x + 3},${y}L${x},${y + 3}L${x - 3},${y}Z`,
                fill: "#ff00ff", "fill-opacity": 0.45}, svg);
  }
  legendBox(div, [["fewer", "rgb(80,40,10)", false], [`more (max ${fmt(max)} per interval)`,
                  "rgb(255,150,30)", false]].concat(d.exemplars.length ?
                  [[`exemplars (${d.exemplars.length} trace ids)`, "#ff00ff", false]] : []));
}
function stepColor(steps, v) {
  let c = "#73bf69";
  const named = {green: "#73bf69", orange: "#ff9830", red: "#f2495c", yellow: "#fade2a"};
  for (const s of steps || []) if (s.value === null || v >= s.value) c = named[s.color] || s.color;
  return c;
}
function drawStat(div, p, d) {
  const [svg, w, h] = frame(div, p);
  const series = d.series;
  if (!series.length) return noData(svg, w, h);
  const n = series.length, cw = w / n;
  series.forEach((s, i) => {
    const pts = s.points.filter(q => isFinite(q[1]));
    const v = pts.length ? pts[pts.length - 1][1] : NaN;
    const color = stepColor(p.steps, v);
    const x0 = i * cw;
    if (p.graph === "area" && pts.length > 1) {
      let lo = 0, hi = Math.max(...pts.map(q => q[1])); if (hi <= lo) hi = lo + 1;
      const sx = t => x0 + (t - M.start) / (M.end - M.start) * cw;
      const sy = y => h - 4 - (y - lo) / (hi - lo) * (h * 0.45);
      const dp = "M" + pts.map(q => sx(q[0]).toFixed(1) + "," + sy(q[1]).toFixed(1)).join("L");
      el("path", {d: dp + `L${sx(pts[pts.length - 1][0])},${h}L${sx(pts[0][0])},${h}Z`,
                  fill: color, "fill-opacity": 0.18}, svg);
      el("path", {d: dp, fill: "none", stroke: color, "stroke-width": 1}, svg);
    }
    const big = Math.min(h * 0.36, cw / 5.5);
    const t = el("text", {x: x0 + cw / 2, y: n > 1 ? h * 0.52 : h * 0.5,
                          "text-anchor": "middle",
                          style: `font-size:${big}px;fill:${color};font-weight:500`}, svg);
    t.textContent = fmt(v, p.unit, p.decimals);
    if (n > 1) { const lt = el("text", {x: x0 + cw / 2, y: h * 0.52 - big - 4,
                                        "text-anchor": "middle", style: "font-size:12px"}, svg);
                 lt.textContent = s.name; }
  });
}
document.getElementById("top").innerHTML = `<h1>${M.title}</h1>` +
  M.vars.map(v => `<span class="var"><b>${v}</b>` +
                  `${v === "datasource" ? "Prometheus" : "All"}</span>`).join("") +
  `<span id="range">${hhmmss(M.start)} – ${hhmmss(M.end)} · ` +
  `last ${Math.round((M.end - M.start) / 60)} min</span>`;
const grid = document.getElementById("grid");
grid.style.height = (maxY * ROWH) + "px";
for (const p of M.panels) {
  const x = p.grid.x * COLW, y = p.grid.y * ROWH;
  if (p.type === "row") {
    const r = document.createElement("div"); r.className = "row";
    r.style.left = x + 4 + "px"; r.style.top = y + 8 + "px"; r.textContent = "⌄  " + p.title;
    grid.appendChild(r); continue;
  }
  const div = document.createElement("div"); div.className = "panel";
  div.style.left = x + 4 + "px"; div.style.top = y + 4 + "px";
  div.style.width = p.grid.w * COLW - 8 + "px"; div.style.height = p.grid.h * ROWH - 8 + "px";
  const t = document.createElement("div"); t.className = "t"; t.textContent = p.title;
  div.appendChild(t); grid.appendChild(div);
  const d = M.data[String(p.id)] || {series: [], exemplars: []};
  if (p.type === "heatmap") drawHeatmap(div, p, d);
  else if (p.type === "stat") drawStat(div, p, d);
  else drawSeries(div, p, d);
}
</script></body></html>
"""

if __name__ == "__main__":
    raise SystemExit(main())
