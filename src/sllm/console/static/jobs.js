// The jobs table: newest first, filtered by status, paged with the list route's `after` cursor,
// refreshed every 2 s.
import { age, api, badge, duration, h, num, poll } from "./api.js";

const STATUSES = ["", "pending", "running", "paused", "completed", "failed", "cancelled"];

export function progressCell(p) {
  if (!p || !p.total_steps) return p && p.step ? `step ${p.step}` : "-";
  const pct = Math.min(100, (100 * (p.step || 0)) / p.total_steps);
  return h("span", {}, h("span", { class: "bar" }, h("span", { style: `width:${pct.toFixed(0)}%` })),
    `${p.step || 0}/${p.total_steps}`);
}

export function jobsView(root, query) {
  const status = query.get("status") || "";
  const pageSize = Math.max(1, Number(query.get("limit")) || 20);
  const cursors = []; // `after` of each page before this one
  let after = null;
  const body = h("tbody", { id: "jobs-body" });
  const pageInfo = h("span", { class: "muted small", id: "page-info" });
  const prev = h("button", { id: "prev-page", disabled: true, onclick: () => { after = cursors.pop() ?? null; refresh(); } }, "Newer");
  const next = h("button", { id: "next-page", disabled: true, onclick: () => { cursors.push(after); after = lastId; refresh(); } }, "Older");
  const filter = h("select", {
    id: "status-filter",
    onchange: (e) => { location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : "#/jobs"; },
  }, STATUSES.map((s) => h("option", { value: s, selected: s === status }, s || "all statuses")));
  let lastId = null;

  root.append(
    h("h1", {}, "Fine-tuning jobs"),
    h("div", { class: "toolbar" }, h("label", {}, "Status ", filter), prev, next, pageInfo,
      h("a", { href: "#/new", style: "margin-left:auto" }, h("button", { class: "primary" }, "New job"))),
    h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["id", "model", "status", "priority", "progress", "loss", "tokens/s", "ETA", "age"]
        .map((c, i) => h("th", { class: i >= 3 && i !== 4 ? "num" : "" }, c)))),
      body),
  );

  async function refresh() {
    const params = new URLSearchParams({ limit: String(pageSize) });
    if (status) params.set("status", status);
    if (after) params.set("after", after);
    const list = await api(`/v1/fine_tuning/jobs?${params}`);
    lastId = list.data.length ? list.data[list.data.length - 1].id : null;
    prev.disabled = cursors.length === 0 && !after;
    next.disabled = !list.has_more;
    pageInfo.textContent = `page ${cursors.length + 1}`;
    body.replaceChildren(...list.data.map(row));
    if (!list.data.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs.")));
  }

  function row(job) {
    const s = job.status, p = s.progress || {};
    const open = () => { location.hash = `#/job/${encodeURIComponent(job.id)}`; };
    return h("tr", { class: "clickable", dataset: { jobId: job.id, status: s.status }, onclick: open },
      h("td", {}, h("a", { href: `#/job/${encodeURIComponent(job.id)}` }, job.id)),
      h("td", {}, s.config.model || "-"),
      h("td", {}, badge(s.status), s.pending_reason ? h("div", { class: "muted small pending-reason" }, s.pending_reason) : null),
      h("td", { class: "num" }, String(s.priority)),
      h("td", {}, progressCell(p)),
      h("td", { class: "num" }, num(p.loss)),
      h("td", { class: "num" }, num(p.tokens_per_second, 3)),
      h("td", { class: "num" }, s.status === "running" ? duration(p.eta_seconds) : "-"),
      h("td", { class: "num" }, age(s.created_time)),
    );
  }

  return poll(refresh, 2000);
}
