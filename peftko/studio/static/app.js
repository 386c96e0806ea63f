"use strict";
// peftko studio: one page, no libraries, nothing from the network but this studio's own API.
const T = {
  ko: {
    "nav.corpus": "말뭉치", "nav.train": "학습", "nav.runs": "실행 기록", "nav.try": "생성해 보기",
    "corpus.title": "말뭉치 살펴보기", "corpus.open": "열기",
    "corpus.hint": "루트 아래의 폴더(또는 내장 예제 builtin:sample)를 고르면 peftko markers 보고서를 보여 줍니다.",
    "corpus.markers": "마커", "corpus.files": "파일과 인코딩", "corpus.problems": "문제 (파일:줄)", "corpus.book": "책 한 권 보기",
    "corpus.nproblems": "문제", "corpus.nmarkers": "마커 종류", "corpus.nfiles": "파일", "corpus.noproblem": "문제가 없습니다.",
    "col.marker": "마커", "col.count": "개수", "col.files": "파일 수", "col.file": "파일", "col.encoding": "인코딩",
    "col.status": "상태", "col.chars": "글자 수", "col.where": "위치", "col.kind": "종류", "col.text": "내용",
    "train.title": "학습", "train.preset": "설정 파일 (configs/)", "train.model": "기본 모델", "train.data": "말뭉치",
    "train.output": "출력 폴더", "train.max_steps": "최대 스텝", "train.lr": "학습률", "train.lora_r": "LoRA 랭크",
    "train.seq_len": "시퀀스 길이", "train.batch_size": "배치 크기", "train.logging_steps": "기록 간격 (스텝)",
    "train.eval_steps": "검증 간격 (스텝)", "train.quant": "양자화",
    "train.command": "실행할 명령 (복사해서 터미널에서도 쓸 수 있습니다)", "train.plan": "메모리 계획 (--dry-run)",
    "train.start": "학습 시작", "train.stop": "멈춤 (이어서 학습 가능)", "train.resume": "이어서 학습", "train.log": "로그",
    "train.none": "(설정 파일 없이)", "train.planning": "메모리 계획을 계산하는 중…",
    "status.running": "학습 중", "status.finished": "완료", "status.stopped": "멈춤 (이어서 학습할 수 있음)",
    "status.failed": "실패", "status.ended": "끝남", "status.stopping": "멈추는 중 (체크포인트 저장)…",
    "curve.loss": "학습 손실", "curve.eval": "검증 손실", "curve.lr": "학습률 (오른쪽 축)", "curve.empty": "첫 기록을 기다리는 중…",
    "runs.title": "실행 기록", "runs.hint": "루트 아래의 모든 학습 결과 (각 폴더의 peftko.json). 문자당 비트(bpc)는 낮을수록 좋습니다.",
    "runs.none": "아직 학습 결과가 없습니다. 학습 탭에서 시작하세요.", "runs.base": "기본 모델", "runs.markers": "마커",
    "runs.steps": "스텝", "runs.bpc": "문자당 비트 (검증)", "runs.before": "학습 전", "runs.after": "학습 후",
    "runs.basebpc": "기본 모델", "runs.kept": "남긴 스텝", "runs.incomplete": "진행 중이거나 멈춘 실행 (peftko.json 없음)",
    "runs.checkpoints": "체크포인트", "runs.merged": "병합된 모델", "runs.from": "원본 실행",
    "ship.merge": "병합 (독립 모델 만들기)", "ship.gguf": "GGUF와 Ollama Modelfile도", "ship.output": "병합 모델 폴더",
    "try.title": "생성해 보기", "try.model": "학습 결과 또는 병합 모델", "try.max": "최대 새 토큰",
    "try.temperature": "온도 (0: 항상 같은 결과)", "try.seed": "시드", "try.prompt": "프롬프트", "try.generate": "생성",
    "try.running": "생성 중… (모델을 불러오는 데 몇 초 걸립니다)", "try.stop": "멈춘 이유", "try.tokens": "새 토큰",
    "try.fragments": "마커 조각", "try.nomodel": "학습 결과가 없습니다",
    "stop.eos": "모델이 끝(eos)을 냈습니다", "stop.length": "최대 토큰 수에 닿았습니다", "stop.marker": "책 끝 마커를 썼습니다",
    "plan.fits": "메모리",
    "nav.ablate": "마커: 유지? 삭제?", "nav.ship": "내보내기",
    "ablate.title": "마커를 유지할까, 지울까?", "ablate.hint": "peftko ablate: 같은 설정으로 세 번 학습합니다 (마커를 토큰으로 등록 / 평범한 글자로 / 지움). 검증 책의 본문을 가장 잘 예측한 쪽이 답입니다.",
    "ablate.output": "결과 폴더", "ablate.samples": "책마다 샘플 수", "ablate.tokens": "샘플 최대 토큰", "ablate.start": "비교 시작",
    "ablate.open": "결과 열기", "ablate.variant": "변형", "ablate.verdict": "결론", "ablate.bpc_text": "본문 문자당 비트",
    "ablate.bpc": "전체 문자당 비트", "ablate.top1": "마커 적중률", "ablate.structure": "구조 점수",
    "ablate.stage": "변형", "ablate.lower": "낮을수록 좋습니다.",
    "verdict.registered": "마커를 유지하세요. 마커마다 토큰 하나로 등록하는 것이 가장 좋았습니다.",
    "verdict.as-text": "마커를 유지하세요. 다만 여기서는 마커를 평범한 글자로 둔 것이 같거나 더 좋았습니다.",
    "verdict.deleted": "여기서는 마커를 지운 쪽이 본문을 가장 잘 예측했습니다. 구조가 필요할 때만 마커를 유지하세요.",
    "verdict.figures": "검증 책 본문의 문자당 비트", "verdict.sure": "확실함", "verdict.notsure": "확실하지 않음",
    "verdict.test": "책별 부호 검정", "verdict.toy": "기본 모델이 무작위로 초기화된 작은 장난감 모델이라, 이 결론은 그 모델에 대한 것입니다. 실제로 학습할 기본 모델로 다시 비교하세요.",
    "ship.title": "내보내기: 병합, GGUF, Ollama", "ship.hint": "학습 결과를 기본 모델에 합쳐 독립 모델을 만들고, 원하면 GGUF 파일과 Ollama Modelfile도 씁니다. 병합 후 자체 검사 결과를 보여 줍니다.",
    "ship.run": "학습 결과", "ship.selfcheck": "자체 검사", "ship.files": "쓴 파일",
    "compare.title": "두 실행의 곡선 비교", "compare.a": "실행 A", "compare.b": "실행 B",
    "try.pairs": "짝 닫힘", "try.ended": "책 끝", "try.whole": "마커 온전", "yes": "예", "no": "아니오",
    "phase.train": "학습", "phase.evaluate": "평가", "phase.read corpus": "말뭉치 읽기", "phase.tokenise": "토큰화",
    "phase.build base": "기본 모델 만들기", "phase.sample": "샘플", "phase.merge": "병합", "phase.self-check": "자체 검사",
    "phase.gguf": "GGUF 변환", "phase.done": "완료",
    "error": "오류", "lang": "English",
  },
  en: {
    "nav.corpus": "Corpus", "nav.train": "Train", "nav.runs": "Runs", "nav.try": "Try",
    "corpus.title": "Look at a corpus", "corpus.open": "Open",
    "corpus.hint": "Pick a folder under the root (or the bundled builtin:sample) for the peftko markers report.",
    "corpus.markers": "Markers", "corpus.files": "Files and encodings", "corpus.problems": "Problems (file:line)",
    "corpus.book": "One book", "corpus.nproblems": "problems", "corpus.nmarkers": "markers", "corpus.nfiles": "files",
    "corpus.noproblem": "No problems.",
    "col.marker": "marker", "col.count": "count", "col.files": "files", "col.file": "file", "col.encoding": "encoding",
    "col.status": "status", "col.chars": "characters", "col.where": "where", "col.kind": "kind", "col.text": "what",
    "train.title": "Train", "train.preset": "Config (configs/)", "train.model": "Base model", "train.data": "Corpus",
    "train.output": "Output folder", "train.max_steps": "Max steps", "train.lr": "Learning rate", "train.lora_r": "LoRA rank",
    "train.seq_len": "Sequence length", "train.batch_size": "Batch size", "train.logging_steps": "Log every (steps)",
    "train.eval_steps": "Evaluate every (steps)", "train.quant": "Quantization",
    "train.command": "The command (copy it to run it in a terminal)", "train.plan": "Memory plan (--dry-run)",
    "train.start": "Start training", "train.stop": "Stop (resumable)", "train.resume": "Resume", "train.log": "Log",
    "train.none": "(no config file)", "train.planning": "Working out the memory plan…",
    "status.running": "training", "status.finished": "finished", "status.stopped": "stopped (can resume)",
    "status.failed": "failed", "status.ended": "ended", "status.stopping": "stopping (writing a checkpoint)…",
    "curve.loss": "training loss", "curve.eval": "held-out loss", "curve.lr": "learning rate (right axis)",
    "curve.empty": "waiting for the first logged step…",
    "runs.title": "Runs", "runs.hint": "Every training run under the root (each folder's peftko.json). Bits per character: lower is better.",
    "runs.none": "No runs yet. Start one on the Train page.", "runs.base": "base", "runs.markers": "markers",
    "runs.steps": "steps", "runs.bpc": "bits per character (held out)", "runs.before": "before", "runs.after": "after",
    "runs.basebpc": "base", "runs.kept": "kept step", "runs.incomplete": "running or stopped (no peftko.json yet)",
    "runs.checkpoints": "checkpoints", "runs.merged": "merged model", "runs.from": "from run",
    "ship.merge": "Merge (a standalone model)", "ship.gguf": "also a GGUF and an Ollama Modelfile", "ship.output": "merged model folder",
    "try.title": "Try it", "try.model": "Run or merged model", "try.max": "Max new tokens",
    "try.temperature": "Temperature (0: repeatable)", "try.seed": "Seed", "try.prompt": "Prompt", "try.generate": "Generate",
    "try.running": "Generating… (loading the model takes a few seconds)", "try.stop": "stopped because",
    "try.tokens": "new tokens", "try.fragments": "marker fragments", "try.nomodel": "no runs yet",
    "stop.eos": "the model wrote its end (eos)", "stop.length": "reached the token limit", "stop.marker": "wrote the book-end marker",
    "plan.fits": "memory",
    "nav.ablate": "Markers: keep or delete?", "nav.ship": "Ship",
    "ablate.title": "Keep the markers, or delete them?", "ablate.hint": "peftko ablate: three trainings with the same settings (markers registered as tokens / left as plain text / deleted). The one that predicts the held-out books' story text best is the answer.",
    "ablate.output": "output folder", "ablate.samples": "samples per book", "ablate.tokens": "sample max tokens", "ablate.start": "Compare",
    "ablate.open": "Open results", "ablate.variant": "variant", "ablate.verdict": "Verdict", "ablate.bpc_text": "story text bpc",
    "ablate.bpc": "whole text bpc", "ablate.top1": "marker top-1", "ablate.structure": "structure",
    "ablate.stage": "variant", "ablate.lower": "Lower is better.",
    "ship.title": "Ship: merge, GGUF, Ollama", "ship.hint": "Merge a run into its base as a standalone model, and optionally write a GGUF and an Ollama Modelfile. The merge's self-check is shown.",
    "ship.run": "run", "ship.selfcheck": "self-check", "ship.files": "written",
    "compare.title": "Two runs' curves", "compare.a": "run A", "compare.b": "run B",
    "try.pairs": "pairs closed", "try.ended": "book ended", "try.whole": "whole markers only", "yes": "yes", "no": "no",
    "phase.done": "done",
    "error": "error", "lang": "한국어",
  },
};
let lang = localStorage.getItem("peftko.lang") || "ko";
const t = (k) => (T[lang][k] ?? T.ko[k] ?? k);
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json", "X-Peftko": "1"},
                                          body: JSON.stringify(body)};
  let r;
  try { r = await fetch(path, opts); } catch (e) { throw new Error("the studio does not answer: " + e.message); }
  const data = await r.json().catch(() => ({error: `HTTP ${r.status}`}));
  if (!r.ok || data.error) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}
