// peftkit's page: the New-run form (generated from the server's option declarations), runs with live charts,
// chat beside the base model, and the ship commands. Every request that changes something sends the page's token.
"use strict";

const TOKEN = document.querySelector('meta[name="peftkit-token"]').content;
const GROUPS = [
  ["Model and method", ["model", "method", "rank", "alpha", "dropout", "target_modules", "variant",
                        "reduction_factor", "num_virtual_tokens"]],
  ["Objective", ["objective"]],
  ["Data", ["data", "format", "eval_data", "eval_split", "max_length", "packing", "train_on_prompt", "columns",
            "chat_template"]],
  ["Training", ["lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup", "scheduler", "precision",
                "gradient_checkpointing", "seed", "save_steps", "eval_steps"]],
];
const PAGE_OWNED = new Set(["output", "overwrite", "resume", "dry_run"]);  // set by the page, not the form
let FIELDS = [];
let current = null;  // the run shown in the Runs tab
let source = null;   // its EventSource

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined) node.textContent = text;
  return node;
};

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", body: typeof body === "string" || body instanceof Blob ? body : JSON.stringify(body),
                                         headers: {"Content-Type": "application/json", "X-Peftkit-Token": TOKEN}};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), {field: data.field});
  return data;
}

// ---- tabs
function show(tab) {
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== tab; });
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  history.replaceState(null, "", `#${tab}`);
  if (tab === "runs") refreshRuns();
  if (tab === "try" || tab === "ship") fillRunChoices();
}
document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => show(b.dataset.tab)));

// ---- New run: the form
function input(field, choices) {
  let node;
  if (field.kind === "bool" && field.default !== null) {
    node = el("input", {type: "checkbox", id: `f-${field.name}`, name: field.name});
    node.checked = Boolean(field.default);
  } else if (choices && choices.length) {
    node = el("select", {id: `f-${field.name}`, name: field.name});
    if (field.default === null) node.append(el("option", {value: ""}, "(default)"));
    choices.forEach((c) => node.append(el("option", {value: c}, c)));
    if (field.default !== null) node.value = field.default;
  } else if (field.kind === "bool") {
    node = el("select", {id: `f-${field.name}`, name: field.name});
    [["", "(default)"], ["true", "yes"], ["false", "no"]].forEach(([v, t]) => node.append(el("option", {value: v}, t)));
  } else {
    node = el("input", {id: `f-${field.name}`, name: field.name,
                        placeholder: field.default === null || typeof field.default === "object" ? "(default)" : String(field.default)});
  }
  return node;
}

function fieldBlock(field, choices) {
  const block = el("div", {class: "field", "data-field": field.name});
  const label = el("label", {for: `f-${field.name}`}, `${field.name.replaceAll("_", " ")} `);
  label.append(el("span", {class: "help"}, field.flag));
  block.append(label, input(field, choices), el("div", {class: "help"}, field.help),
               el("div", {class: "error", "data-error": field.name}));
  if (field.name === "columns") block.append(el("div", {id: "mapping"}));
  return block;
}

async function buildForm() {
  const info = await api("/api/fields");
  FIELDS = info.fields.filter((f) => !PAGE_OWNED.has(f.name));
  const byName = Object.fromEntries(FIELDS.map((f) => [f.name, f]));
  const choices = {method: info.methods, objective: info.objectives};
  const placed = new Set();
  const groups = $("#groups");
  for (const [title, names] of GROUPS) {
    const set = el("fieldset");
    set.append(el("legend", {}, title));
    const members = title === "Objective" ? names.concat(FIELDS.filter((f) => f.objective_option).map((f) => f.name)) : names;
    members.filter((n) => byName[n]).forEach((n) => { set.append(fieldBlock(byName[n], choices[n] || byName[n].choices)); placed.add(n); });
    groups.append(set);
  }
  const more = el("details");
  more.append(el("summary", {}, "More options"));
  FIELDS.filter((f) => !placed.has(f.name)).forEach((f) => more.append(fieldBlock(f, f.choices)));
  groups.append(more);
  if (!$("#run-name").value) $("#run-name").value = `run-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")}`;
}

function formValues() {
  const values = {};
  for (const field of FIELDS) {
    const node = document.getElementById(`f-${field.name}`);
    if (!node) continue;
    if (node.type === "checkbox") {
      if (node.checked !== Boolean(field.default)) values[field.name] = node.checked;
    } else if (node.value.trim() !== "" && node.value.trim() !== String(field.default)) {
      values[field.name] = node.value.trim();
    }
  }
  if ($("#f-set").value.trim()) values.set = $("#f-set").value;
  return values;
}

