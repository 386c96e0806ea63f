"""README.md model cards for the adapter folder and the merged model, Korean first, then English.

peft's save_pretrained writes a template full of "[More Information Needed]"; these cards replace it
with what peftko.json records (base and fingerprint, markers and ids, held-out bits per character)
and the code that loads the result with and without peftko. Built from the manifest alone, so the
same text comes out wherever the folder has moved. The only absolute path in a card is the base's,
as training recorded it: loading the adapter needs it.
"""

from __future__ import annotations

from peftko.run.records import CorpusPart, CorpusRecord, MergeRecord, RunRecord

# Front matter for the Hugging Face Hub. No `base_model`: the recorded base is a local folder,
# which the Hub rejects there.
FRONT_MATTER = ("---\nlanguage:\n- ko\n{license}library_name: {library}\npipeline_tag: text-generation\ntags:\n- peftko\n"
               "{tags}---\n")


def _front(record: RunRecord, library: str, tags: str) -> str:
    terms = record.base_terms or []
    license = "license: gemma\n" if any(t.upper().startswith("GEMMA") for t in terms) else ""
    return FRONT_MATTER.format(license=license, library=library, tags=tags)


def _terms(record: RunRecord, language: str, merged: bool) -> list[str]:
    """The base's licence files, named: the weights here are (derived from) the base's, under its terms."""
    terms = record.base_terms or []
    if not terms:
        return []
    names = ", ".join(f"`{t}`" for t in terms)
    where = ("이 폴더에 함께 있는" if merged else "기반 모델 폴더의") if language == "ko" else \
        ("copied into this folder" if merged else "in the base's folder")
    line = (f"기반 모델의 이용 조건이 이 모델에도 적용됩니다: {where} {names}." if language == "ko" else
            f"The base model's terms apply to this model too: {names}, {where}.")
    return [line, ""]


def adapter_card(record: RunRecord, folder: str) -> str:
    """The card of a `peftko lora-train` output; `folder` is its name, as the commands use it."""
    facts = _facts(record)
    plain = _plain_adapter_code(record, folder)
    return "\n".join([
        _front(record, "peft", "- lora\n"),
        f"# {folder}: LoRA 어댑터 / LoRA adapter (peftko)",
        "",
        "## 한국어",
        "",
        f"`{record.base_model}` 위에 `peftko lora-train`으로 학습한 LoRA 어댑터입니다. 마커마다 토큰 하나가 "
        "추가되었고, 그 임베딩 행도 이 폴더에 들어 있습니다.",
        "",
        *_terms(record, "ko", merged=False),
        *_with_peftko(_facts_ko(facts), "### peftko로 불러오기", folder, facts,
                      f"peftko merge {folder} --output {folder}-merged   # 독립 실행 모델로 병합"),
        "### peftko 없이 불러오기 (transformers + peft)",
        "",
        f"기반 모델의 임베딩을 학습 때와 같은 {facts['rows']}행으로 늘린 뒤 어댑터를 얹고, 토크나이저는 이 폴더에서 "
        f"읽습니다. 생성은 `{facts['stop']}`에서 멈추게 하십시오.",
        "",
        plain,
        "",
        "vLLM은 이 어댑터를 직접 서빙하지 못합니다 (LoRA 로더가 peft의 `trainable_tokens_delta`를 거부함): "
        "`peftko merge`로 병합한 모델을 서빙하십시오.",
        "",
        "## English",
        "",
        f"A LoRA adapter trained with `peftko lora-train` on `{record.base_model}`. Each marker was "
        "added as one token; its embedding rows are in this folder too.",
        "",
        *_terms(record, "en", merged=False),
        *_with_peftko(_facts_en(facts), "### Loading with peftko", folder, facts,
                      f"peftko merge {folder} --output {folder}-merged   # a standalone model"),
        "### Loading without peftko (transformers + peft)",
        "",
        f"Grow the base's embeddings to the {facts['rows']} rows training used, apply the adapter, and load "
        f"the tokenizer from this folder. Stop generation at `{facts['stop']}`.",
        "",
        plain,
        "",
        "vLLM cannot serve this adapter directly (its LoRA loader rejects peft's `trainable_tokens_delta`): "
        "serve the model `peftko merge` writes.",
        "",
    ])