function showError(id, err) {
  const box = $(id);
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false; box.textContent = `${t("error")}: ${err.message || err}`;
}

// --- one progress bar for every long job (the last phase the command's --progress json reported)
function barText(p) {
  if (!p) return "";
  const name = (lang === "ko" && T.ko["phase." + p.phase]) || p.phase;  // "sample 1/1" stays as it is
  return `${name}: ${p.done}${p.total ? " / " + p.total : ""} ${p.unit || ""}`;
}
function barFraction(p, status) {
  if (status === "finished") return 1;
  return p && p.total ? Math.min(1, p.done / p.total) : 0;
}
function setBar(box, job) {
  const p = job.progress; const frac = barFraction(p, job.status);
  box.classList.add("bar"); box.dataset.phase = p ? p.phase : ""; box.dataset.fraction = frac.toFixed(3);
  const fillEl = box.querySelector("div") || box.appendChild(el("div")); fillEl.style.width = (100 * frac).toFixed(1) + "%";
  const label = box.querySelector("span") || box.appendChild(el("span"));
  label.textContent = job.status === "finished" ? t("phase.done") + (p ? " · " + barText(p) : "") : barText(p);
}

// --- language and pages
function applyLang() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((e) => { e.textContent = t(e.dataset.i18n); });
  $("lang").textContent = t("lang");
}
$("lang").onclick = () => { lang = lang === "ko" ? "en" : "ko"; localStorage.setItem("peftko.lang", lang); applyLang(); rerender(); };
let page = "corpus";
function show(name) {
  page = name;
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== "page-" + name; });
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("on", b.dataset.page === name));
  history.replaceState(null, "", "#" + name);
  if (name === "runs") loadRuns();
  if (name === "try") loadTryModels();
  if (name === "ship") loadShip();
  if (name === "ablate") attachAblate();
}
document.querySelectorAll("nav button").forEach((b) => { b.onclick = () => show(b.dataset.page); });
function rerender() {
  if (lastReport) drawReport(lastReport); if (lastJob) drawJob(lastJob);
  if (page === "runs") loadRuns(); if (page === "ship") loadShip(); if (page === "ablate" && lastAblation) drawAblation(lastAblation);
}

