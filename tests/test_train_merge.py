"""lora-train then merge, end to end, for every architecture family x quantization.

Each combination trains once (module-scoped fixture) and the tests below read what it wrote:
the tokenizer, the adapter file, peftko.json, metrics.jsonl and the merged model.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main
from tests.conftest import BASES, train_args

QUANTS = ["4bit", "8bit", "none"]
COMBOS = [(b, q) for b in BASES for q in QUANTS]
# 8bit trains and merges as 4bit does (its loading path is also in tests/test_eval_side_effects.py): slow only.
PARAMS = [pytest.param(c, id="-".join(c), marks=[pytest.mark.slow] if c[1] == "8bit" else []) for c in COMBOS]
SAMPLE = '|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n|START_OF_DIALOGUE|>"안녕!"|END_OF_DIALOGUE|> |SOUND|>똑똑'


@pytest.fixture(scope="module", params=PARAMS)
def run(request, tiny_bases, small_corpus, tmp_path_factory):
    base_name, quant = request.param
    base = tiny_bases[base_name]
    out = tmp_path_factory.mktemp(f"{base_name}-{quant}")
    runner = CliRunner()
    trained = runner.invoke(main, train_args(base, small_corpus, out / "run", "--quant", quant))
    assert trained.exit_code == 0, trained.output + repr(trained.exception)
    merged = runner.invoke(main, ["merge", str(out / "run"), "--output", str(out / "merged"), "--dtype", "float32"])
    assert merged.exit_code == 0, merged.output + repr(merged.exception)
    return {"base": base, "run": out / "run", "merged": out / "merged", "output": trained.output,
            "merge_output": merged.output, "quant": quant, "name": base_name}


def manifest(run):
    return json.loads((run["run"] / "peftko.json").read_text())


def test_markers_are_single_tokens_and_round_trip(run):
    for where in ("run", "merged"):
        tok = AutoTokenizer.from_pretrained(run[where])
        for m in manifest(run)["markers"]:
            assert tok(m["marker"], add_special_tokens=False)["input_ids"] == [m["id"]]
        ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == SAMPLE
    assert "markers registered" in run["output"]


def test_manifest_records_what_merge_needs(run):
    m = manifest(run)
    assert m["base_model"] == str(run["base"].resolve())
    assert m["quantization"] == run["quant"]
    names = {x["marker"] for x in m["markers"]}
    assert {"|START_OF_BOOK|>", "|END_OF_BOOK|>", "|SOUND|>"} <= names
    assert all(x["pieces_before"] > 1 for x in m["markers"])
    v = m["vocab"]
    assert v["tokenizer_after"] == v["tokenizer_before"] + len(names)
    if run["name"] == "qwen2-padded":  # spare rows are used, the matrix never shrinks or grows
        assert v["rows_after"] == v["rows_before"] > v["tokenizer_after"]
    else:
        assert v["rows_after"] == v["tokenizer_after"] > v["rows_before"]
    assert m["config"]["lora_r"] == 4 and "weights" in m["base_fingerprint"]


def test_adapter_holds_lora_and_marker_rows_only(run):
    rows = manifest(run)["vocab"]["rows_after"]
    # the markers' rows and their syntax pieces' (|, _, |>: token_rows.piece_rows)
    n_markers = len(manifest(run)["markers"]) + len(manifest(run)["marker_piece_rows"])
    with safe_open(run["run"] / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes
    for key, shape in shapes.items():
        assert rows not in shape, f"{key} {shape} is a full embedding matrix"
        assert "lora_" in key or "trainable_tokens" in key, key
    token_keys = [k for k in shapes if "trainable_tokens" in k]
    expected = 1 if manifest(run)["tied_embeddings"] else 2
    assert len(token_keys) == expected
    assert all(shapes[k][0] == n_markers for k in token_keys)


def test_only_marker_rows_and_lora_targets_change(run):
    """In the merged model: every non-LoRA parameter equals the base, and so does every
    embedding row except the markers' and their syntax pieces'; the marker rows moved away from
    their initialisation."""
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(run["merged"], dtype=torch.float32)
    m = manifest(run)
    ids = [x["id"] for x in m["markers"]]
    rows = m["vocab"]["rows_before"]
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    emb_names = {n for n, p in merged.named_parameters() if p.shape[0] == m["vocab"]["rows_after"]}
    lora_targets = {k for k in merged_sd if k.endswith(".weight") and merged_sd[k].dim() == 2} - emb_names
    changed_targets = 0
    for name, value in merged_sd.items():
        if name in emb_names:
            trained = set(ids) | set(m["marker_piece_rows"])
            keep = [i for i in range(rows) if i not in trained]
            assert torch.equal(value[keep], base_sd[name][keep]), name
            init = torch.stack([base_sd[name][x["init_ids"]].mean(0) for x in m["markers"]])
            assert not torch.allclose(value[ids], init, atol=1e-4), f"{name}: marker rows did not train"
        elif name in lora_targets:
            changed_targets += not torch.equal(value, base_sd[name])
        else:
            assert torch.equal(value, base_sd[name]), f"{name} changed but is not trainable"
    assert changed_targets == len(lora_targets)


def test_merged_model_matches_adapter_on_base(run):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(run["merged"])
    merged = AutoModelForCausalLM.from_pretrained(run["merged"], dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    base.resize_token_embeddings(manifest(run)["vocab"]["rows_after"], mean_resizing=False)
    peft_model = PeftModel.from_pretrained(base, run["run"]).eval()
    batch = tok(SAMPLE, return_tensors="pt")
    with torch.no_grad():
        a, b = peft_model(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert "self-check" in run["merge_output"]


def test_loss_falls(run):
    logs = [json.loads(line) for line in (run["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logs if "loss" in x]
    assert len(losses) == 6
    assert all({"step", "lr", "tokens_seen"} <= set(x) for x in logs if "loss" in x)
    assert min(losses[-2:]) < losses[0]
    bpc = [x for x in logs if "bpc_after" in x]
    assert bpc and bpc[0]["bpc_after"] < bpc[0]["bpc_before"]
    assert 0 < bpc[0]["bpc_base"] < 20  # the untouched base, measured with its own tokenizer


def test_merged_generation_stops_at_the_book_end_marker(run):
    from transformers import GenerationConfig

    end_id = next(m["id"] for m in manifest(run)["markers"] if m["marker"] == "|END_OF_BOOK|>")
    eos = GenerationConfig.from_pretrained(run["merged"]).eos_token_id
    assert end_id in eos and AutoTokenizer.from_pretrained(run["merged"]).eos_token_id in eos


def test_outputs_follow_the_users_umask(tiny_bases, small_corpus, tmp_path):
    """Other users and services (a model server) must be able to read what peftko writes."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        runner = CliRunner()
        args = train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "run", "--max-steps", "1",
                          "--quant", "none")
        assert runner.invoke(main, args).exit_code == 0
        merged = runner.invoke(main, ["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")])
        assert merged.exit_code == 0, merged.output
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "merged") == 0o755
    for folder in (tmp_path / "run", tmp_path / "merged"):
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith("."):
                assert mode(f) == 0o644, f