def merged_card(record: RunRecord, mark: MergeRecord, folder: str) -> str:
    """The card of a `peftko merge` output: the adapter's manifest plus the merge record."""
    facts = _facts(record)
    plain = _plain_merged_code(facts, folder)
    dtype = mark.dtype
    return "\n".join([
        _front(record, "transformers", "- merged-lora\n"),
        f"# {folder}: 병합된 모델 / merged model (peftko)",
        "",
        "## 한국어",
        "",
        f"`peftko merge`가 LoRA 어댑터를 `{record.base_model}`에 {dtype}로 병합한 독립 실행 모델입니다. "
        "어댑터 없이 transformers, vLLM, llama.cpp 변환기 등에서 그대로 불러옵니다.",
        "",
        *_terms(record, "ko", merged=True),
        *_with_peftko(_facts_ko(facts), "### peftko로 불러오기", folder, facts),
        "### peftko 없이 불러오기 (transformers)",
        "",
        f"`generation_config.json`의 eos에 `{facts['stop']}`가 이미 들어 있습니다. 다른 서버에서는 이 마커를 "
        "stop 문자열로 넘기십시오.",
        "",
        plain,
        "",
        "## English",
        "",
        f"A standalone model: `peftko merge` merged a LoRA adapter into `{record.base_model}` in {dtype}. "
        "It loads without the adapter in transformers, vLLM, llama.cpp's converter and the like.",
        "",
        *_terms(record, "en", merged=True),
        *_with_peftko(_facts_en(facts), "### Loading with peftko", folder, facts),
        "### Loading without peftko (transformers)",
        "",
        f"`generation_config.json` already lists `{facts['stop']}` as an eos token; with another server, pass "
        "that marker as a stop string.",
        "",
        plain,
        "",
    ])


def _with_peftko(fact_lines: list[str], heading: str, folder: str, facts: dict, *more: str) -> list[str]:
    """The facts, then how to use the folder with peftko: generate, and MORE commands."""
    return [*fact_lines, "", heading, "", "```bash", f"peftko generate {folder} --prompt '{facts['prompt']}'",
            *more, "```", ""]


def _facts(record: RunRecord) -> dict:
    results = record.results
    markers = [(m.marker, m.id) for m in record.markers]
    names = record.marker_names
    stop = record.doc_end_marker or ""
    start = next((n for n in names if n.startswith("|START_OF_TITLE")), names[0] if names else "")
    sha = record.base_fingerprint.config_sha256
    return {
        "base": record.base_model, "sha": "?" if sha is None else sha,
        "markers": markers, "stop": stop, "prompt": start, "rows": record.vocab.rows_after,
        "quant": "?" if record.quantization is None else record.quantization, "steps": results.steps,
        "corpus": record.corpus or CorpusRecord(),
        "tokens": results.tokens_seen,  # what the steps processed, as the Trainer counted
        "bpc": [(k, getattr(results, k)) for k in ("bpc_base", "bpc_before", "bpc_after")],
        "kept": results.kept_step, "structure": results.structure,
        "worse": results.worse_after_training,
    }