// --- markers as chips
function hue(name) {
  const key = name.replace(/^\|(START_OF_|END_OF_)?/, "").replace(/\|>$/, "");
  let h = 0; for (const c of key) h = (h * 31 + c.charCodeAt(0)) % 360;
  return (h * 7) % 360;
}
function chip(marker) {
  const inner = marker.replace(/^\|/, "").replace(/\|>$/, "");
  let label = inner;
  if (inner.startsWith("START_OF_")) label = "⟦" + inner.slice(9);
  else if (inner.startsWith("END_OF_")) label = inner.slice(7) + "⟧";
  const h = hue(marker);
  return el("span", {class: "chip", title: marker, "data-marker": marker,
                     style: `background:hsl(${h} 70% 90%);color:hsl(${h} 60% 28%)`, text: label});
}
function renderParts(parts, into) {
  for (const [kind, text] of parts) into.append(kind === "m" ? chip(text) : document.createTextNode(text));
}
function splitMarkers(text) {
  const parts = []; let at = 0;
  for (const m of text.matchAll(/\|[A-Z][A-Z0-9_]*\|>/g)) {
    if (m.index > at) parts.push(["t", text.slice(at, m.index)]);
    parts.push(["m", m[0]]); at = m.index + m[0].length;
  }
  if (at < text.length) parts.push(["t", text.slice(at)]);
  return parts;
}