function clearErrors(scope = document) {
  scope.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  scope.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
}

function showError(error, fallback) {
  const key = error.field && document.querySelector(`[data-error="${error.field}"]`) ? error.field : fallback;
  const box = document.querySelector(`[data-error="${key}"]`);
  box.textContent = `error: ${error.message}`;
  const block = document.querySelector(`[data-field="${key}"]`);
  if (block) { block.classList.add("invalid"); block.scrollIntoView({block: "center"}); }
}

function renderEstimate(est) {
  const box = $("#estimate");
  box.replaceChildren();
  if (est.error) { box.append(el("p", {class: "error"}, `not available: ${est.error}`)); return; }
  const table = el("table");
  const gb = (b) => (b >= 1e8 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`);
  Object.entries(est.breakdown).forEach(([k, v]) => {
    const row = el("tr"); row.append(el("td", {}, k.replaceAll("_", " ")), el("td", {}, gb(v))); table.append(row);
  });
  const total = el("tr"); total.append(el("th", {}, "total per GPU"), el("th", {}, gb(est.total_bytes))); table.append(total);
  box.append(el("p", {}, `${est.trainable_params.toLocaleString()} trainable of ${est.total_params.toLocaleString()} parameters; precision ${est.precision}`), table);
  est.gpus.forEach((g) => {
    const fits = g.fits ? "fits on one" : g.gpus_needed ? `needs ${g.gpus_needed} (sharded)` : "does not fit";
    box.append(el("p", {class: g.fits ? "fits" : "nofit"}, `${g.gpu_gb} GB GPUs: ${fits}`));
  });
}

function renderPreview(preview) {
  const box = $("#preview");
  box.replaceChildren(el("p", {}, `${preview.train_rows} training examples (${preview.format}), ${preview.eval_rows} held out`));
  preview.examples.forEach((parts) => {
    const example = el("div", {class: "example"});
    parts.forEach((part) => {
      if (parts.length > 1) example.append(el("div", {class: "part"}, part.name));
      part.runs.forEach(([text, trained]) => example.append(el("span", {class: trained ? "trained" : "masked"}, text)));
    });
    box.append(example);
  });
}

// The column mapping: when the data's columns are not ones peftkit reads, map them (the CLI's --columns).
async function showMapping() {
  const box = $("#mapping");
  box.replaceChildren();
  const data = $("#f-data").value.trim();
  if (!data) return;
  let info;
  try { info = await api("/api/columns", {data}); } catch (error) { return; }
  const current = Object.fromEntries(($("#f-columns").value || "").split(",").filter((p) => p.includes("="))
                                     .map((p) => p.split("=").map((x) => x.trim())).map(([ours, theirs]) => [theirs, ours]));
  box.append(el("p", {}, "Map the data's columns to the ones peftkit reads (this fills --columns):"));
  const table = el("table");
  info.sources[0].columns.forEach((column) => {
    const row = el("tr"), select = el("select", {"data-column": column});
    select.append(el("option", {value: ""}, "(not used)"));
    info.known.forEach((name) => select.append(el("option", {value: name}, name)));
    select.value = current[column] || (info.known.includes(column) ? "" : "");
    select.addEventListener("change", () => {
      const pairs = [...box.querySelectorAll("select")].filter((s) => s.value).map((s) => `${s.value}=${s.dataset.column}`);
      $("#f-columns").value = pairs.join(",");
    });
    row.append(el("td", {}, column), el("td", {}, "→"), el("td")); row.lastChild.append(select);
    table.append(row);
  });
  box.append(table);
}

async function check() {
  clearErrors($("#form"));
  $("#check").disabled = true;
  try {
    const plan = await api("/api/plan", {form: formValues()});
    $("#mapping").replaceChildren();
    $("#command").textContent = plan.command;
    $("#recipe").textContent = plan.recipe;
    renderEstimate(plan.estimate);
    renderPreview(plan.preview);
    return plan;
  } catch (error) {
    showError(error, "__form");
    if (error.field === "data" || error.field === "columns" || /column/.test(error.message)) showMapping();
    return null;
  } finally {
    $("#check").disabled = false;
  }
}

async function launch() {
  clearErrors($("#form"));
  $("#launch").disabled = true;
  try {
    const status = await api("/api/runs", {name: $("#run-name").value.trim(), form: formValues()});
    show("runs");
    openRun(status.name);
  } catch (error) {
    showError(error, error.message.includes("run name") || error.message.includes("named") ? "__name" : "__form");
  } finally {
    $("#launch").disabled = false;
  }
}

async function upload(event) {
  const file = event.target.files[0];
  if (!file) return;
  clearErrors($("#form"));
  try {
    const result = await fetch(`/api/upload?name=${encodeURIComponent(file.name)}`,
                               {method: "POST", body: file, headers: {"X-Peftkit-Token": TOKEN}});
    const data = await result.json();
    if (!result.ok) throw Object.assign(new Error(data.error), {field: "upload"});
    $("#f-data").value = data.path;
  } catch (error) {
    showError(error, "upload");
  }
}

// ---- Runs
function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return seconds < 90 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
}

async function refreshRuns() {
  const list = await api("/api/runs");
  const body = $("#run-table tbody");
  body.replaceChildren();
  list.forEach((run) => {
    const row = el("tr", {"data-run": run.name});
    const progress = run.total_steps ? `${run.step} / ${run.total_steps}` : `${run.step}`;
    row.append(el("td", {}, run.name), el("td", {class: `status-${run.status}`}, run.status + (run.error ? ` — ${run.error}` : "")),
               el("td", {}, progress), el("td", {}, eta(run.eta_s)), el("td", {}, run.loss === null || run.loss === undefined ? "" : run.loss.toFixed(4)));
    const open = el("button", {}, "Open");
    open.addEventListener("click", () => openRun(run.name));
    const cell = el("td"); cell.append(open); row.append(cell);
    body.append(row);
  });
  return list;
}

function chart(node, title, series, data) {
  node.replaceChildren();
  const width = Math.max(360, node.parentElement.clientWidth - 20);
  const axes = [{}, {size: 60, values: (u, ticks) => ticks.map((v) => Number(v.toPrecision(3)))}];
  return new uPlot({title, width, height: 220, series: [{label: "step"}, ...series], scales: {x: {time: false}}, axes},
                   data, node);
}

function drawCharts(records) {
  const train = records.filter((r) => r.kind === "train");
  const evals = records.filter((r) => r.kind === "eval" && r.loss !== undefined && r.loss !== null);
  const steps = [...new Set([...train.map((r) => r.step), ...evals.map((r) => r.step)])].sort((a, b) => a - b);
  const at = (rows, key) => steps.map((s) => { const r = rows.find((x) => x.step === s); return r ? r[key] : null; });
  chart($("#chart-loss"), "loss", [{label: "train loss", stroke: "#2457c5"}, {label: "eval loss", stroke: "#d92d20", spanGaps: true, points: {show: true}}],
        [steps, at(train, "loss"), at(evals, "loss")]);
  const lrSteps = train.map((r) => r.step);
  chart($("#chart-lr"), "learning rate", [{label: "lr", stroke: "#067647"}], [lrSteps, train.map((r) => r.lr)]);
  $("#chart-loss").dataset.points = String(train.length);
}

function openRun(name) {
  current = name;
  if (source) source.close();
  const records = [];
  $("#run-detail").hidden = false;
  $("#detail-name").textContent = name;
  source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  source.addEventListener("metrics", (e) => { records.push(...JSON.parse(e.data)); drawCharts(records); });
  source.addEventListener("status", (e) => {
    const s = JSON.parse(e.data);
    $("#detail-status").textContent = `${s.status}${s.error ? `: ${s.error}` : ""} — step ${s.step}${s.total_steps ? ` of ${s.total_steps}` : ""}${s.eta_s ? `, about ${eta(s.eta_s)} left` : ""}`;
    $("#detail-status").className = `status-${s.status}`;
    $("#detail-command").textContent = s.command ? s.command.map((a) => /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`).join(" ") : "(not started from this page)";
    $("#detail-config").textContent = Object.keys(s.config || {}).length ? Object.entries(s.config).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("\n") : "(written when the run starts)";
    $("#stop").disabled = s.status !== "running";
    $("#resume").disabled = s.status !== "stopped" && s.status !== "failed";
    refreshRuns();
  });
  source.onerror = () => { source.close(); setTimeout(() => { if (current === name) openRun(name); }, 2000); };
}

