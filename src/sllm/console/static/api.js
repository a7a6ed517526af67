// The API client (with the session's key) and small DOM and formatting helpers.
const KEY = "sllm.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const err = body && body.error;
    super(err ? err.message : `HTTP ${status}`);
    this.status = status;
    this.param = err ? err.param : null;
    this.body = body;
  }
}

let onUnauthorised = () => {};
export function whenUnauthorised(fn) { onUnauthorised = fn; }
export function apiKey() { return sessionStorage.getItem(KEY); }
export function setApiKey(key) { sessionStorage.setItem(KEY, key); }

// JSON in, JSON out; `form` sends multipart (the Files API). A 401 opens the key prompt.
export async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const resp = await fetch(path, { method, headers, body });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { error: { message: text } }; }
  if (resp.status === 401) onUnauthorised(Boolean(key));
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// h("div", {class: "x", onclick: f}, child, "text", ...): DOM without innerHTML (no injection).
export function h(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(n.dataset, v);
    else if (k in n && typeof v !== "string") n[k] = v;
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) n.append(c instanceof Node ? c : String(c));
  return n;
}

export function parseTime(iso) {
  if (!iso) return null;
  return Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`); // the server's are UTC
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function age(iso) {
  const t = parseTime(iso);
  return t === null ? "-" : duration((Date.now() - t) / 1000);
}

export function num(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  return typeof v === "number" ? String(+v.toPrecision(digits)) : String(v);
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function badge(value, prefix = "status") {
  return h("span", { class: `badge ${prefix}-${value}` }, value);
}

// Runs `fn` now and every `ms` until the returned stop() (or a view change) ends it.
export function poll(fn, ms) {
  let stopped = false, timer = null;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } catch (e) { if (!(e instanceof ApiError)) console.error(e); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