// --- Corpus
let lastReport = null;
function table(id, head, rows) {
  const tb = $(id); tb.replaceChildren();
  tb.append(el("tr", {}, ...head.map(([k, cls]) => el("th", {class: cls || "", text: t(k)}))));
  for (const r of rows) tb.append(el("tr", {}, ...r.map(([v, cls]) => {
    const td = el("td", {class: cls || ""}); td.append(v); return td;
  })));
}
function stat(n, label, cls) { return el("div", {class: "stat " + (cls || "")}, el("b", {text: String(n)}), label); }
function drawReport(r) {
  const markers = Object.entries(r.markers);
  $("corpus-summary").replaceChildren(
    stat(r.files.length, t("corpus.nfiles")),
    Object.assign(stat(markers.length, t("corpus.nmarkers")), {id: "n-markers"}),
    Object.assign(stat(r.problems.length, t("corpus.nproblems"), r.problems.length ? "bad" : "good"), {id: "n-problems"}));
  table("markers-table", [["col.marker"], ["col.count", "num"], ["col.files", "num"]],
        markers.map(([m, n]) => [[el("span", {}, chip(m), " ", el("code", {text: m}))], [String(n), "num"], [String(r.marker_files[m]), "num"]]));
  table("files-table", [["col.file"], ["col.encoding"], ["col.status"], ["col.chars", "num"]],
        r.files.map((f) => [[f.name], [f.encoding || "-"], [f.detail ? `${f.status}: ${f.detail}` : f.status],
                            [String(f.chars), "num"]]));
  if (r.problems.length) {
    table("problems-table", [["col.where"], ["col.kind"], ["col.text"]],
          r.problems.map((p) => [[`${p.name}:${p.line}`], [p.kind], [p.text]]));
  } else {
    $("problems-table").replaceChildren(el("tr", {}, el("td", {text: t("corpus.noproblem")})));
  }
}
async function openCorpus() {
  const path = $("corpus-path").value.trim();
  showError("corpus-error", null);
  try {
    const r = await api("/api/corpus?path=" + encodeURIComponent(path));
    lastReport = r; $("corpus-report").hidden = false; drawReport(r);
    const sel = $("book-file"); sel.replaceChildren();
    r.files.filter((f) => f.status === "ok").forEach((f) => sel.append(el("option", {value: f.name, text: f.name})));
    if (sel.options.length) await openBook();
    else $("book").replaceChildren();
    if (!$("data").value) { $("data").value = path; preview(); }
  } catch (e) { $("corpus-report").hidden = true; showError("corpus-error", e); }
}
async function openBook() {
  const box = $("book");
  try {
    const b = await api(`/api/book?corpus=${encodeURIComponent(lastReport.corpus)}&file=${encodeURIComponent($("book-file").value)}`);
    box.replaceChildren();
    for (const line of b.lines) {
      const row = el("div", {class: "line" + (line.problems.length ? " problem" : "")}, el("span", {class: "n", text: String(line.n)}));
      const text = el("span", {class: "t"}); renderParts(line.parts, text);
      if (line.problems.length) { text.title = line.problems.join("\n"); row.append(text, el("span", {class: "why", text: line.problems.join("; ")})); }
      else row.append(text);
      box.append(row);
    }
  } catch (e) { box.replaceChildren(el("div", {class: "error", text: `${t("error")}: ${e.message}`})); }
}
$("corpus-open").onclick = openCorpus;
$("corpus-path").addEventListener("keydown", (e) => { if (e.key === "Enter") openCorpus(); });
$("book-file").onchange = openBook;

