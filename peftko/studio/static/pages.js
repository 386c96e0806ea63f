"use strict";
// peftko studio, the pages after Train: Runs (and two runs' curves), Try, Markers: keep or delete?, Ship.
// Uses app.js's helpers (t, $, el, api, chip, setBar, ...), loaded before this file.

// --- Runs
const num = (x, d = 3) => (typeof x === "number" ? x.toFixed(d) : "–");
let lastRuns = [];
async function loadRuns() {
  showError("runs-error", null);
  try {
    const {runs} = await api("/api/runs");
    lastRuns = runs;
    const list = $("runs-list"); list.replaceChildren();
    drawComparePickers(runs.filter((r) => r.kind === "run"));
    if (!runs.length) { list.append(el("p", {class: "hint", text: t("runs.none")})); return; }
    const grid = el("div", {class: "runs-grid"}); list.append(grid);
    for (const r of runs) {
      const card = el("div", {class: "run", "data-path": r.path}, el("h3", {text: r.path}));
      const dl = el("dl");
      const row = (k, v) => { dl.append(el("dt", {text: t(k)})); const dd = el("dd"); dd.append(v); dl.append(dd); };
      if (r.kind === "merged") { row("runs.merged", r.dtype); row("runs.from", r.adapter); card.append(dl); grid.append(card); continue; }
      if (r.complete) {
        row("runs.base", r.base);
        const chips = el("span"); (r.markers || []).forEach((m) => chips.append(chip(m))); row("runs.markers", chips);
        row("runs.steps", String(r.steps ?? "–"));
        row("runs.kept", el("b", {class: "kept-step", text: String(r.kept_step ?? "–")}));
        const bpc = el("span", {class: "bpc"});
        bpc.append(`${t("runs.basebpc")} ${num(r.bpc_base)} · ${t("runs.before")} `, el("b", {class: "bpc-before", text: num(r.bpc_before)}),
                   " → " + t("runs.after") + " ", el("b", {class: "bpc-after" + (r.bpc_after < r.bpc_before ? " better" : ""), text: num(r.bpc_after)}));
        row("runs.bpc", bpc);
      } else {
        card.append(el("p", {class: "hint", text: r.problem || t("runs.incomplete")}));
        if (r.checkpoints.length) row("runs.checkpoints", r.checkpoints.join(", "));
      }
      card.append(dl);
      if (r.report) card.append(el("img", {src: "/api/report?run=" + encodeURIComponent(r.path) + "&t=" + Math.round(r.mtime), alt: "report.png"}));
      grid.append(card);
    }
  } catch (e) { showError("runs-error", e); }
}
function drawComparePickers(runs) {
  for (const [id, i] of [["compare-a", 0], ["compare-b", 1]]) {
    const sel = $(id); const keep = sel.value; sel.replaceChildren();
    runs.forEach((r) => sel.append(el("option", {value: r.path, text: r.path})));
    if (keep && runs.some((r) => r.path === keep)) sel.value = keep; else if (runs.length) sel.selectedIndex = Math.min(i, runs.length - 1);
  }
  $("compare").hidden = !runs.length;
  if (runs.length) drawCompare();
}
async function drawCompare() {
  const a = $("compare-a").value, b = $("compare-b").value;
  try {
    const [ma, mb] = await Promise.all([api("/api/metrics?run=" + encodeURIComponent(a)), api("/api/metrics?run=" + encodeURIComponent(b))]);
    const series = [[ma.loss, "#2f5bd3", "a loss"], [ma.eval_loss, "#2f5bd3", "a eval"], [mb.loss, "#e0731a", "b loss"], [mb.eval_loss, "#e0731a", "b eval"]];
    plot($("compare-svg"), series);
    $("compare-a-name").textContent = a; $("compare-b-name").textContent = b;
  } catch (e) { showError("runs-error", e); }
}
function plot(svg, series) {
  // Loss curves of two runs on one pair of axes: training loss solid, held-out loss dashed.
  const W = 720, H = 240, L = 48, R = 16, TOP = 12, B = 28, ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; svg.append(e); return e; };
  const pts = series.flatMap((s) => s[0]);
  svg.dataset.points = String(pts.length);
  if (!pts.length) { add("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#8a93a3", "font-size": 14}, t("curve.empty")); return; }
  const x1 = Math.max(...pts.map((p) => p[0]), 1);
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const X = (s) => L + (W - L - R) * s / x1, Y = (v) => TOP + (H - TOP - B) * (1 - (v - y0) / (y1 - y0));
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    add("line", {x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#eef0f4"});
    add("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#5d6675"}, v.toFixed(2));
  }
  add("text", {x: X(x1), y: H - 8, "text-anchor": "end", "font-size": 11, fill: "#5d6675"}, `step ${x1}`);
  for (const [p, color, cls] of series) {
    if (!p.length) continue;
    add("polyline", {points: p.map((q) => `${X(q[0])},${Y(q[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2,
                     "stroke-dasharray": cls.endsWith("eval") ? "6 4" : "none", class: "series " + cls.replace(" ", "-")});
  }
}
$("compare-a").onchange = drawCompare; $("compare-b").onchange = drawCompare;

// --- Ship: merge a run (and --gguf + Modelfile), with the job's bar, the self-check and the files written
async function loadShip() {
  try {
    const [{runs}, {jobs}] = await Promise.all([api("/api/runs"), api("/api/jobs?kind=merge&limit=1")]);
    const sel = $("ship-run"); const keep = sel.value; sel.replaceChildren();
    runs.filter((r) => r.complete).forEach((r) => sel.append(el("option", {value: r.path, text: r.path})));
    if (!sel.options.length) sel.append(el("option", {value: "", text: t("try.nomodel")}));
    if (keep) sel.value = keep;
    if (!sel.value && sel.options.length) sel.selectedIndex = 0;
    if (!$("ship-output").value && sel.value) $("ship-output").value = sel.value + "-merged";
    if (jobs.length && !shipJob) drawShip(jobs[0]), jobs[0].status === "running" && pollShip(jobs[0].id);
    else if (shipJob) drawShip(shipJob);
  } catch (e) { showError("ship-error", e); }
}
let shipJob = null;
function drawShip(j) {
  shipJob = j; $("ship-job").hidden = false;
  $("ship-status").replaceChildren(el("span", {class: "badge " + j.status, id: "ship-badge", "data-status": j.status, text: t("status." + j.status)}),
                                   " ", el("code", {text: j.command}));
  setBar($("ship-bar"), j);
  const check = j.log.find((l) => l.startsWith("self-check:"));
  $("ship-check").hidden = !check; $("ship-check").textContent = check ? `${t("ship.selfcheck")}: ${check.slice(11).trim()}` : "";
  const files = j.log.filter((l) => /^(merged model written|written|gguf|Modelfile)/i.test(l.trim()));
  $("ship-files").textContent = files.join("\n"); $("ship-files").hidden = !files.length;
  $("ship-log").textContent = j.log.slice(-12).join("\n");
  $("merge").disabled = j.status === "running";
  if (j.errors.length) showError("ship-error", new Error(j.errors.join("\n").replace(/^peftko: (error: )?/gm, "")));
}
async function pollShip(id) {
  try {
    const j = await api("/api/jobs/" + id); drawShip(j);
    if (j.status === "running") setTimeout(() => pollShip(id), 1000);
  } catch (e) { showError("ship-error", e); }
}
$("ship-run").onchange = () => { $("ship-output").value = $("ship-run").value + "-merged"; };
$("merge").onclick = async () => {
  showError("ship-error", null);
  try { const j = await api("/api/merge", {run: $("ship-run").value, output: $("ship-output").value, gguf: $("ship-gguf").checked}); drawShip(j); pollShip(j.id); }
  catch (e) { showError("ship-error", e); }
};

// --- Try
async function loadTryModels() {
  try {
    const {runs} = await api("/api/runs");
    const sel = $("try-model"); const keep = sel.value; sel.replaceChildren();
    runs.filter((r) => r.complete || r.kind === "merged").forEach((r) => sel.append(el("option", {value: r.path, text: r.path})));
    if (!sel.options.length) sel.append(el("option", {value: "", text: t("try.nomodel")}));
    if (keep) sel.value = keep;
    if (!sel.value && sel.options.length) sel.selectedIndex = 0;
  } catch (e) { showError("gen-error", e); }
}
const yes = (b) => el("b", {class: b ? "ok" : "no", text: t(b ? "yes" : "no")});
$("generate").onclick = async () => {
  showError("gen-error", null);
  const out = $("gen-out"); out.replaceChildren(); $("gen-status").textContent = t("try.running");
  $("generate").disabled = true; $("gen-bar").hidden = false;
  try {
    let job = await api("/api/generate", {model: $("try-model").value, prompt: $("prompt").value,
      max_new_tokens: $("max_new_tokens").value, temperature: $("temperature").value, seed: $("seed").value});
    while (job.status === "running") { setBar($("gen-bar"), job); await new Promise((r) => setTimeout(r, 800)); job = await api("/api/jobs/" + job.id); }
    setBar($("gen-bar"), job);
    $("gen-status").textContent = "";
    if (!job.samples.length) throw new Error(job.errors.join("\n").replace(/^peftko: (error: )?/gm, "") || job.stderr || job.status);
    for (const s of job.samples) {
      const text = el("div", {class: "line"}); const span = el("span", {class: "t"});
      const given = el("span", {class: "prompt"}); renderParts(splitMarkers(s.prompt), given);
      span.append(given); renderParts(splitMarkers(s.text), span); text.append(span); out.append(text);
      $("gen-status").replaceChildren(el("span", {id: "stop-reason", "data-reason": s.stop_reason},
        `${t("try.stop")}: ${t("stop." + s.stop_reason)} · ${t("try.tokens")}: ${s.new_tokens}`),
        el("span", {id: "structure", class: "structure", "data-pairs": String(s.pairs_closed), "data-ended": String(s.book_ended),
                    "data-whole": String(s.whole_markers)},
          `${t("try.pairs")}: `, yes(s.pairs_closed), ` · ${t("try.ended")}: `, yes(s.book_ended),
          ` · ${t("try.whole")}: `, yes(s.whole_markers), ` · ${t("try.fragments")}: ${s.marker_fragments}`));
    }
  } catch (e) { $("gen-status").textContent = ""; showError("gen-error", e); }
  finally { $("generate").disabled = false; }
};

// --- Markers: keep or delete? (`peftko ablate` as a job, then its ablation.json and ablation.png)
const AB_FIELDS = ["ab-preset", "ab-model", "ab-data", "ab-output", "ab-max_steps", "ab-samples", "ab-sample_tokens", "ab-quant"];
function abForm() { const f = {}; for (const k of AB_FIELDS) f[k.slice(3)] = $(k).value.trim(); return f; }
let abTimer = null, lastAblation = null, abJob = null;
const VARIANTS = ["registered", "as-text", "deleted"];
function abPreview() {
  clearTimeout(abTimer);
  abTimer = setTimeout(async () => {
    try { $("ab-command").textContent = (await api("/api/ablate", {...abForm(), action: "preview"})).command; showError("ab-error", null); }
    catch (e) { $("ab-command").textContent = ""; showError("ab-error", e); }
  }, 250);
}
AB_FIELDS.forEach((k) => { $(k).addEventListener("input", abPreview); $(k).addEventListener("change", abPreview); });
function drawAbJob(j) {
  abJob = j; $("ab-job").hidden = false;
  // which of the three trainings: the last "=== ablate: NAME ===" line (the log is only its tail)
  const stages = j.log.filter((l) => l.startsWith("=== ablate: "));
  const name = stages.length ? stages[stages.length - 1].slice(12, -4) : "";
  const stage = name ? ` · ${t("ablate.stage")} ${VARIANTS.indexOf(name) + 1}/3 (${name})` : "";
  $("ab-status").replaceChildren(el("span", {class: "badge " + j.status, id: "ab-badge", "data-status": j.status, text: t("status." + j.status)}), stage);
  setBar($("ab-bar"), j);
  $("ab-log").textContent = j.log.slice(-14).join("\n");
  $("ab-start").disabled = j.status === "running";
  if (j.errors.length) showError("ab-error", new Error(j.errors.join("\n").replace(/^peftko: (error: )?/gm, "")));
}
async function pollAb(id) {
  try {
    const j = await api("/api/jobs/" + id); drawAbJob(j);
    if (j.status === "running") setTimeout(() => pollAb(id), 1500);
    else if (j.status === "finished") openAblation(j.output);
  } catch (e) { showError("ab-error", e); }
}
async function attachAblate() {
  if (abJob) return;
  try {
    const {jobs} = await api("/api/jobs?kind=ablate&limit=1");
    if (!jobs.length) { abPreview(); return; }
    $("ab-output").value = jobs[0].output; abPreview(); pollAb(jobs[0].id);
  } catch (e) { showError("ab-error", e); }
}
$("ab-start").onclick = async () => {
  showError("ab-error", null); $("ab-result").hidden = true;
  try { const j = await api("/api/ablate", {...abForm(), action: "start"}); drawAbJob(j); pollAb(j.id); }
  catch (e) { showError("ab-error", e); }
};
$("ab-open").onclick = () => openAblation($("ab-output").value.trim());
async function openAblation(dir) {
  try {
    const a = await api("/api/ablation?dir=" + encodeURIComponent(dir));
    if (!a.done) { $("ab-result").hidden = true; return; }
    a.dir = dir; drawAblation(a);
  } catch (e) { showError("ab-error", e); }
}
function koreanVerdict(a) {
  const best = a.variants.reduce((m, r) => (r.bpc_text !== null && (m === null || r.bpc_text < m.bpc_text) ? r : m), null);
  const figures = a.variants.filter((r) => r.bpc_text !== null).map((r) => `${r.variant} ${r.bpc_text.toFixed(3)}`).join(", ");
  const tests = [...a.verdict.matchAll(/than ([\w-]+) \(sign test p = ([0-9.]+): (sure|not sure)/g)]
    .map((m) => `${m[1]}: p = ${m[2]} (${t(m[3] === "sure" ? "verdict.sure" : "verdict.notsure")})`).join(", ");
  return [t("verdict." + best.variant), `${t("verdict.figures")}: ${figures}. ${t("ablate.lower")}`,
          tests ? `${t("verdict.test")} (${best.variant}): ${tests}` : "", a.verdict.includes("Note: the base has") ? t("verdict.toy") : ""]
    .filter(Boolean).join("\n");
}
function drawAblation(a) {
  lastAblation = a; $("ab-result").hidden = false;
  $("ab-verdict").textContent = lang === "ko" ? koreanVerdict(a) : a.verdict.replace(/^verdict: /, "");
  const s = (x) => (x ? `${x.structure.toFixed(2)} (${x.samples})` : "–");
  table("ab-table", [["ablate.variant"], ["ablate.bpc_text", "num"], ["ablate.bpc", "num"], ["ablate.top1", "num"], ["ablate.structure", "num"]],
        a.variants.map((r) => [[r.variant], [num(r.bpc_text), "num"], [num(r.bpc), "num"],
                               [r.marker_top1 === null ? "–" : (100 * r.marker_top1).toFixed(1) + "%", "num"], [s(r.structure), "num"]]));
  $("ab-chart").hidden = !a.chart;
  if (a.chart) $("ab-chart").src = "/api/ablation.png?dir=" + encodeURIComponent(a.dir) + "&t=" + Date.now();
}

// --- start
async function init() {
  applyLang();
  try {
    const c = await api("/api/choices");
    for (const id of ["preset", "ab-preset"]) {
      const presets = $(id); presets.append(el("option", {value: "", text: t("train.none")}));
      c.presets.forEach((p) => presets.append(el("option", {value: p.name, text: p.name})));
      if (c.presets.some((p) => p.name === "tiny-demo.yaml")) presets.value = "tiny-demo.yaml";
    }
    $("folders").replaceChildren(...[...c.corpora, ...c.folders].map((f) => el("option", {value: f})));
    $("bases").replaceChildren(...[...c.bases, ...c.folders].map((f) => el("option", {value: f})));
  } catch (e) { showError("corpus-error", e); }
  show((location.hash || "#corpus").slice(1).split("?")[0] || "corpus");
  preview();
  attachTrain();
  if (page === "corpus") openCorpus();
}
init();