async function runAction(action) {
  try { await api(`/api/runs/${encodeURIComponent(current)}/${action}`, {}); openRun(current); } catch (error) {
    $("#detail-status").textContent = `error: ${error.message}`;
  }
}

// ---- Try it / Ship it
async function fillRunChoices() {
  const finished = (await api("/api/runs")).filter((r) => r.status === "finished");
  for (const id of ["#try-run", "#ship-run"]) {
    const select = $(id), keep = select.value;
    select.replaceChildren(...finished.map((r) => el("option", {value: r.name}, r.name)));
    if (keep) select.value = keep;
  }
  if ($("#try-run").value) loadEvaluation($("#try-run").value);
}

async function streamInto(path, body, onEvent) {
  const response = await fetch(path, {method: "POST", body: JSON.stringify(body),
                                      headers: {"Content-Type": "application/json", "X-Peftkit-Token": TOKEN}});
  if (!response.ok) { const data = await response.json(); throw new Error(data.error); }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const kind = /^event: (.*)$/m.exec(block)[1], data = JSON.parse(/^data: (.*)$/m.exec(block)[1]);
      onEvent(kind, data);
    }
  }
}

async function ask() {
  clearErrors($("#try"));
  const run = $("#try-run").value, prompt = $("#prompt").value;
  $("#ask").disabled = true;
  try {
    for (const side of ["adapter", "base"]) {
      const box = $(`#answer-${side}`);
      box.textContent = "";
      await streamInto("/api/chat", {run, prompt, side}, (kind, data) => {
        if (kind === "piece") box.textContent += data;
        if (kind === "error") throw new Error(data);
        if (kind === "done") box.dataset.done = "1";
      });
    }
  } catch (error) {
    showError(error, "try");
  } finally {
    $("#ask").disabled = false;
  }
}

