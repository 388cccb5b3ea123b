// The scoring page: photos picked or dropped here are sent to /api/score in requests of at most
// the server's max_files; results are shown best first, failures with their message.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, items: [], nextId: 0, running: false };
const BUSY_RETRIES = 60; // 503 answers waited out, one second apart

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function humanBytes(n) { // as the server's webapp/uploads.py human_bytes
  for (const [unit, size] of [["GB", 2 ** 30], ["MB", 2 ** 20], ["KB", 2 ** 10]]) {
    if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  }
  return `${n} bytes`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; } catch { return response.statusText; }
}

// POST a form, waiting out "busy" answers; returns the response or throws with a message.
async function post(url, form) {
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch(url, { method: "POST", body: form });
    } catch (err) {
      throw new Error(`the server could not be reached (${err.message}); is serve.py still running?`);
    }
    if (response.status !== 503 || attempt >= BUSY_RETRIES) return response;
    setStatus("The server is busy with other requests; waiting…");
    await sleep(1000);
  }
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    if (!response.ok) throw new Error(await detail(response));
    state.info = await response.json();
  } catch (err) {
    $("model").textContent = `The model information could not be loaded: ${err.message}`;
    return;
  }
  const i = state.info;
  $("model").textContent = `Variant ${i.variant}${i.checkpoint ? ` · ${i.checkpoint}` : ""} · ${i.device}` +
    ` · scores on 1..10${i.variant === "ava" ? " with the predicted vote distribution" : ""}`;
  $("limits").textContent = `JPEG, PNG, TIFF, WebP, BMP, GIF and more, up to ${humanBytes(i.limits.max_file_bytes)}` +
    " each. Photos are scored on this computer and not kept.";
  pump();
}

function addFiles(files) {
  for (const file of files) {
    const item = { id: state.nextId++, file, url: URL.createObjectURL(file), status: "queued", row: null };
    const limit = state.info && state.info.limits.max_file_bytes;
    if (limit && file.size > limit) {
      item.status = "failed";
      item.row = { image: file.name, score: null, error: `image file ${file.name} is ${humanBytes(file.size)}, ` +
        `over the server's limit of ${humanBytes(limit)} per file (serve.py --max_file_bytes)` };
    }
    state.items.push(item);
  }
  render();
  pump();
}

function failBatch(batch, message) {
  for (const item of batch) {
    item.status = "failed";
    item.row = { image: item.file.name, score: null, error: message };
  }
}

async function pump() {
  if (state.running || !state.info) return;
  state.running = true;
  try {
    for (;;) {
      const batch = state.items.filter((it) => it.status === "queued").slice(0, state.info.limits.max_files);
      if (!batch.length) break;
      batch.forEach((it) => { it.status = "scoring"; });
      render();
      const form = new FormData();
      batch.forEach((it) => form.append("files", it.file, it.file.name));
      try {
        const response = await post("/api/score", form);
        if (!response.ok) {
          failBatch(batch, await detail(response));
        } else {
          const rows = (await response.json()).results;
          batch.forEach((it, k) => { it.row = rows[k]; it.status = rows[k].error ? "failed" : "done"; });
        }
      } catch (err) {
        failBatch(batch, err.message);
      }
      render();
    }
  } finally {
    state.running = false;
  }
}

function ranked() {
  return state.items.filter((it) => it.status === "done").sort((a, b) => b.row.score - a.row.score || a.id - b.id);
}

function setStatus(text) { $("status").textContent = text; }

function distribution(row) {
  const p = Array.from({ length: 10 }, (_, k) => row[`p${k + 1}`]);
  const top = Math.max(...p);
  const bars = el("div", "dist");
  bars.setAttribute("role", "img");
  bars.setAttribute("aria-label", "Predicted vote distribution over the scores 1 to 10");
  p.forEach((v, k) => {
    const bar = el("div", v === top ? "bar peak" : "bar");
    bar.style.height = `${top > 0 ? (100 * v) / top : 0}%`;
    bar.title = `score ${k + 1}: ${(100 * v).toFixed(1)}%`;
    bars.append(bar);
  });
  const labels = el("div", "dist-labels");
  for (let k = 1; k <= 10; k++) labels.append(el("span", "", String(k)));
  const box = el("div", "dist-box");
  box.append(bars, labels);
  return box;
}

function thumbnail(item, rank) {
  const box = el("div", "thumb");
  const img = el("img");
  img.alt = item.row ? item.row.image : item.file.name;
  img.loading = "lazy";
  img.addEventListener("error", () => { img.remove(); box.prepend(el("div", "no-preview", "no preview")); });
  img.src = item.url;
  box.append(img);
  if (rank) box.append(el("span", "rank", `#${rank}`));
  return box;
}

