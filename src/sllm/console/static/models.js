// Stored models, deployments (adapters, instances) and a playground that sends one prompt to the
// base model and to one of its adapters side by side.
import { ApiError, api, badge, bytes, duration, h, poll } from "./api.js";

export function modelsView(root) {
  const stored = h("tbody", { id: "stored-models" });
  const deps = h("div", { id: "deployments" });
  const baseSel = h("select", { id: "play-model", onchange: () => fillAdapters() });
  const adapterSel = h("select", { id: "play-adapter" });
  const prompt = h("textarea", { id: "play-prompt", rows: 3, style: "width:100%" }, "Say hello like a pirate.");
  const maxTokens = h("input", { id: "play-max-tokens", type: "number", value: "48" });
  const temp = h("input", { id: "play-temperature", type: "number", value: "0", step: "0.1" });
  const outBase = h("div", { class: "answer card", id: "answer-base" });
  const outAdapter = h("div", { class: "answer card", id: "answer-adapter" });
  let deployments = [];

  root.append(
    h("h1", {}, "Models and deployments"),
    h("h2", {}, "Stored models"),
    h("table", {}, h("thead", {}, h("tr", {}, ["name", "size", "parameters", "dtype", "saved"].map((c) => h("th", {}, c)))), stored),
    h("h2", {}, "Deployments"), deps,
    h("h2", {}, "Playground"),
    h("div", { class: "card" },
      h("div", { class: "toolbar" }, h("label", {}, "Base model ", baseSel), h("label", {}, "Adapter ", adapterSel),
        h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temp),
        h("button", { class: "primary", id: "play-send", onclick: send }, "Send to both")),
      prompt,
      h("div", { class: "two" },
        h("div", {}, h("h2", {}, "Base model"), outBase),
        h("div", {}, h("h2", {}, "With adapter"), outAdapter))),
  );

  async function loadStored() {
    const list = await api("/v1/store/models");
    stored.replaceChildren(...list.data.map((m) => h("tr", {},
      h("td", {}, m.name), h("td", {}, bytes(m.size_bytes)),
      h("td", {}, m.parameter_count ? m.parameter_count.toLocaleString() : "-"),
      h("td", {}, m.dtype || "-"), h("td", { class: "small muted" }, (m.created_time || "-").slice(0, 19)))));
    if (!list.data.length) stored.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "The store is empty (sllm-store save ...).")));
  }

  function instanceRow(i) {
    return h("tr", { dataset: { instance: i.id } },
      h("td", {}, i.id), h("td", {}, badge(i.state, "state")), h("td", { class: "num" }, String(i.cpus)),
      h("td", {}, i.gpu_ids.length ? i.gpu_ids.join(",") : "-"), h("td", { class: "num" }, String(i.in_flight)),
      h("td", { class: "num" }, i.cold_start_seconds != null ? `${i.cold_start_seconds.toFixed(2)}s` : "-"),
      h("td", { class: "num" }, duration(i.idle_seconds)), h("td", {}, (i.adapters || []).join(", ") || "-"));
  }

  function depCard(d) {
    const c = d.config;
    return h("div", { class: "card", dataset: { deployment: d.model } },
      h("div", { class: "toolbar" }, h("strong", {}, d.model), badge(d.state, "state"),
        h("span", { class: "small muted" }, `min ${c.min_instances}, max ${c.max_instances}, keep-alive ${c.keep_alive}s, ` +
          `${c.num_cpus} CPU / ${c.num_gpus} GPU per instance, queued ${d.queued}`)),
      d.last_error ? h("div", { class: "error" }, d.last_error.split("\n")[0]) : null,
      h("div", { class: "small" }, "Adapters: ", d.adapters.length ? d.adapters.map((a) =>
        h("span", { style: "margin-right:12px", dataset: { adapter: a.name } }, badge(a.state, "state"), ` ${a.name} = ${a.path}`,
          a.error ? h("span", { class: "error" }, ` ${a.error}`) : null)) : h("span", { class: "muted" }, "none")),
      h("table", { style: "margin-top:8px" }, h("thead", {}, h("tr", {},
        ["instance", "state", "CPUs", "GPUs", "in flight", "cold start", "idle", "adapters loaded"].map((t) => h("th", {}, t)))),
        h("tbody", {}, d.instances.length ? d.instances.map(instanceRow) : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "no instances (cold)")))));
  }

  function fillAdapters() {
    const dep = deployments.find((d) => d.model === baseSel.value);
    const names = dep ? dep.adapters.filter((a) => a.state === "deployed").map((a) => a.name) : [];
    const keep = adapterSel.value;
    adapterSel.replaceChildren(...names.map((n) => h("option", { value: n, selected: n === keep }, n)));
    if (!names.length) adapterSel.append(h("option", { value: "" }, "(no adapter)"));
  }

  async function loadDeployments() {
    deployments = (await api("/v1/deployments")).data;
    deps.replaceChildren(...deployments.map(depCard));
    if (!deployments.length) deps.append(h("p", { class: "muted" }, "No deployments. Deploy an adapter from a completed job's page."));
    const keep = baseSel.value;
    baseSel.replaceChildren(...deployments.map((d) => h("option", { value: d.model, selected: d.model === keep }, d.model)));
    fillAdapters();
  }

  // Each pane shows its own request's answer or its error (never swallowed); a pane's state is in
  // data-state (pending, done, error) and the answer alone in its .answer-text. A click that
  // supersedes a slower earlier one wins: the earlier reply is dropped, not drawn over the newer.
  const latest = new Map();
  async function ask(out, body) {
    const seq = (latest.get(out) || 0) + 1;
    latest.set(out, seq);
    out.dataset.state = "pending";
    out.replaceChildren(h("span", { class: "muted" }, "..."));
    const t0 = performance.now();
    let shown;
    try {
      const r = await api("/v1/chat/completions", { method: "POST", json: body });
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      const content = r.choices[0].message.content;
      shown = ["done", h("div", { class: "answer-text" }, content),
        content ? null : h("span", { class: "muted" }, "(empty)"),
        h("div", { class: "small muted" }, `${secs}s, ${r.usage ? r.usage.completion_tokens : "?"} tokens`)];
    } catch (e) {
      const code = e instanceof ApiError ? `${e.status}: ` : "";
      shown = ["error", h("div", { class: "error answer-error" }, `${code}${e.message}`)];
    }
    if (latest.get(out) !== seq) return;
    out.dataset.state = shown[0];
    out.replaceChildren(...shown.slice(1));
  }

  function send() {
    const body = {
      model: baseSel.value,
      messages: [{ role: "user", content: prompt.value }],
      max_tokens: maxTokens.value === "" ? 48 : Number(maxTokens.value),
      temperature: temp.value === "" ? 0 : Number(temp.value),
    };
    ask(outBase, body);
    if (adapterSel.value) ask(outAdapter, { ...body, lora_adapter_name: adapterSel.value });
    else {
      latest.set(outAdapter, (latest.get(outAdapter) || 0) + 1);
      outAdapter.dataset.state = "error";
      outAdapter.replaceChildren(h("div", { class: "error answer-error" }, "Choose an adapter."));
    }
  }

  loadStored().catch(() => {});
  return poll(loadDeployments, 3000);
}
