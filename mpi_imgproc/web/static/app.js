// The page: upload, a pipeline builder from /api/ops, live progress over Server-Sent Events,
// before/after per image, the cluster view and the compare view.  Plain DOM, no framework.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { ops: {}, steps: [], files: [], job: null, source: null, limits: null,
  clusterTimer: null };
// Measured in the page, read by the browser test: milliseconds since the submit click.
window.mpiTimings = {};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail || response.statusText);
    throw new Error(`${response.status}: ${text}`);
  }
  return body;
}

// -- tabs -------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tab[data-view]")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  clearInterval(state.clusterTimer);
  if (name === "cluster") {
    refreshCluster();
    state.clusterTimer = setInterval(refreshCluster, 1000);
  }
}

// -- files ------------------------------------------------------------------------------------

function setFiles(list) {
  state.files = Array.from(list);
  const ul = $("#file-list");
  ul.replaceChildren(...state.files.map((f) => el("li", { text: `${f.name} (${kb(f.size)})` })));
  const limits = state.limits;
  if (limits && state.files.length > limits.max_files) {
    $("#form-error").textContent = `${state.files.length} files: at most ${limits.max_files} per upload`;
  } else {
    $("#form-error").textContent = "";
  }
}

function kb(n) { return n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${Math.ceil(n / 1024)} kB`; }

function setupDrop() {
  const drop = $("#drop");
  $("#files").addEventListener("change", (e) => setFiles(e.target.files));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
}

// -- pipeline builder -------------------------------------------------------------------------

async function loadOps() {
  const ops = await getJSON("/api/ops");
  const select = $("#op-select");
  for (const op of ops) {
    state.ops[op.name] = op;
    select.append(el("option", { value: op.name, text: `${op.name} (${op.class})` }));
  }
  select.addEventListener("change", () => { $("#op-doc").textContent = state.ops[select.value].doc; });
  $("#op-doc").textContent = ops[0] ? ops[0].doc : "";
}

function addStep(name) {
  const op = state.ops[name];
  const params = {};
  for (const p of op.params) params[p.name] = p.default;
  state.steps.push({ op: name, params });
  renderSteps();
}

function paramInput(step, p, index) {
  const id = `p-${index}-${p.name}`;
  const value = step.params[p.name];
  let input;
  if (p.choices) {
    input = el("select", { id }, ...p.choices.map((c) => el("option", { value: c, text: c })));
    input.value = value;
  } else if (p.type === "bool") {
    input = el("input", { id, type: "checkbox" });
    input.checked = Boolean(value);
  } else if (p.type === "int" || p.type === "float") {
    input = el("input", { id, type: "number", required: true, min: p.minimum, max: p.maximum,
      step: p.type === "int" ? (p.odd ? 2 : 1) : "any", value: value ?? "" });
  } else {
    input = el("input", { id, type: "text", value: value ?? "" });
  }
  input.dataset.param = p.name;
  input.addEventListener("input", () => { readParam(step, p, input); validate(); });
  input.addEventListener("change", () => { readParam(step, p, input); validate(); });
  const range = p.minimum !== undefined || p.maximum !== undefined
    ? ` [${p.minimum ?? ""}..${p.maximum ?? ""}]${p.odd ? " odd" : ""}` : "";
  return el("label", { for: id, title: p.doc }, `${p.name}${range} `, input);
}

function readParam(step, p, input) {
  if (p.type === "bool") step.params[p.name] = input.checked;
  else if (p.type === "int") step.params[p.name] = input.value === "" ? null : Number(input.value);
  else if (p.type === "float") step.params[p.name] = input.value === "" ? null : Number(input.value);
  else step.params[p.name] = input.value;
}

function renderSteps() {
  const ol = $("#steps");
  ol.replaceChildren(...state.steps.map((step, i) => {
    const op = state.ops[step.op];
    const remove = el("button", { type: "button", class: "remove", text: "Remove",
      onclick: () => { state.steps.splice(i, 1); renderSteps(); } });
    const up = el("button", { type: "button", text: "↑", title: "move up", disabled: i === 0,
      onclick: () => { [state.steps[i - 1], state.steps[i]] = [state.steps[i], state.steps[i - 1]]; renderSteps(); } });
    return el("li", { "data-op": step.op },
      el("div", { class: "row" }, el("strong", { text: step.op }), up, remove),
      el("div", { class: "params" }, ...op.params.map((p) => paramInput(step, p, i))));
  }));
  validate();
}

// Checks every parameter against its range before submit; returns the first problem or "".
function validate() {
  const problems = [];
  document.querySelectorAll("#steps li").forEach((li, i) => {
    const step = state.steps[i];
    for (const input of li.querySelectorAll("[data-param]")) {
      const p = state.ops[step.op].params.find((q) => q.name === input.dataset.param);
      let why = "";
      const v = step.params[p.name];
      if (p.type === "int" || p.type === "float") {
        if (v === null || Number.isNaN(v)) why = "a number is needed";
        else if (p.type === "int" && !Number.isInteger(v)) why = "a whole number is needed";
        else if (p.minimum !== undefined && v < p.minimum) why = `at least ${p.minimum}`;
        else if (p.maximum !== undefined && v > p.maximum) why = `at most ${p.maximum}`;
        else if (p.odd && v % 2 === 0) why = "must be odd";
      }
      input.setCustomValidity(why);
      if (why) problems.push(`${step.op}: ${p.name} ${why}`);
    }
  });
  const text = problems.join("\n");
  $("#form-error").textContent = text;
  return text;
}

function pipelineJSON() {
  return JSON.stringify(state.steps.map((s) => ({ op: s.op, params: s.params })));
}

function uploadForm() {
  if (!state.files.length) throw new Error("choose one or more images first");
  if (!state.steps.length) throw new Error("add at least one op to the pipeline");
  const problem = validate();
  if (problem) throw new Error(problem);
  const form = new FormData();
  for (const file of state.files) form.append("files", file, file.name);
  form.append("pipeline", pipelineJSON());
  form.append("tile", $("#tile").value.trim() || "auto");
  return form;
}

// -- a job ------------------------------------------------------------------------------------

async function submitJob() {
  let form;
  try { form = uploadForm(); } catch (err) { $("#form-error").textContent = err.message; return; }
  const t0 = performance.now();
  window.mpiTimings = { submit: 0 };
  $("#submit").disabled = true;
  $("#form-error").textContent = "";
  try {
    const { job } = await getJSON("/api/jobs", { method: "POST", body: form });
    window.mpiTimings.accepted = performance.now() - t0;
    startJob(job, t0);
  } catch (err) {
    $("#form-error").textContent = err.message;
  } finally {
    $("#submit").disabled = false;
  }
}

function displayable(file) { return /^image\/(png|jpeg|bmp|gif|webp)$/.test(file.type); }

function startJob(job, t0) {
  if (state.source) state.source.close();
  state.job = job;
  $("#job-panel").hidden = false;
  $("#job-id").textContent = `job ${job}`;
  $("#progress").value = 0;
  $("#job-state").textContent = "running";
  $("#archive").hidden = true;
  $("#cancel").disabled = false;
  $("#job-plots").replaceChildren();
  const results = $("#results");
  results.replaceChildren(...state.files.map((file, i) => resultCard(job, file, i)));
  const source = new EventSource(`/api/jobs/${job}/events`);
  state.source = source;
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    const total = p.tiles_total || p.images_total || 1;
    $("#progress").value = (p.tiles_done || p.images_done || 0) / total;
  });
  source.addEventListener("result", (e) => {
    const r = JSON.parse(e.data);
    if (window.mpiTimings.resultEvent === undefined) {
      window.mpiTimings.resultEvent = performance.now() - t0;
    }
    const card = results.children[r.index];
    const after = card.querySelector("img.after");
    after.addEventListener("load", () => {
      if (window.mpiTimings.firstResult === undefined) {
        window.mpiTimings.firstResult = performance.now() - t0;
      }
      card.dataset.state = "done";
      showBefore(card);
    }, { once: true });
    after.src = r.url;
    card.querySelector(".links").replaceChildren(...["png", "jpg", "tif"].map((f) =>
      el("a", { class: `button download-${f}`, href: `${r.url}?format=${f}`, download: "",
        text: f.toUpperCase() })));
    card.querySelector(".status").textContent = `${r.path}${r.tiles ? `, ${r.tiles} tiles` : ""}`;
  });
  source.addEventListener("image_error", (e) => {
    const r = JSON.parse(e.data);
    const card = results.children[r.index];
    card.classList.add("failed");
    card.dataset.state = "failed";
    showBefore(card);
    card.querySelector(".status").textContent = `${r.code}: ${r.message}`;
    card.querySelector(".status").className = "status error";
  });
  source.addEventListener("done", (e) => {
    source.close();
    const d = JSON.parse(e.data);
    window.mpiTimings.done = performance.now() - t0;
    $("#progress").value = 1;
    $("#cancel").disabled = true;
    const total = d.stats && d.stats.total !== undefined ? ` in ${fmt(d.stats.total)} s` : "";
    $("#job-state").textContent = `${d.state}: ${d.ok} ok, ${d.failed} failed${total}` +
      (d.message ? ` (${d.message})` : "");
    $("#job-state").dataset.state = d.state;
    if (d.ok) {
      $("#archive").href = `/api/jobs/${job}/archive`;
      $("#archive").hidden = false;
    }
    drawJobPlots(d.stats || {});
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) $("#job-state").textContent = "event stream closed";
  };
}

function resultCard(job, file, i) {
  // The after image sets the box's size and shows as soon as it has loaded; the before image
  // lies over its left part.  The before image is decoded only once the result is there (or
  // the image failed): decoding a large input in the page would take the cores the cluster
  // is computing on.
  const after = el("img", { class: "after", alt: `${file.name} after`, "data-index": i });
  const before = el("img", { class: "before", alt: `${file.name} before` });
  before.dataset.src = displayable(file) ? URL.createObjectURL(file) : `/api/jobs/${job}/inputs/${i}`;
  const wrap = el("div", { class: "before-wrap" }, before);
  const slider = el("input", { type: "range", min: 0, max: 100, value: 50,
    "aria-label": "before / after" });
  slider.addEventListener("input", () => {
    wrap.style.clipPath = `inset(0 ${100 - slider.value}% 0 0)`;
  });
  return el("div", { class: "card", "data-index": i },
    el("h3", { text: file.name }),
    el("div", { class: "compare-box" }, after, wrap),
    slider,
    el("p", { class: "note", text: "left: before · right: after" }),
    el("p", { class: "status note", text: "waiting" }),
    el("div", { class: "links" }));
}

function showBefore(card) {
  const before = card.querySelector("img.before");
  if (!before.getAttribute("src")) before.src = before.dataset.src;
}

// Per-rank utilisation and the job's stage times, from its `done` stats.
function drawJobPlots(stats) {
  const plots = $("#job-plots");
  const ranks = Object.entries(stats.ranks || {});
  if (ranks.length && stats.total) {
    plots.append(barChart("Busy share per rank (this job)", ranks.map(([r, f]) => ({
      label: `rank ${r}`, value: 100 * (f.busy_s || 0) / stats.total })), "%", { line: 100 }));
  }
  const stages = ["queue", "decode", "split", "send", "compute", "receive", "merge", "encode"]
    .filter((s) => stats[s] > 0).map((s) => ({ label: s, value: stats[s] }));
  if (stages.length) plots.append(barChart("Seconds per stage (summed over ranks)", stages, "s"));
}

async function cancelJob() {
  if (!state.job) return;
  try { await getJSON(`/api/jobs/${state.job}`, { method: "DELETE" }); }
  catch (err) { $("#form-error").textContent = err.message; }
}

// -- cluster ----------------------------------------------------------------------------------

async function refreshCluster() {
  let view;
  try { view = await getJSON("/api/cluster"); }
  catch (err) { $("#cluster-summary").textContent = err.message; return; }
  const info = view.info;
  const hosts = Object.entries(info.hosts || {}).map(([h, n]) => `${h} (${n})`).join(", ");
  const q = info.queue || {};
  const queue = info.queue ? ` · now: ${q.jobs} jobs, ${q.tasks_in_flight} tasks in flight, ` +
    `${q.tasks_queued} queued, ${q.workers_alive} workers alive` : "";
  $("#cluster-summary").textContent =
    `${info.ranks} ranks, ${info.workers} workers on ${hosts}; engine ${info.engine} ×${info.workers_per_rank}${queue}`;
  $("#window-s").textContent = view.window_s;
  $("#rank-table tbody").replaceChildren(...view.rank_rows.map((r) => el("tr", {},
    el("td", { text: r.rank }), el("td", { text: r.host }),
    el("td", { text: `${r.engine} ×${r.engine_workers}` }),
    el("td", {}, el("div", { class: "bar", title: `${(100 * r.busy_share).toFixed(1)} %` },
      el("span", { style: `width:${100 * r.busy_share}%` }))),
    el("td", { text: r.tiles }))));
  const lanes = view.rank_rows.map((r) => ({ label: `rank ${r.rank}`, bars: [] }));
  const byRank = Object.fromEntries(lanes.map((l, i) => [String(view.rank_rows[i].rank), l]));
  for (const job of view.stream) {
    if (job.tasks && job.tasks.length) {  // one bar per task, coloured by job
      for (const t of job.tasks) {
        const lane = byRank[String(t.rank)];
        if (lane) lane.bars.push({ start: t.start, end: t.end, key: job.job, busy: 1,
          text: `job ${job.job}: a task on rank ${t.rank}, ${fmt(t.end - t.start)} s` });
      }
      continue;
    }
    const span = Math.max(job.end - job.start, 1e-6);
    for (const [rank, f] of Object.entries(job.ranks)) {
      if (!byRank[rank]) continue;
      byRank[rank].bars.push({ start: job.start, end: job.end, key: job.job,
        busy: (f.busy_s || 0) / span,
        text: `job ${job.job}: ${f.tiles} tiles, busy ${fmt(f.busy_s)} s of ${fmt(span)} s` });
    }
  }
  // The window shows the recent jobs at a readable scale: 10 s at least, 120 s at most.
  const earliest = Math.min(view.now - 10, ...view.stream.map((j) => j.start));
  const t0 = Math.max(view.now - 120, earliest - 0.05 * (view.now - earliest));
  $("#task-stream").replaceChildren(timeline("", lanes, t0, view.now, view.now));
}

// -- compare ----------------------------------------------------------------------------------

async function runCompare() {
  $("#compare-error").textContent = "";
  let form;
  try { form = uploadForm(); } catch (err) { $("#compare-error").textContent = err.message; return; }
  form.append("repeat", $("#repeat").value || "3");
  $("#run-compare").disabled = true;
  $("#compare-state").textContent = "running every method…";
  try {
    const { compare } = await getJSON("/api/compare", { method: "POST", body: form });
    let report;
    for (;;) {
      report = await getJSON(`/api/compare/${compare}`);
      if (report.state !== "running") break;
      $("#compare-state").textContent = report.progress || "running…";
      await new Promise((r) => setTimeout(r, 700));
    }
    if (report.state !== "done") throw new Error(report.message || report.state);
    showCompare(compare, report.result);
    $("#compare-state").textContent = report.result.headline;
  } catch (err) {
    $("#compare-error").textContent = err.message;
    $("#compare-state").textContent = "";
  } finally {
    $("#run-compare").disabled = false;
  }
}

function showCompare(id, result) {
  $("#compare-panel").hidden = false;
  const rows = result.summary;
  const head = el("tr", {}, ...["method", "cores", "median s", "min–max s", "speedup",
    "efficiency", "equal"].map((h) => el("th", { text: h })));
  $("#compare-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows.map((r) =>
    el("tr", {}, el("td", { text: r.method }), el("td", { text: r.cores }),
      el("td", { text: fmt(r.median_s) }), el("td", { text: `${fmt(r.min_s)}–${fmt(r.max_s)}` }),
      el("td", { text: `${fmt(r.speedup)}×` }), el("td", { text: `${fmt(100 * r.efficiency)} %` }),
      el("td", { class: r.exact ? "ok" : "bad", text: r.exact ? "yes" : "NO" })))));
  const plots = $("#compare-plots");
  plots.replaceChildren(
    barChart("Time (median, min–max)", rows.map((r) => ({ label: r.method, value: r.median_s,
      lo: r.min_s, hi: r.max_s }))),
    barChart("Speedup over sequential", rows.map((r) => ({ label: r.method, value: r.speedup,
      lo: r.speedup_min, hi: r.speedup_max })), "×", { line: 1 }),
    barChart("Efficiency (speedup / cores)", rows.map((r) => ({ label: r.method,
      value: 100 * r.efficiency })), "%", { line: 100 }));
  $("#compare-findings").replaceChildren(...result.findings.map((f) => el("li", { text: f })));
  for (const [link, ext] of [["#report-md", "md"], ["#report-html", "html"], ["#report-csv", "csv"]]) {
    $(link).href = `/api/compare/${id}/report.${ext}`;
    $(link).setAttribute("download", "");
  }
}

// -- start ------------------------------------------------------------------------------------

async function main() {
  for (const tab of document.querySelectorAll(".tab[data-view]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  setupDrop();
  $("#add-op").addEventListener("click", () => addStep($("#op-select").value));
  $("#submit").addEventListener("click", submitJob);
  $("#cancel").addEventListener("click", cancelJob);
  $("#run-compare").addEventListener("click", runCompare);
  try {
    await loadOps();
    state.limits = await getJSON("/api/limits");
    const l = state.limits;
    $("#limits").textContent = `At most ${l.max_files} files, ${kb(l.max_file_bytes)} each, ` +
      `${kb(l.max_request_bytes)} in all, ${(l.max_pixels / 1e6).toFixed(0)} Mpixel per image.`;
    document.body.dataset.ready = "1";
  } catch (err) {
    $("#form-error").textContent = `cannot reach the app's API: ${err.message}`;
  }
}

main();