function card(item, rank) {
  const li = el("li", "card");
  li.dataset.id = String(item.id);
  li.append(thumbnail(item, rank));
  const body = el("div", "body");
  const row = item.row;
  body.append(el("div", "name", row.image));
  body.lastChild.title = row.image;
  const line = el("div", "score-line");
  line.append(el("span", "score", row.score.toFixed(2)), el("span", "of", "/ 10"));
  if (row.std !== undefined && row.std !== null) {
    const std = el("span", "std", `± ${row.std.toFixed(2)}`);
    std.title = "standard deviation of the predicted vote distribution";
    line.append(std);
  }
  body.append(line);
  const meter = el("div", "meter");
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(100, ((row.score - 1) / 9) * 100))}%`;
  meter.append(fill);
  body.append(meter);
  if (state.info.variant === "ava") body.append(distribution(row));
  if (state.info.attention) {  // an ONNX export has no attention maps
    const actions = el("div", "actions");
    const button = el("button", "quiet attention", "RGB attention");
    button.type = "button";
    button.addEventListener("click", () => showAttention(item));
    actions.append(button);
    body.append(actions);
  }
  li.append(body);
  return li;
}

function pendingCard(item) {
  const li = el("li", "card pending");
  li.append(thumbnail(item, 0));
  const body = el("div", "body");
  body.append(el("div", "name", item.file.name), el("div", "of", item.status === "scoring" ? "scoring…" : "waiting…"));
  li.append(body);
  return li;
}

function render() {
  const list = $("results");
  list.replaceChildren(...ranked().map((it, k) => card(it, k + 1)),
    ...state.items.filter((it) => it.status === "queued" || it.status === "scoring").map(pendingCard));
  const failed = state.items.filter((it) => it.status === "failed");
  $("errors").replaceChildren(...failed.map((it) => {
    const li = el("li", "error");
    li.append(el("span", "file", it.row.image), document.createTextNode(`: ${it.row.error}`));
    return li;
  }));
  $("failed").hidden = failed.length === 0;
  const done = ranked().length;
  const waiting = state.items.length - done - failed.length;
  const parts = [];
  if (state.items.length) parts.push(`Scored ${done} of ${state.items.length} photo${state.items.length === 1 ? "" : "s"}`);
  if (failed.length) parts.push(`${failed.length} could not be scored`);
  if (waiting) parts.push(`${waiting} to go…`);
  setStatus(parts.join(" · "));
  $("csv").disabled = done + failed.length === 0;
  $("clear").disabled = state.items.length === 0;
}

async function downloadCsv() {
  const rows = [...ranked(), ...state.items.filter((it) => it.status === "failed")].map((it) => it.row);
  const columns = state.info.columns;
  const full = rows.map((row) => Object.fromEntries(columns.map((c) => [c, c in row ? row[c] : (c === "error" ? "" : null)])));
  const response = await fetch("/api/csv", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ results: full }),
  });
  if (!response.ok) { setStatus(`The CSV could not be made: ${await detail(response)}`); return; }
  const link = el("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = "tanet_scores.csv";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function showAttention(item) {
  const dialog = $("attention");
  const img = $("attention-img");
  $("attention-title").textContent = `RGB-distribution attention: ${item.row.image}`;
  $("attention-status").textContent = "Drawing the figure…";
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.alt = `RGB-attention figure of ${item.row.image}`;
  if (!dialog.open) dialog.showModal();
  const form = new FormData();
  form.append("file", item.file, item.file.name);
  try {
    const response = await post("/api/attention", form);
    if (!response.ok) throw new Error(await detail(response));
    img.src = URL.createObjectURL(await response.blob());
    $("attention-status").textContent = "";
  } catch (err) {
    $("attention-status").textContent = `The figure could not be drawn: ${err.message}`;
  }
}

function clearAll() {
  const pending = (it) => it.status === "scoring" || it.status === "queued";
  state.items.filter((it) => !pending(it)).forEach((it) => URL.revokeObjectURL(it.url));
  state.items = state.items.filter(pending);
  render();
}

function setUp() {
  const drop = $("drop");
  $("picker").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); addFiles(event.dataTransfer.files); });
  // a photo dropped beside the drop zone is scored too, not opened in place of the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    if (!drop.contains(event.target)) addFiles(event.dataTransfer.files);
  });
  $("csv").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", clearAll);
  $("attention-close").addEventListener("click", () => $("attention").close());
  render();
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
