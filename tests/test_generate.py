"""`peftko generate`: stops at the book-end marker, prints markers verbatim, greedy repeats, refuses bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main
from peftko.run.identity import sha256_file

END = "|END_OF_BOOK|>"
PROMPT = "|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n옛날 어느 마을에"


@pytest.fixture(scope="module")
def ends_at_once(tiny_bases, tmp_path_factory):
    """A real model whose greedy next token after PROMPT is the book-end marker (an added token).

    The marker's lm_head row is set to the final hidden state at PROMPT's last position, scaled so
    its logit is 1e4: the marker wins the first step, whatever the base.
    """
    path = tmp_path_factory.mktemp("ends") / "model"
    shutil.copytree(tiny_bases["llama-untied"], path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([END, "|START_OF_TITLE|>", "|END_OF_TITLE|>"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    seen = {}
    model.lm_head.register_forward_hook(lambda m, args, out: seen.update(h=args[0][0, -1].detach()))
    with torch.no_grad():
        model(**tok(PROMPT, return_tensors="pt"))
    h = seen["h"]
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids(END)] = h * (1e4 / float(h @ h))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def generate(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args), "--device", "cpu"])


def test_stops_at_the_book_end_marker_and_prints_it(ends_at_once):
    result = generate(ends_at_once, "--prompt", PROMPT, "--temperature", "0", "--json", "--max-new-tokens", "20")
    assert result.exit_code == 0, result.output
    sample = json.loads(result.stdout)
    assert sample["stop_reason"] == "marker"
    assert sample["new_tokens"] == 1
    assert sample["text"] == END  # an added, not special, token: skip_special_tokens keeps it
    streamed = generate(ends_at_once, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.rstrip("\n").endswith(PROMPT + END)
    assert "stop: marker" in streamed.stderr


def test_greedy_repeats_and_json_keys(tiny_run):
    args = (tiny_run, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "12", "--json",
            "--num-samples", "2")
    first, second = generate(*args), generate(*args)
    assert first.exit_code == 0, first.output
    samples = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(samples) == 2
    assert set(samples[0]) == {"prompt", "text", "new_tokens", "stop_reason", "tokens_per_s", "marker_fragments",
                               "fragments", "structure", "forced_closers", "pairs_closed", "book_ended",
                               "whole_markers"}
    assert samples[0]["structure"] == "strict"  # the run recorded its corpus's grammar
    assert samples[0]["marker_fragments"] == len(samples[0]["fragments"])
    assert samples[0]["prompt"] == PROMPT
    assert samples[0]["stop_reason"] in ("marker", "eos", "length")
    assert samples[0]["new_tokens"] <= 12
    assert samples[0]["text"] == samples[1]["text"]  # greedy: the same continuation each time
    assert [s["text"] for s in samples] == [json.loads(x)["text"] for x in second.stdout.splitlines()]


def test_sampling_repeats_with_the_seed(tiny_run):
    args = (tiny_run, "--prompt", PROMPT, "--temperature", "1.5", "--max-new-tokens", "12", "--json", "--seed", "7")
    texts = [json.loads(generate(*args).stdout)["text"] for _ in range(2)]
    assert texts[0] == texts[1]


def test_refusals(tmp_path, tiny_run):
    missing = generate(tmp_path / "nope", "--prompt", "x")
    assert missing.exit_code == 2 and "model not found" in missing.output
    empty = generate(tiny_run, "--prompt", "")
    assert empty.exit_code == 2 and "prompt is empty" in empty.output
    (tmp_path / "p.txt").write_text("", encoding="utf-8")
    empty_file = generate(tiny_run, "--prompt-file", tmp_path / "p.txt")
    assert empty_file.exit_code == 2 and "prompt is empty" in empty_file.output
    no_file = generate(tiny_run, "--prompt-file", tmp_path / "absent.txt")
    assert no_file.exit_code == 2 and "absent.txt" in no_file.output
    half = tmp_path / "half"
    shutil.copytree(tiny_run, half)
    (half / "peftko.json").unlink()
    incomplete = generate(half, "--prompt", "x")
    assert incomplete.exit_code == 2 and "incomplete" in incomplete.output


def test_merged_model_loads_with_its_markers_and_continues_like_the_adapter(tiny_run, tmp_path):
    from peftko.model.inference import load_for_inference

    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(merged), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    _, tok, info = load_for_inference(merged, device="cpu")
    manifest = json.loads((tiny_run / "peftko.json").read_text())
    assert info.kind == "model" and sorted(info.markers) == sorted(m["marker"] for m in manifest["markers"])
    assert info.doc_end_marker == END and tok.convert_tokens_to_ids(END) in info.stop_ids
    args = ("--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8", "--json")
    texts = [json.loads(generate(m, *args).stdout)["text"] for m in (tiny_run, merged)]
    assert texts[0] == texts[1]


# A process of its own each (some 6 s on 2 cores): Ctrl-C stays in the fast subset, SIGTERM is slow.
@pytest.mark.parametrize("signum, code", [(2, 130), pytest.param(15, 143, marks=pytest.mark.slow)])
def test_a_stop_mid_stream_is_one_line_and_130_or_143(tiny_run, signum, code):
    """Ctrl-C (or a scheduler's SIGTERM) while tokens stream: no traceback, no click 'Aborted!'."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftko", "generate", str(tiny_run), "--prompt", "달빛",
                             "--max-new-tokens", "100000", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        proc.stdout.read(1)  # the prompt is echoed as streaming starts: the model is loaded
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = err.decode("utf-8", "replace")
    assert proc.returncode == code, text
    assert "Traceback" not in text and "Aborted" not in text and "peftko: stopped by" in text


def test_new_tokens_stop_at_what_the_model_can_attend_to(tiny_run, tmp_path):
    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(merged)]).exit_code == 0
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    (merged / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}), encoding="utf-8")
    mark = json.loads((merged / "peftko-merge.json").read_text(encoding="utf-8"))
    mark["seal"]["config.json"] = sha256_file(merged / "config.json")  # sealed as if the merge wrote it so
    (merged / "peftko-merge.json").write_text(json.dumps(mark), encoding="utf-8")
    prompt_tokens = len(AutoTokenizer.from_pretrained(merged)(PROMPT)["input_ids"])
    result = generate(merged, "--prompt", PROMPT, "--max-new-tokens", "1000000000", "--json")
    assert result.exit_code == 0, result.output
    assert f"generating at most {48 - prompt_tokens}" in result.stderr
    assert json.loads(result.stdout)["new_tokens"] <= 48 - prompt_tokens
    too_long = generate(merged, "--prompt", PROMPT * 30, "--json")
    assert too_long.exit_code == 2 and "Shorten the prompt" in too_long.output


