// The new-job form: builds the seed's request (`POST /v1/fine_tuning/jobs`). Empty fields are left
// out, so the server's defaults (shown as placeholders) apply; a 400 is shown next to the field
// its `param` names. A cloned job's config is the starting point: keys the form has no field for
// are kept as they were.
import { api, ApiError, h } from "./api.js";
import { CLONE_KEY } from "./job.js";

const BC = "backend_config";
const DS = `${BC}.dataset_config`;
const LORA = `${BC}.lora_config`;
const TRAIN = `${BC}.training_config`;

// [param path, label, type, default shown, options]
const SECTIONS = [
  ["Job", "", [
    ["model", "Base model (from the store)", "model", ""],
    ["num_cpus", "CPUs", "int", "1"],
    ["num_gpus", "GPUs", "int", "0"],
    ["priority", "Priority (higher first)", "int", "0"],
    ["timeout", "Timeout (seconds)", "float", "server default"],
    [`${BC}.output_dir`, "Output dir (under the store)", "text", "ft_<model>_adapter"],
  ]],
  ["Dataset", DS, [
    [`${DS}.dataset_source`, "Source", "source", "local"],
    [`${DS}.data_files`, "Data files (path or glob)", "text", "", "local"],
    [`${DS}.extension_type`, "Format", "select", "json", "local", ["", "json", "csv", "parquet", "text"]],
    [`${DS}.hf_dataset_name`, "Dataset name", "text", "", "hf_hub"],
    [`${DS}.file_id`, "Uploaded file", "file", "", "file"],
    [`${DS}.tokenization_field`, "Text field (required)", "text", ""],
    [`${DS}.split`, "Split", "text", "train"],
  ]],
  ["LoRA", LORA, [
    [`${LORA}.r`, "r (rank)", "int", "8"],
    [`${LORA}.lora_alpha`, "lora_alpha", "float", "16"],
    [`${LORA}.lora_dropout`, "lora_dropout", "float", "0.05"],
    [`${LORA}.bias`, "bias", "select", "none", null, ["", "none", "all", "lora_only"]],
    [`${LORA}.target_modules`, "target_modules (comma-separated)", "list", "model's default"],
    [`${LORA}.task_type`, "task_type", "text", "CAUSAL_LM"],
  ]],
  ["Training", TRAIN, [
    [`${TRAIN}.num_train_epochs`, "Epochs", "float", "3"],
    [`${TRAIN}.max_steps`, "Max steps (overrides epochs)", "int", "-1"],
    [`${TRAIN}.learning_rate`, "Learning rate", "float", "5e-05"],
    [`${TRAIN}.per_device_train_batch_size`, "Batch size", "int", "8"],
    [`${TRAIN}.gradient_accumulation_steps`, "Gradient accumulation", "int", "1"],
    [`${TRAIN}.lr_scheduler_type`, "LR schedule", "select", "linear", null, ["", "linear", "cosine", "constant", "constant_with_warmup"]],
    [`${TRAIN}.warmup_ratio`, "Warmup ratio", "float", "0"],
    [`${TRAIN}.logging_steps`, "Logging steps", "float", "500"],
    [`${TRAIN}.seed`, "Seed", "int", "42"],
    [`${BC}.max_seq_length`, "Max sequence length", "int", "min(model, 1024)"],
    [`${BC}.batching`, "Batching", "select", "padding_free", null, ["", "padding_free", "padded", "token_budget"]],
  ]],
];

function getPath(obj, path) {
  return path.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}

function setPath(obj, path, value) {
  const keys = path.split(".");
  let o = obj;
  for (const k of keys.slice(0, -1)) {
    if (!o[k] || typeof o[k] !== "object") o[k] = {};
    o = o[k];
  }
  if (value === undefined) delete o[keys[keys.length - 1]];
  else o[keys[keys.length - 1]] = value;
}

