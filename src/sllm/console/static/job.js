// One job: status and timings, the loss chart (train, and validation where the job has one),
// learning rate, events, the worker's log, the config, the adapter's files, and its actions.
import { age, api, ApiError, badge, bytes, duration, h, num, parseTime, poll } from "./api.js";
import { drawChart } from "./chart.js";
import { progressCell } from "./jobs.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const LOG_TAIL_LINES = 500;
const LOG_PAGE_BYTES = 256 * 1024;
const LOG_KEEP_CHARS = 512 * 1024;

export const CLONE_KEY = "sllm.cloneConfig";

function lossPoints(events) {
  const train = [], valid = [], lr = [];
  for (const e of events) {
    const d = e.data || {};
    const step = Number(d.step);
    if (!Number.isFinite(step)) continue;
    if (e.type === "loss" && typeof d.loss === "number") train.push([step, d.loss]);
    const v = d.valid_loss ?? d.eval_loss;
    if (typeof v === "number") valid.push([step, v]);
    if (typeof d.learning_rate === "number") lr.push([step, d.learning_rate]);
  }
  return { train, valid, lr };
}

export function jobView(root, id) {
  const enc = encodeURIComponent(id);
  const base = `/v1/fine_tuning/jobs/${enc}`;
  const events = [];
  let lastEvent = null, job = null, finalRound = false;

  const title = h("h1", {}, "Job ", h("code", {}, id), " ", h("span", { id: "job-status" }));
  const message = h("div", { id: "action-message", class: "small" });
  const cancelBtn = h("button", { id: "cancel-job", class: "danger", onclick: cancel }, "Cancel");
  const pauseBtn = h("button", { id: "pause-job", onclick: () => act("pause", "Pause requested: the job checkpoints at its next step, then stops.") }, "Pause");
  const resumeBtn = h("button", { id: "resume-job", onclick: () => act("resume", "Resumed: queued again.") }, "Resume");
  const cloneBtn = h("button", { id: "clone-job", onclick: clone }, "Clone as new job");
  const adapterName = h("input", { id: "deploy-name", placeholder: "adapter name", size: 18 });
  const deployBtn = h("button", { id: "deploy-adapter", class: "primary", onclick: deploy }, "Deploy adapter");
  const stats = h("div", { class: "grid", id: "job-stats" });
  const chart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  chart.setAttribute("id", "loss-chart");
  chart.setAttribute("class", "chart");
  const lrChart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  lrChart.setAttribute("id", "lr-chart");
  lrChart.setAttribute("class", "chart");
  const lrBox = h("div", { hidden: true }, h("h2", {}, "Learning rate"), lrChart);
  const legend = h("div", { class: "legend" },
    h("span", {}, h("i", { style: "background:#2f6fde" }), "training loss"),
    h("span", { id: "valid-legend", hidden: true }, h("i", { style: "background:#e0702b" }), "validation loss"));
  const eventsBody = h("tbody", { id: "events-body" });
  const log = h("pre", { id: "worker-log" }, "loading...");
  const config = h("pre", { id: "job-config" });
  const files = h("tbody", { id: "adapter-files" });

  root.append(
    h("p", { class: "small" }, h("a", { href: "#/jobs" }, "< all jobs")),
    title,
    h("div", { class: "toolbar" }, cancelBtn, pauseBtn, resumeBtn, cloneBtn, adapterName, deployBtn, message),
    h("div", { class: "card" }, stats),
    h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Loss"), legend, chart, lrBox),
    h("div", { class: "two" },
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Events"),
        h("div", { class: "scroll", id: "events-scroll" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "level"), h("th", {}, "type"), h("th", {}, "message"))),
          eventsBody))),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Worker log"), log)),
    h("div", { class: "two" },
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Config"), config),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Adapter files"),
        h("div", { class: "small muted", id: "adapter-path" }),
        h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "file"), h("th", { class: "num" }, "size"))), files))),
  );

  function showStats() {
    const s = job.status, p = s.progress || {};
    document.getElementById("job-status").replaceChildren(badge(s.status));
    const started = parseTime(s.started_time), finished = parseTime(s.finished_time);
    const ran = started ? ((finished || Date.now()) - started) / 1000 : null;
    const created = parseTime(s.created_time);
    const waited = created === null ? null : ((started || Date.now()) - created) / 1000;
    const items = [
      ["model", s.config.model], ["status", s.status], ["priority", s.priority],
      ["pending because", s.pending_reason], ["created", `${s.created_time} (${age(s.created_time)} ago)`],
      ["started", s.started_time || "-"], ["finished", s.finished_time || "-"],
      ["waited", duration(waited)], ["ran", duration(ran)],
      ["progress", progressCell(p)], ["epoch", num(p.epoch, 3)], ["loss", num(p.loss)],
      ["learning rate", num(p.learning_rate, 3)], ["tokens/s", num(p.tokens_per_second, 3)],
      ["trained tokens", p.trained_tokens ?? "-"], ["ETA", s.status === "running" ? duration(p.eta_seconds) : "-"],
      ["CPUs / GPUs", `${s.config.num_cpus ?? 1} / ${s.config.num_gpus ?? 0}`],
      ["adapter", s.adapter_path || "-"],
    ];
    stats.replaceChildren(...items.filter(([, v]) => v !== undefined && v !== null).map(([k, v]) =>
      h("div", { dataset: { stat: k } }, h("div", { class: "k" }, k), h("div", { class: "v" }, v))));
    if (s.error) stats.append(h("div", { class: "error", style: "grid-column:1/-1", id: "job-error" }, `${s.error.kind}: ${s.error.message}`));
    cancelBtn.disabled = TERMINAL.has(s.status);
    pauseBtn.hidden = !(s.status === "pending" || s.status === "running");
    resumeBtn.hidden = s.status !== "paused";
    deployBtn.disabled = adapterName.disabled = s.status !== "completed";
    if (!adapterName.value) adapterName.value = `ft-${id.replace(/^job-/, "").slice(0, 8)}`;
    const text = JSON.stringify(s.config, null, 2);
    if (config.textContent !== text) config.textContent = text;
  }

  async function loadEvents() {
    for (;;) {
      const params = new URLSearchParams({ limit: "1000" });
      if (lastEvent !== null) params.set("after", String(lastEvent));
      const page = await api(`${base}/events?${params}`);
      for (const e of page.data) {
        events.push(e);
        lastEvent = e.id;
        eventsBody.append(h("tr", { dataset: { type: e.type } },
          h("td", { class: "small muted" }, e.created_time.replace("T", " ").slice(0, 19)),
          h("td", {}, e.level), h("td", {}, e.type), h("td", {}, e.message)));
      }
      if (!page.has_more || !page.data.length) break;
    }
    const { train, valid, lr } = lossPoints(events);
    drawChart(chart, [
      { key: "Train", name: "training loss", color: "#2f6fde", points: train },
      { key: "Valid", name: "validation loss", color: "#e0702b", points: valid, dots: true },
    ], { empty: "No loss points yet: they appear as the job trains." });
    document.getElementById("valid-legend").hidden = !valid.length;
    lrBox.hidden = !lr.length;
    if (lr.length) drawChart(lrChart, [{ name: "learning rate", color: "#1f8a4c", points: lr }], { height: 150 });
  }

  // The worker's log: its last lines first, then only what was appended (`next_offset`).
  let logOffset = null, logText = "";
  async function loadLog() {
    try {
      const out = logOffset === null
        ? await api(`${base}/logs?tail=${LOG_TAIL_LINES}`)
        : await api(`${base}/logs?offset=${logOffset}&limit=${LOG_PAGE_BYTES}`);
      if (logOffset !== null && typeof out.size === "number" && out.size < logOffset) {
        logOffset = null; // the log was started over: read its tail again
        logText = "";
        return;
      }
      if (typeof out.next_offset === "number") logOffset = out.next_offset;
      const added = out.text || "";
      if (!added && logText) return;
      logText = (logText + added).slice(-LOG_KEEP_CHARS);
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = logText || "(the log is empty so far)";
      if (atEnd) log.scrollTop = log.scrollHeight;
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      log.textContent = e.status === 404 || e.status === 405 ? "Worker log not available." : `Cannot read the log: ${e.message}`;
    }
  }

  async function loadAdapter() {
    try {
      const out = await api(`${base}/adapter`);
      document.getElementById("adapter-path").textContent = out.path || "No adapter saved yet.";
      files.replaceChildren(...out.files.map((f) =>
        h("tr", {}, h("td", {}, f.name), h("td", { class: "num" }, bytes(f.size_bytes)))));
    } catch (e) {
      document.getElementById("adapter-path").textContent = `Adapter files not available (${e.message}).`;
    }
  }

  let tick = 0;
  async function refresh() {
    if (finalRound) return;
    try {
      job = await api(base);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        finalRound = true;
        root.replaceChildren(h("h1", {}, "No such job"), h("p", { class: "error", id: "job-missing" }, e.message),
          h("a", { href: "#/jobs" }, "All jobs"));
        return;
      }
      throw e;
    }
    const done = TERMINAL.has(job.status.status);
    showStats();
    await loadEvents();
    if (tick % 2 === 0 || done) await loadLog();
    if (tick === 0 || done) await loadAdapter();
    tick++;
    if (done) finalRound = true; // everything is read once more after the end, then polling stops
  }

  async function cancel() {
    cancelBtn.disabled = true;
    try {
      await api(`${base}/cancel`, { method: "POST" });
      message.textContent = "Cancel requested.";
      finalRound = false;
      await refresh();
    } catch (e) {
      message.replaceChildren(h("span", { class: "error" }, e.message));
    }
  }

  async function act(what, done) {
    pauseBtn.disabled = resumeBtn.disabled = true;
    try {
      await api(`${base}/${what}`, { method: "POST" });
      message.textContent = done;
      finalRound = false;
      await refresh();
    } catch (e) {
      message.replaceChildren(h("span", { class: "error" }, e.message));
    } finally {
      pauseBtn.disabled = resumeBtn.disabled = false;
    }
  }

  function clone() {
    sessionStorage.setItem(CLONE_KEY, JSON.stringify({ from: id, config: job.status.config }));
    location.hash = "#/new";
  }

  async function deploy() {
    const cfg = job.status.config;
    const out = (cfg.backend_config || {}).output_dir || adapterPathUnderStore(job.status.adapter_path);
    const name = adapterName.value.trim();
    if (!out || !name) { message.replaceChildren(h("span", { class: "error" }, "An adapter name is needed.")); return; }
    deployBtn.disabled = true;
    try {
      const dep = await api("/v1/deployments", { method: "POST", json: { model: cfg.model, enable_lora: true, lora_adapters: { [name]: out } } });
      message.replaceChildren(`Deployed as adapter "${name}" of ${dep.model}. `, h("a", { href: "#/models" }, "Open deployments"));
    } catch (e) {
      message.replaceChildren(h("span", { class: "error" }, e.message));
    } finally {
      deployBtn.disabled = false;
    }
  }

  function adapterPathUnderStore(path) {
    const m = path && path.match(/\/transformers\/(.+)$/);
    return m ? m[1] : null;
  }

  return poll(refresh, 1500);
}
