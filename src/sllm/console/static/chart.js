// A small SVG line chart: series of (x, y) points on shared axes, redrawn in place as they grow.
const NS = "http://www.w3.org/2000/svg";
const W = 960, PAD = { l: 56, r: 14, t: 12, b: 30 };

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.001) return v.toExponential(1);
  return String(+v.toPrecision(3));
}

// series: [{name, color, points: [[x, y], ...], dots}]; `svg` is cleared and redrawn.
export function drawChart(svg, series, { xLabel = "step", empty = "No points yet.", height: H = 300 } = {}) {
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  svg.dataset.points = String(all.length);
  for (const s of series) svg.dataset[`points${s.key || ""}`] = String(s.points.length);
  if (!all.length) {
    svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, empty));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const sy = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  for (const v of ticks(y0, y1, 5)) {
    svg.append(node("line", { class: "grid-line", x1: PAD.l, x2: W - PAD.r, y1: sy(v), y2: sy(v) }));
    svg.append(node("text", { x: PAD.l - 6, y: sy(v) + 4, "text-anchor": "end" }, fmt(v)));
  }
  for (const v of ticks(x0, x1, 8)) {
    if (xLabel === "step" && !Number.isInteger(v)) continue;
    svg.append(node("text", { x: sx(v), y: H - PAD.b + 16, "text-anchor": "middle" }, fmt(v)));
  }
  svg.append(node("line", { x1: PAD.l, x2: PAD.l, y1: PAD.t, y2: H - PAD.b, stroke: "#b9c2d3" }));
  svg.append(node("line", { x1: PAD.l, x2: W - PAD.r, y1: H - PAD.b, y2: H - PAD.b, stroke: "#b9c2d3" }));
  svg.append(node("text", { x: W - PAD.r, y: H - 2, "text-anchor": "end" }, xLabel));
  for (const s of series) {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!pts.length) continue;
    const d = pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    svg.append(node("polyline", { points: d, fill: "none", stroke: s.color, "stroke-width": 2, class: `series-${s.key || "main"}` }));
    if (s.dots || pts.length < 40) {
      for (const [x, y] of pts) {
        const c = node("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: s.color });
        c.append(node("title", {}, `${s.name} at ${xLabel} ${x}: ${fmt(y)}`));
        svg.append(c);
      }
    }
  }
}