// --- Train
const FIELDS = ["preset", "model", "data", "output", "max_steps", "lr", "lora_r", "seq_len", "batch_size",
                "logging_steps", "eval_steps", "quant"];
function form() { const f = {}; for (const k of FIELDS) f[k] = $(k).value.trim(); return f; }
let previewTimer = null;
function preview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(async () => {
    try { $("command").textContent = (await api("/api/train", {...form(), action: "preview"})).command; showError("train-error", null); }
    catch (e) { $("command").textContent = ""; showError("train-error", e); }
  }, 250);
}
FIELDS.forEach((k) => { $(k).addEventListener("input", preview); $(k).addEventListener("change", preview); });
let lastJob = null, pollTimer = null, stopping = false;
function drawJob(job) {
  lastJob = job;
  $("train-job").hidden = false;
  const status = stopping && job.status === "running" ? "stopping" : job.status;
  $("train-status").replaceChildren(el("span", {class: "badge " + job.status, id: "train-badge", "data-status": job.status, text: t("status." + status)}));
  $("train-output").textContent = job.output;
  setBar($("train-bar"), job);
  const logText = job.log.join("\n") + (job.status === "failed" && job.stderr && !job.errors.length ? "\n" + job.stderr : "");
  const log = $("log"); const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
  log.textContent = logText; if (atEnd) log.scrollTop = log.scrollHeight;
  $("stop").disabled = job.status !== "running";
  $("resume").disabled = !(job.status === "stopped" || job.status === "failed" || job.status === "ended");
  $("start").disabled = job.status === "running";
  if (job.errors.length) showError("train-error", new Error(job.errors.join("\n").replace(/^peftko: (error: )?/gm, "")));
}
async function pollJob(id) {
  clearTimeout(pollTimer);
  try {
    const job = await api("/api/jobs/" + id);
    if (job.status !== "running") stopping = false;
    if (!job.errors.length) showError("train-error", null);  // e.g. "does not answer" while the studio restarted
    drawJob(job);
    const m = await api("/api/metrics?run=" + encodeURIComponent(job.output));
    drawCurve(m);
    if (job.status === "running") pollTimer = setTimeout(() => pollJob(id), 1500);
  } catch (e) { showError("train-error", e); pollTimer = setTimeout(() => pollJob(id), 4000); }
}
function fill(f) { for (const k of FIELDS) if (f[k] !== undefined) $(k).value = f[k]; }
$("start").onclick = async () => {
  showError("train-error", null);
  try { const job = await api("/api/train", {...form(), action: "start"}); stopping = false; drawCurve({loss: [], eval_loss: [], lr: []}); pollJob(job.id); }
  catch (e) { showError("train-error", e); }
};
$("stop").onclick = async () => {
  if (!lastJob) return;
  try { stopping = true; drawJob(await api(`/api/jobs/${lastJob.id}/stop`, {})); pollJob(lastJob.id); }
  catch (e) { showError("train-error", e); }
};
$("resume").onclick = async () => {
  if (!lastJob) return;
  showError("train-error", null);
  try { const job = await api(`/api/jobs/${lastJob.id}/resume`, {}); pollJob(job.id); }
  catch (e) { showError("train-error", e); }
};
$("plan").onclick = async () => {
  showError("train-error", null);
  const out = $("plan-out"); out.hidden = false; out.textContent = t("train.planning");
  try {
    let job = await api("/api/train", {...form(), action: "plan"});
    while (job.status === "running") { await new Promise((r) => setTimeout(r, 1000)); job = await api("/api/jobs/" + job.id); }
    out.textContent = job.log.join("\n");
    const fit = job.log.find((l) => l.startsWith("fits in "));
    $("plan-fit").hidden = !fit; $("plan-fit").textContent = fit ? `${t("plan.fits")}: ${fit}` : "";
    if (job.status !== "finished") showError("train-error", new Error(job.errors.join("\n") || job.stderr || job.status));
  } catch (e) { out.hidden = true; showError("train-error", e); }
};
function drawCurve(m) {
  const svg = $("curve"); const W = 720, H = 260, L = 48, R = 56, TOP = 12, B = 28;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; svg.append(e); return e; };
  const losses = [...m.loss, ...m.eval_loss];
  svg.dataset.points = String(m.loss.length + m.eval_loss.length);
  if (!losses.length) { add("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#8a93a3", "font-size": 14}, t("curve.empty")); return; }
  const steps = [...losses, ...m.lr].map((p) => p[0]);
  const x0 = 0, x1 = Math.max(...steps, 1);
  let y0 = Math.min(...losses.map((p) => p[1])), y1 = Math.max(...losses.map((p) => p[1]));
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const lrMax = Math.max(...m.lr.map((p) => p[1]), 1e-12);
  const X = (s) => L + (W - L - R) * (s - x0) / (x1 - x0);
  const Y = (v) => TOP + (H - TOP - B) * (1 - (v - y0) / (y1 - y0));
  const YL = (v) => TOP + (H - TOP - B) * (1 - v / lrMax);
  add("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#c5cbd6"});
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    add("line", {x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#eef0f4"});
    add("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#5d6675"}, v.toFixed(2));
  }
  add("text", {x: W - R + 6, y: TOP + 10, "font-size": 11, fill: "#2e9d55"}, lrMax.toExponential(1));
  add("text", {x: X(x1), y: H - 8, "text-anchor": "end", "font-size": 11, fill: "#5d6675"}, `step ${x1}`);
  add("text", {x: L, y: H - 8, "font-size": 11, fill: "#5d6675"}, "0");
  const series = [[m.lr, YL, "#2e9d55", "lr"], [m.loss, Y, "#2f5bd3", "loss"], [m.eval_loss, Y, "#e0731a", "eval"]];
  for (const [pts, y, color, cls] of series) {
    if (!pts.length) continue;
    add("polyline", {points: pts.map((p) => `${X(p[0])},${y(p[1])}`).join(" "), fill: "none", stroke: color,
                     "stroke-width": cls === "lr" ? 1.5 : 2, "stroke-dasharray": cls === "lr" ? "5 4" : "none",
                     "vector-effect": "non-scaling-stroke"});
    for (const p of pts) add("circle", {cx: X(p[0]), cy: y(p[1]), r: cls === "lr" ? 2 : 3, fill: color, class: "pt " + cls}).append(
      Object.assign(document.createElementNS(ns, "title"), {textContent: `step ${p[0]}: ${p[1].toPrecision(4)}`}));
  }
}
async function attachTrain() {
  try {
    const {jobs} = await api("/api/jobs?kind=train&limit=1");
    if (jobs.length) {
      const job = jobs[0];
      const f = argvForm(job.argv); fill(f); preview();
      pollJob(job.id);
    }
  } catch (e) { showError("train-error", e); }
}
function argvForm(argv) {
  const f = {}; const names = {"--config": "preset", "--model": "model", "--data": "data", "--output": "output"};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (names[a]) f[names[a]] = names[a] === "preset" ? argv[i + 1].split("/").pop() : argv[i + 1];
    else if (a.startsWith("--") && FIELDS.includes(a.slice(2).replaceAll("-", "_"))) f[a.slice(2).replaceAll("-", "_")] = argv[i + 1];
  }
  return f;
}

