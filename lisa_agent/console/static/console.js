// LISA console page: live frames and results over one WebSocket, instructions and choices over the HTTP API
// (docs/console.md). No framework, no build step.
"use strict";

const PALETTE = ["#ff6b57", "#42d6c8", "#f5b942", "#a98bff", "#7ad35a", "#4fa8ff", "#ff8ad8", "#c9d65a"];
const $ = (id) => document.getElementById(id);

const ui = {
  frame: $("frame"), overlay: $("overlay"), chips: $("chips"), source: $("source"), link: $("link"),
  frameinfo: $("frameinfo"), latency: $("latency"), form: $("ask"), input: $("instruction"), send: $("send"),
  continuous: $("continuous"), status: $("status"), answer: $("answer"), rows: document.querySelector("#masks tbody"),
  target: $("target"),
};

const view = {
  result: null,       // the result being shown (result schema + envelope)
  masks: [],          // decoded masks of that result: Uint8Array(h * w), row-major
  target: null,       // index of the chosen mask, or null
  pendingBlob: null,  // newest frame not drawn yet
  drawing: false,
  frames: 0,
  resultAt: 0,        // performance.now() of about when the shown masks' frame arrived
  asking: 0,          // instructions in flight from this page
};

// A token in the address (?token=...) has set the console's cookie; keep it out of the address bar and history.
if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", location.pathname);
}

// ---------------------------------------------------------------- notices
function notice(text, kind) {
  if (!text) {
    ui.status.hidden = true;
    ui.status.textContent = "";
    return;
  }
  ui.status.hidden = false;
  ui.status.className = "notice " + (kind || "info");
  ui.status.textContent = text;
}