def _scored(facts: dict, language: str) -> list[str]:
    """The step keep_best kept, and the structure score of `samples` (peftko.evaluate.structure), when recorded."""
    lines, s = [], facts["structure"]
    bpc = dict(facts["bpc"])
    if facts["worse"]:
        lines.append(f"- **주의: 학습 후 검증 문자당 비트({bpc['bpc_after']:.3f})가 마커 등록 후({bpc['bpc_before']:.3f})보다 "
                     "나쁩니다.** 이 어댑터는 학습하지 않은 모델보다 검증 문서를 못 예측합니다" if language == "ko" else
                     f"- **Warning: held-out bits per character after training ({bpc['bpc_after']:.3f}) are worse than "
                     f"with the markers registered ({bpc['bpc_before']:.3f}).** This adapter predicts the held-out "
                     "documents worse than no training")
    if facts["kept"] == 0:
        lines.append("- 남긴 어댑터: 마커만 등록한 상태, 학습 전 (학습한 어떤 단계도 검증에서 더 낫지 않음)" if language == "ko"
                     else "- Adapter kept: the markers as registered, before any step (no trained step did better "
                     "on the held-out documents)")
    elif facts["kept"]:
        lines.append(f"- 남긴 어댑터: {facts['kept']}단계 (검증 손실이 가장 낮음)" if language == "ko" else
                     f"- Adapter kept: step {facts['kept']} (the lowest held-out loss)")
    if isinstance(s, dict) and s.get("samples"):
        share = {k: f"{s.get(k, 0):.0%}" for k in ("balanced", "ends_with_marker", "whole_markers_only")}
        frag = f"{s.get('fragments_per_sample', 0):.1f}"
        lines.append(
            f"- 생성 구조 (떼어 둔 문서의 이어쓰기 {s['samples']}개): 짝을 닫음 {share['balanced']}, 책 끝 마커로 끝냄 "
            f"{share['ends_with_marker']}, 온전한 마커만 {share['whole_markers_only']} (샘플당 마커 조각 {frag})"
            if language == "ko" else
            f"- Structure of {s['samples']} sampled continuations of held-out documents: {share['balanced']} close "
            f"their pairs, {share['ends_with_marker']} end the book, {share['whole_markers_only']} write whole "
            f"markers only ({frag} marker fragments per sample)")
    strict = s.get("strict") if isinstance(s, dict) else None
    if isinstance(strict, dict) and strict.get("samples"):
        lines.append(f"- `--structure strict` (코퍼스 마커 문법을 지키는 생성): 세 조건을 모두 지킴 {strict.get('structure', 0):.0%}"
                     if language == "ko" else
                     f"- With `--structure strict` (the corpus's marker grammar kept): all three in "
                     f"{strict.get('structure', 0):.0%} of the samples")
    return lines


def _num(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if isinstance(x, float) else f"{x:,}")


BPC_KO = {"bpc_base": "기반 모델 (자체 토크나이저)", "bpc_before": "마커 등록 후, 학습 전", "bpc_after": "학습 후"}
BPC_EN = {"bpc_base": "base model (its own tokenizer)", "bpc_before": "markers registered, before training",
          "bpc_after": "after training"}
CORPUS_KEYS = ("documents", "characters", "tokens")  # shown when the manifest records them
BEFORE_TRAINING = {"ko": "학습 전", "en": "before training"}  # bpc_before of a run that registered no marker


def _bpc_label(language: str, key: str, facts: dict) -> str:
    if key == "bpc_before" and not facts["markers"]:
        return BEFORE_TRAINING[language]
    return {"ko": BPC_KO, "en": BPC_EN}[language][key]


COUNTS = {"ko": {"documents": "문서 {n}", "characters": "글자 {n}", "tokens": "토큰 {n}"},
          "en": {"documents": "{n} documents", "characters": "{n} characters", "tokens": "{n} tokens"}}
PARTS = {"ko": {"training": "학습", "held_out": "검증"}, "en": {"training": "training", "held_out": "held out"}}
HELD_OUT_SHOWN = 10


def _marker_list(facts: dict, word: str) -> list[str]:
    # A list, not a table: Markdown tables split cells at every "|", code spans included.
    return [f"- `{m}`: {word} {i}" for m, i in facts["markers"]]


def _corpus(corpus: CorpusRecord, language: str) -> str:
    """The whole corpus's counts, then the training and held-out parts' (as peftko.json records them)."""
    def counts(part: CorpusRecord | CorpusPart) -> str:
        return ", ".join(COUNTS[language][k].format(n=_num(getattr(part, k))) for k in CORPUS_KEYS
                         if getattr(part, k, None) is not None)

    parts = "; ".join(f"{label}: {counts(getattr(corpus, p))}" for p, label in PARTS[language].items()
                      if getattr(corpus, p) is not None)
    return counts(corpus) + (f" ({parts})" if parts else "")