async function loadEvaluation(run) {
  const box = $("#evaluation");
  try {
    const summary = await api(`/api/runs/${encodeURIComponent(run)}/evaluation`);
    const before = summary.before || {}, after = summary.after || {};
    const metrics = Object.keys(after).filter((k) => typeof after[k] === "number");
    if (!metrics.length) { box.textContent = "This run held out no data (--eval-split 0), so it has no evaluation."; return; }
    const table = el("table"), head = el("tr");
    head.append(el("th", {}, "metric"), el("th", {}, "base"), el("th", {}, "adapter"));
    table.append(head);
    metrics.forEach((k) => {
      const row = el("tr"), fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "");
      row.append(el("td", {}, k), el("td", {}, fmt(before[k])), el("td", {}, fmt(after[k]))); table.append(row);
    });
    const differ = el("table", {id: "differ"}), h = el("tr");
    h.append(el("th", {}, "prompt"), el("th", {}, "base"), el("th", {}, "adapter"), el("th", {}, "reference"));
    differ.append(h);
    (after.samples || []).forEach((s, i) => {
      const b = (before.samples || [])[i];
      if (b && b.answer === s.answer) return;
      const row = el("tr");
      row.append(el("td", {}, s.prompt), el("td", {}, b ? b.answer : ""), el("td", {}, s.answer), el("td", {}, s.reference || ""));
      differ.append(row);
    });
    box.replaceChildren(table, el("h2", {}, "Examples where the base and the adapter differ"), differ);
  } catch (error) {
    box.textContent = error.message;
  }
}

async function ship(action) {
  clearErrors($("#ship"));
  $("#ship-log").textContent = "";
  try {
    const job = await api("/api/ship", {run: $("#ship-run").value, action});
    $("#ship-command").textContent = job.command;
    const events = new EventSource(`/api/jobs/${job.job}/events`);
    events.addEventListener("line", (e) => { $("#ship-log").textContent += `${JSON.parse(e.data)}\n`; });
    events.addEventListener("end", (e) => {
      const code = JSON.parse(e.data).code;
      $("#ship-log").textContent += code === 0 ? "\n[done]\n" : `\n[failed: exit code ${code}]\n`;
      $("#ship-log").dataset.code = String(code);
      events.close();
    });
  } catch (error) {
    showError(error, "ship");
  }
}

// ---- wiring
$("#check").addEventListener("click", check);
$("#launch").addEventListener("click", launch);
$("#upload").addEventListener("change", upload);
$("#copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("#command").textContent));
$("#stop").addEventListener("click", () => runAction("stop"));
$("#resume").addEventListener("click", () => runAction("resume"));
$("#ask").addEventListener("click", ask);
$("#try-run").addEventListener("change", (e) => loadEvaluation(e.target.value));
document.querySelectorAll("#ship [data-action]").forEach((b) => b.addEventListener("click", () => ship(b.dataset.action)));
setInterval(() => { if (!$("#runs").hidden) refreshRuns(); }, 3000);

buildForm().then(() => show((location.hash || "#new").slice(1)));