def first_json(output: str) -> dict:
    """The first JSON object in a command's output (CliRunner mixes in the loading bars on stderr)."""
    return json.JSONDecoder().raw_decode(output[output.index('{"'):])[0]


def test_eval_and_generate_read_the_run_and_the_merged_model(run, small_corpus):
    """peftko eval and generate on every tiny family, from the adapter folder and the merged one."""
    if run["quant"] == "8bit":
        pytest.skip("4bit and none cover the loading paths; 8bit adds only time")
    runner, texts = CliRunner(), {}
    for where in ("run", "merged"):
        ev = runner.invoke(main, ["eval", str(run[where]), "--data", str(small_corpus), "--seq-len", "64",
                                  "--device", "cpu", "--json"])
        assert ev.exit_code == 0, ev.output
        report = first_json(ev.output)
        assert 0 < report["bits_per_char"] < 20 and report["documents"] >= 4
        assert "|SOUND|>" in report["markers"] and report["markers"]["|SOUND|>"]["count"] > 0
        gen = runner.invoke(main, ["generate", str(run[where]), "--prompt", "|START_OF_TITLE|>달빛",
                                   "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", "--json"])
        assert gen.exit_code == 0, gen.output
        texts[where] = first_json(gen.output)["new_tokens"]
    assert texts["run"] >= 1 and texts["merged"] >= 1