export function newJobView(root) {
  const cloned = JSON.parse(sessionStorage.getItem(CLONE_KEY) || "null");
  sessionStorage.removeItem(CLONE_KEY);
  const base = cloned ? cloned.config : {
    ft_backend: "peft_lora",
    backend_config: { dataset_config: { dataset_source: "local", tokenization_field: "prompt" } },
  };
  const inputs = new Map(); // param -> input element
  const wrappers = new Map(); // param -> .field / fieldset element (where its error shows)
  const preview = h("pre", { id: "request-preview" });
  const formError = h("div", { class: "error", id: "form-error" });
  let filesApi = false;

  const form = h("form", { id: "new-job-form", novalidate: true, onsubmit: submit, oninput: update, onchange: update });
  root.append(h("h1", {}, "New fine-tuning job"),
    cloned ? h("p", { class: "muted", id: "cloned-from" }, `Cloned from ${cloned.from}; settings the form does not show are kept.`) : null,
    h("div", { class: "two" }, form, h("div", {}, h("h2", { style: "margin-top:0" }, "Request"), preview)));

  for (const [title, param, fields] of SECTIONS) {
    const fs = h("fieldset", { dataset: { param } }, h("legend", {}, title));
    for (const f of fields) fs.append(field(...f));
    fs.append(h("div", { class: "field-error", dataset: { errorFor: param } }));
    if (param) wrappers.set(param, fs);
    form.append(fs);
  }
  form.append(h("div", { class: "toolbar" }, h("button", { class: "primary", type: "submit", id: "submit-job" }, "Submit job"), formError));

  function field(param, label, type, def, onlyFor, options) {
    let input;
    if (type === "model") {
      input = h("select", { name: param }, h("option", { value: "" }, "loading models..."));
    } else if (type === "select") {
      input = h("select", { name: param }, options.map((o) => h("option", { value: o }, o || `(default: ${def})`)));
    } else if (type === "source") {
      input = h("select", { name: param }, ["local", "hf_hub"].map((o) => h("option", { value: o }, o)));
    } else if (type === "file") {
      input = h("input", { name: param, type: "hidden" });
    } else {
      input = h("input", { name: param, type: "text", placeholder: def ? `default: ${def}` : "" });
    }
    input.dataset.type = type;
    inputs.set(param, input);
    const wrap = h("div", { class: "field", dataset: { param, onlyFor: onlyFor || "" } },
      h("label", {}, label, def && type !== "select" && type !== "model" ? h("span", { class: "muted" }, ` (${def})`) : null),
      input);
    if (type === "file") {
      const picker = h("input", { type: "file", id: "dataset-file", onchange: upload });
      const status = h("span", { class: "small muted", id: "upload-status" });
      wrap.append(picker, status);
    }
    wrap.append(h("div", { class: "field-error", dataset: { errorFor: param } }));
    wrappers.set(param, wrap);
    return wrap;
  }

  async function upload(e) {
    const file = e.target.files[0];
    const status = document.getElementById("upload-status");
    if (!file) return;
    clearErrors();
    inputs.get(`${DS}.file_id`).value = "";
    status.textContent = "uploading...";
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", file);
    try {
      const out = await api("/v1/files", { method: "POST", form: data });
      inputs.get(`${DS}.file_id`).value = out.id;
      status.textContent = `uploaded as ${out.id}`;
      update();
    } catch (err) {
      status.textContent = "";
      showError({ message: err.message }, `${DS}.file_id`); // the Files API's `param` is its own `file`
    }
  }

  function prefill() {
    for (const [param, input] of inputs) {
      const v = getPath(base, param);
      if (v === undefined || v === null) continue;
      input.value = Array.isArray(v) ? v.join(", ") : String(v);
    }
    const src = getPath(base, `${DS}.dataset_source`);
    if (src) inputs.get(`${DS}.dataset_source`).value = src;
  }

  function read(input) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    switch (input.dataset.type) {
      case "int": case "float": {
        const n = Number(raw);
        return Number.isFinite(n) ? n : raw; // the server names a bad number
      }
      case "list": return raw.split(",").map((s) => s.trim()).filter(Boolean);
      default: return raw;
    }
  }

  function build() {
    const req = structuredClone(base);
    const source = inputs.get(`${DS}.dataset_source`).value;
    for (const [param, input] of inputs) {
      const wrap = wrappers.get(param);
      const only = wrap.dataset.onlyFor;
      setPath(req, param, only && only !== source ? undefined : read(input));
    }
    return req;
  }

  function update() {
    const source = inputs.get(`${DS}.dataset_source`).value;
    for (const wrap of form.querySelectorAll(".field[data-only-for]")) {
      wrap.hidden = Boolean(wrap.dataset.onlyFor) && wrap.dataset.onlyFor !== source;
    }
    preview.textContent = JSON.stringify(build(), null, 2);
  }

  function clearErrors() {
    formError.textContent = "";
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll(".has-error")) el.classList.remove("has-error");
  }

  // The error goes next to the field its param names, else the nearest section, else the form.
  function showError(err, fallback) {
    let param = (err instanceof ApiError && err.param) || fallback || "";
    while (param && !wrappers.has(param)) param = param.includes(".") ? param.slice(0, param.lastIndexOf(".")) : "";
    if (!param) { formError.textContent = err.message; return; }
    const wrap = wrappers.get(param);
    wrap.classList.add("has-error");
    wrap.querySelector(`:scope > .field-error`).textContent = err.message;
    wrap.scrollIntoView({ block: "center" });
  }

  async function submit(e) {
    e.preventDefault();
    clearErrors();
    const button = document.getElementById("submit-job");
    button.disabled = true;
    try {
      const out = await api("/v1/fine_tuning/jobs", { method: "POST", json: build() });
      location.hash = `#/job/${encodeURIComponent(out.job_id)}`;
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  }

  async function loadChoices() {
    const select = inputs.get("model");
    try {
      const models = await api("/v1/store/models");
      const names = models.data.map((m) => m.name);
      const wanted = getPath(base, "model");
      if (wanted && !names.includes(wanted)) names.unshift(wanted);
      select.replaceChildren(h("option", { value: "" }, names.length ? "choose a model" : "no models in the store"),
        ...names.map((n) => h("option", { value: n, selected: n === wanted }, n)));
    } catch (err) {
      select.replaceChildren(h("option", { value: "" }, `cannot list models: ${err.message}`));
    }
    try { // the Files API, where the server has it: offer an upload as a dataset source
      await api("/v1/files");
      filesApi = true;
    } catch { filesApi = false; }
    if (filesApi) inputs.get(`${DS}.dataset_source`).append(h("option", { value: "file" }, "uploaded file"));
    prefill();
    update();
    form.dataset.ready = "true"; // models and sources are known
  }

  prefill();
  update();
  loadChoices();
  return () => {};
}