// ---------------------------------------------------------------- COCO RLE (compressed counts string)
function decodeRle(rle) {
  const [h, w] = rle.size;
  const s = rle.counts;
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const mask = new Uint8Array(h * w);  // row-major; RLE runs are column-major
  let i = 0, value = 0;
  for (const run of counts) {
    if (value) {
      for (let j = i; j < i + run; j += 1) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    i += run;
    value = 1 - value;
  }
  return mask;
}

function hexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

// ---------------------------------------------------------------- drawing
function sizeCanvases(w, h) {
  for (const c of [ui.frame, ui.overlay]) {
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
  }
}

function drawFrame(blob) {
  view.pendingBlob = blob;
  if (view.drawing) return;
  view.drawing = true;
  const next = view.pendingBlob;
  view.pendingBlob = null;
  createImageBitmap(next).then((bitmap) => {
    sizeCanvases(bitmap.width, bitmap.height);
    ui.frame.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    view.frames += 1;
  }).catch(() => {}).finally(() => {
    view.drawing = false;
    if (view.pendingBlob) drawFrame(view.pendingBlob);
  });
}

function drawOverlay() {
  const r = view.result;
  const ctx = ui.overlay.getContext("2d");
  if (!r) {
    ctx.clearRect(0, 0, ui.overlay.width, ui.overlay.height);
    ui.chips.replaceChildren();
    return;
  }
  const [h, w] = r.image_size;
  sizeCanvases(w, h);
  const image = ctx.createImageData(w, h);
  const px = image.data;
  view.masks.forEach((mask, k) => {
    const [cr, cg, cb] = hexRgb(PALETTE[k % PALETTE.length]);
    const chosen = view.target === k;
    const fill = chosen ? 150 : 105;
    for (let y = 0; y < h; y += 1) {
      for (let x = 0; x < w; x += 1) {
        const i = y * w + x;
        if (!mask[i]) continue;
        const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
          !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
        const o = i * 4;
        if (edge && chosen) {
          px[o] = 255; px[o + 1] = 255; px[o + 2] = 255; px[o + 3] = 255;
        } else {
          px[o] = cr; px[o + 1] = cg; px[o + 2] = cb; px[o + 3] = edge ? 255 : fill;
        }
      }
    }
  });
  ctx.putImageData(image, 0, 0);
  // labels: HTML chips placed over the picture (so the overlay canvas holds the masks only)
  const chips = r.masks.map((m, k) => {
    const chip = document.createElement("span");
    chip.className = "chip" + (view.target === k ? " target" : "");
    chip.textContent = `${k + 1} ${r.labels[k]}`;
    chip.style.background = PALETTE[k % PALETTE.length];
    chip.style.left = `${(100 * Math.max(0, m.bbox[0])) / w}%`;
    chip.style.top = `${(100 * Math.max(0, m.bbox[1])) / h}%`;
    return chip;
  });
  ui.chips.replaceChildren(...chips);
}

// ---------------------------------------------------------------- results
function fmt(v, digits) {
  return v === null || v === undefined ? "—" : Number(v).toFixed(digits);
}

function showAnswerText(r) {
  ui.answer.replaceChildren();
  ui.answer.classList.remove("muted");
  const parts = r.text.split("[SEG]");
  parts.forEach((part, k) => {
    ui.answer.append(document.createTextNode(part));
    if (k < parts.length - 1) {
      const seg = document.createElement("span");
      seg.className = "seg";
      seg.textContent = `mask ${k + 1}`;
      seg.style.background = PALETTE[k % PALETTE.length];
      ui.answer.append(seg);
    }
  });
}

function rowCells(r, m, k) {
  const point = m.target && m.target.point ? m.target.point.map((v) => v.toFixed(3)).join(", ")
    : (m.target ? `depth ${m.target.depth_m.toFixed(3)}` : "—");
  return [String(k + 1), r.labels[k], fmt(m.score, 2), m.bbox.join(", "), point];
}

function showRows(r, fresh) {
  const existing = ui.rows.querySelectorAll("tr");
  if (!fresh && existing.length === r.masks.length) {  // the same answer on a newer frame: update in place
    r.masks.forEach((m, k) => {                       // (rebuilding the rows would swallow a click)
      rowCells(r, m, k).forEach((text, c) => {
        const cell = existing[k].children[c];
        if (c > 0 && cell.textContent !== text) cell.textContent = text;
      });
    });
    markTarget();
    return;
  }
  const rows = r.masks.map((m, k) => {
    const tr = document.createElement("tr");
    tr.dataset.index = String(k);
    rowCells(r, m, k).forEach((text, c) => {
      const td = document.createElement("td");
      if (c >= 3) td.className = "wrap";
      if (c === 0) {
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = PALETTE[k % PALETTE.length];
        td.append(sw);
      }
      td.append(document.createTextNode(text));
      tr.append(td);
    });
    tr.addEventListener("click", () => choose({ index: k }));
    return tr;
  });
  ui.rows.replaceChildren(...rows);
  markTarget();
}

function markTarget() {
  for (const tr of ui.rows.querySelectorAll("tr")) {
    tr.classList.toggle("chosen", Number(tr.dataset.index) === view.target);
  }
  const r = view.result;
  if (r && view.target !== null && view.target < r.masks.length) {
    const m = r.masks[view.target];
    const where = m.target && m.target.point ? ` at (${m.target.point.map((v) => v.toFixed(3)).join(", ")}) m` : "";
    ui.target.textContent = `Target: ${view.target + 1} ${r.labels[view.target]}${where}`;
    ui.target.classList.add("set");
  } else {
    ui.target.textContent = "Target: none. Click a mask or a row to choose one.";
    ui.target.classList.remove("set");
  }
}

function showResult(r) {
  if (view.result && r.request < view.result.request) return;  // an older answer arriving late
  const fresh = !view.result || view.result.request !== r.request;
  view.result = r;
  view.resultAt = performance.now() - r.latency_ms;  // about when the frame LISA looked at arrived
  view.masks = r.masks.map((m) => decodeRle(m.rle));
  ui.overlay.dataset.request = String(r.request);
  ui.overlay.dataset.frameSeq = String(r.frame_seq);
  view.target = r.target === undefined ? (fresh ? null : view.target) : r.target;
  if (fresh || r.origin === "instruction") showAnswerText(r);
  showRows(r, fresh || r.origin === "instruction");
  drawOverlay();
  if (r.origin === "instruction") {  // the latency of the last answer (tracked frames do not change it)
    const model = r.model_ms === null || r.model_ms === undefined ? "" : ` (model ${r.model_ms.toFixed(0)} ms)`;
    ui.latency.textContent = `last answer ${r.latency_ms.toFixed(0)} ms${model}`;
    ui.latency.classList.remove("muted");
  }
  if (r.origin === "instruction" || fresh) {
    if (r.message) notice(r.message, r.declined ? "warn" : "info");
    else if (view.asking === 0) notice("");
  }
}

function applyState(s) {
  ui.source.textContent = `${s.source}${s.model ? " · " + s.model : ""}`;
  ui.continuous.checked = !!s.continuous;
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    if (!document.activeElement || document.activeElement.name !== "mode") radio.checked = radio.value === s.mode;
  }
  if (s.target && view.result && s.target.request === view.result.request) view.target = s.target.index;
  else if (!s.target) view.target = null;
  markTarget();
  drawOverlay();
  if (s.busy && view.asking === 0) notice("The model is answering an instruction…", "busy");
}

