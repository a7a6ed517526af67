// CPUs and GPUs in the pool and which job or instance holds them.
import { api, h, poll } from "./api.js";

export function capacityView(root) {
  const summary = h("div", { class: "grid card", id: "capacity-summary" });
  const holders = h("tbody", { id: "holders" });
  root.append(h("h1", {}, "Capacity"), summary,
    h("table", {}, h("thead", {}, h("tr", {}, ["holder", "kind", "CPUs", "GPUs", "node"].map((c) => h("th", {}, c)))), holders));

  async function refresh() {
    const c = await api("/v1/capacity");
    const stat = (k, v) => h("div", { dataset: { stat: k } }, h("div", { class: "k" }, k), h("div", { class: "v" }, v));
    summary.replaceChildren(
      stat("CPUs", `${c.total_cpus - c.free_cpus} held / ${c.total_cpus}`),
      stat("GPUs", `${c.total_gpus - c.free_gpus} held / ${c.total_gpus}`),
      stat("free", `${c.free_cpus} CPUs, ${c.free_gpus} GPUs`));
    holders.replaceChildren(...c.holders.map((x) => h("tr", { dataset: { owner: x.owner } },
      h("td", {}, x.kind === "job" ? h("a", { href: `#/job/${encodeURIComponent(x.owner)}` }, x.owner) : x.owner),
      h("td", {}, x.kind), h("td", {}, String(x.cpus)), h("td", {}, x.gpu_ids.join(",") || "-"), h("td", {}, x.node || "-"))));
    if (!c.holders.length) holders.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "Nothing is held: the pool is idle.")));
  }
  return poll(refresh, 2000);
}