def test_a_model_with_its_cache_switched_off_still_generates_with_it(tiny_bases):
    """The Trainer sets config.use_cache = False; lora-train's samples come from that model. Each new
    token must then be one position through the model, not the whole prompt again."""
    from peftko.model.generation import GenerateOptions, sample
    from peftko.model.inference import ModelInfo, stop_ids

    tok = AutoTokenizer.from_pretrained(tiny_bases["llama-untied"])
    model = AutoModelForCausalLM.from_pretrained(tiny_bases["llama-untied"], dtype=torch.float32).eval()
    model.config.use_cache = model.generation_config.use_cache = False
    lengths = []
    model.model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                          with_kwargs=True)
    info = ModelInfo("model", tiny_bases["llama-untied"], tiny_bases["llama-untied"], "none", "cpu", "float32",
                     stop_ids=stop_ids(model, tok, None))
    s = sample(model, tok, info, PROMPT, GenerateOptions(max_new_tokens=6, temperature=0))
    assert s.new_tokens >= 2 and lengths[0] > 1 and lengths[1:] == [1] * (s.new_tokens - 1), lengths


def test_json_says_whether_pairs_close_the_book_ends_and_markers_are_whole(ends_at_once):
    """--json carries the structure score's three checks for the prompt and its continuation together."""
    result = generate(ends_at_once, "--prompt", PROMPT, "--temperature", "0", "--json", "--max-new-tokens", "20")
    assert result.exit_code == 0, result.output
    sample = json.loads(result.stdout)
    assert (sample["pairs_closed"], sample["book_ended"], sample["whole_markers"]) == (True, True, True)
    # a title left open on a complete line of the prompt: one new token can never close it on that line
    opened = PROMPT + "\n|START_OF_TITLE|>둘째\n"
    result = generate(ends_at_once, "--prompt", opened, "--temperature", "0", "--json", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    sample = json.loads(result.stdout)
    assert sample["pairs_closed"] is False
    assert sample["whole_markers"] is (sample["marker_fragments"] == 0)