// ---------------------------------------------------------------- API
async function api(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

async function ask(text) {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  view.asking += 1;
  ui.send.disabled = true;
  notice(`Asking: “${text}” (${mode})…`, "busy");
  try {
    const r = await api("/api/instruction", { text, mode });
    showResult(r);
    if (!r.message) notice("");
  } catch (e) {
    notice(e.status === 409 ? `Replaced by a newer instruction: ${e.message}` : `Error: ${e.message}`,
      e.status === 409 ? "info" : "error");
  } finally {
    view.asking -= 1;
    ui.send.disabled = view.asking > 0;
  }
}

async function choose(what) {
  try {
    const s = await api("/api/target", what);
    applyState(s);
  } catch (e) {
    notice(e.message, "warn");
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text) {
    notice("Type what to look for first, e.g. “grab something to cut with”.", "warn");
    return;
  }
  ask(text);
});

ui.continuous.addEventListener("change", async () => {
  const on = ui.continuous.checked;
  try {
    applyState(await api("/api/continuous", { on }));
  } catch (e) {
    ui.continuous.checked = !on;
    notice(`Error: ${e.message}`, "error");
  }
});

ui.overlay.addEventListener("click", (event) => {
  const r = view.result;
  if (!r) return;
  const box = ui.overlay.getBoundingClientRect();
  const [h, w] = r.image_size;
  const x = Math.floor(((event.clientX - box.left) * w) / box.width);
  const y = Math.floor(((event.clientY - box.top) * h) / box.height);
  if (x < 0 || y < 0 || x >= w || y >= h) return;
  for (let k = view.masks.length - 1; k >= 0; k -= 1) {  // later masks lie on top
    if (view.masks[k][y * w + x]) {
      choose({ index: k });
      return;
    }
  }
  notice("No mask there: click inside a coloured mask.", "info");
});

// ---------------------------------------------------------------- WebSocket
let retry = 500;

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onopen = () => {
    retry = 500;
    ui.link.textContent = "live";
    ui.link.className = "pill on";
  };
  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      drawFrame(event.data);
      return;
    }
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "hello") {
      applyState(msg.state);
      if (msg.state.last_result) showResult(msg.state.last_result);
    } else if (msg.type === "result") {
      showResult(msg.result);
    } else if (msg.type === "state") {
      applyState(msg.state);
    } else if (msg.type === "error" && view.asking === 0) {
      notice(`Error: ${msg.error.message}`, "error");
    }
  };
  ws.onclose = () => {
    ui.link.textContent = "reconnecting…";
    ui.link.className = "pill off";
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 8000);
  };
}

// the view's caption: frames so far, and how old the masks drawn over the live picture are
setInterval(() => {
  const r = view.result;
  let masks = "";
  if (r && r.masks.length && r.track && r.track.source === "tracked") {
    const conf = Math.min(...r.track.confidence);
    masks = ` · masks tracked ${r.track.age_frames} frames since LISA answered` +
      (Number.isFinite(conf) ? ` (confidence ${conf.toFixed(2)})` : "");
  } else if (r && r.masks.length) {
    const age = (performance.now() - view.resultAt) / 1000;
    masks = ` · masks from a frame ${age < 10 ? age.toFixed(1) : age.toFixed(0)} s old`;
  }
  ui.frameinfo.textContent = view.frames ? `live · ${view.frames} frames${masks}` : "waiting for frames…";
}, 500);

connect();
ui.input.focus();
