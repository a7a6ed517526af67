// The console's router: `#/jobs`, `#/job/<id>`, `#/new`, `#/models`, `#/capacity`. Each view
// renders into <main> and returns a function that stops its polling when another view opens.
import { api, apiKey, h, setApiKey, whenUnauthorised } from "./api.js";
import { jobsView } from "./jobs.js";
import { jobView } from "./job.js";
import { newJobView } from "./newjob.js";
import { modelsView } from "./models.js";
import { capacityView } from "./capacity.js";

const view = document.getElementById("view");
const gate = document.getElementById("keygate");
let stop = () => {};

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "") || "jobs";
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").map(decodeURIComponent), query: new URLSearchParams(query) };
}

function render() {
  stop();
  stop = () => {};
  const { parts, query } = parseHash();
  const name = parts[0];
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (name === "job" ? "jobs" : name));
  }
  const views = {
    jobs: () => jobsView(view, query),
    job: () => jobView(view, parts.slice(1).join("/")),
    new: () => newJobView(view),
    models: () => modelsView(view),
    capacity: () => capacityView(view),
  };
  view.replaceChildren();
  const make = views[name];
  if (!make) {
    view.append(h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Jobs")));
    return;
  }
  stop = make() || (() => {});
}

function askKey(hadKey) {
  if (!gate.hidden) return;
  stop();
  document.getElementById("key-message").textContent = hadKey
    ? "The server refused this key. Enter a valid API key (kept in this tab only)."
    : "This server needs an API key. It is kept in this tab only (sessionStorage).";
  gate.hidden = false;
  document.getElementById("key-input").focus();
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("key-input");
  setApiKey(input.value.trim());
  input.value = "";
  gate.hidden = true;
  render();
});

whenUnauthorised(askKey);
window.addEventListener("hashchange", render);

async function boot() {
  try {
    const health = await api("/health");
    document.getElementById("conn").textContent = `server ${health.version}${apiKey() ? " (key set)" : ""}`;
  } catch {
    document.getElementById("conn").textContent = "server unreachable";
  }
  render();
}
boot();