def _held_out(corpus: CorpusRecord) -> str:
    names = (corpus.held_out.names if corpus.held_out else None) or []
    more = f" … (+{len(names) - HELD_OUT_SHOWN})" if len(names) > HELD_OUT_SHOWN else ""
    return ", ".join(f"`{n}`" for n in names[:HELD_OUT_SHOWN]) + more


def _facts_ko(facts: dict) -> list[str]:
    corpus, held_out = _corpus(facts["corpus"], "ko"), _held_out(facts["corpus"])
    return [
        f"- 기반 모델: `{facts['base']}` (config.json SHA-256 `{facts['sha']}`)",
        f"- 학습: {_num(facts['steps'])} 단계, 양자화 {facts['quant']}"
        + (f", 처리한 토큰 {_num(facts['tokens'])}개" if facts["tokens"] else ""),
        *([f"- 말뭉치: {corpus}"] if corpus else []),
        *([f"- 검증에 떼어 둔 문서: {held_out}"] if held_out else []),
        f"- 문서 끝 마커 (생성 중단): `{facts['stop']}`",
        *_scored(facts, "ko"),
        "",
        "검증 데이터의 문자당 비트 (낮을수록 좋음):",
        "",
        "| | bits/char |", "|---|---|",
        *(f"| {_bpc_label('ko', k, facts)} | {_num(v)} |" for k, v in facts["bpc"]),
        "",
        "마커 (각각 토큰 하나):",
        "",
        *_marker_list(facts, "토큰 id"),
    ]


def _facts_en(facts: dict) -> list[str]:
    corpus, held_out = _corpus(facts["corpus"], "en"), _held_out(facts["corpus"])
    return [
        f"- Base model: `{facts['base']}` (config.json SHA-256 `{facts['sha']}`)",
        f"- Training: {_num(facts['steps'])} steps, quantization {facts['quant']}"
        + (f", {_num(facts['tokens'])} tokens processed" if facts["tokens"] else ""),
        *([f"- Corpus: {corpus}"] if corpus else []),
        *([f"- Held-out documents: {held_out}"] if held_out else []),
        f"- Document-end marker (stops generation): `{facts['stop']}`",
        *_scored(facts, "en"),
        "",
        "Held-out bits per character (lower is better):",
        "",
        "| | bits/char |", "|---|---|",
        *(f"| {_bpc_label('en', k, facts)} | {_num(v)} |" for k, v in facts["bpc"]),
        "",
        "Markers (one token each):",
        "",
        *_marker_list(facts, "token id"),
    ]


def _plain_adapter_code(record: RunRecord, folder: str) -> str:
    stop, rows = record.doc_end_marker or "", record.vocab.rows_after
    return "\n".join([
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({record.base_model!r}, dtype=\"auto\")",
        f"model.resize_token_embeddings({rows}, mean_resizing=False)  # vocab.rows_after in peftko.json",
        f"model = PeftModel.from_pretrained(model, {folder!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})",
        *_generate_lines(stop, _prompt(record)),
        "```",
    ])


def _plain_merged_code(facts: dict, folder: str) -> str:
    return "\n".join([
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=\"auto\")",
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})",
        *_generate_lines(facts["stop"], facts["prompt"]),
        "```",
    ])


def _generate_lines(stop: str, prompt: str) -> list[str]:
    # stop_strings, not eos_token_id: it works the same for the adapter and the merged model.
    until = f", stop_strings=[{stop!r}], tokenizer=tokenizer" if stop else ""
    return [
        f"inputs = tokenizer({prompt!r}, return_tensors=\"pt\")",
        f"out = model.generate(**inputs, max_new_tokens=200{until})",
        "print(tokenizer.decode(out[0][inputs[\"input_ids\"].shape[1]:]))",
    ]


def _prompt(record: RunRecord) -> str:
    return _facts(record)["prompt"]
