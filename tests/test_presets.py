"""The presets in configs/, each planned against its base's real config.json (tests/fixtures/configs,
configuration only: no weights, no tokenizer), and the refusals that protect each architecture."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.model.memory_plan import ALLOCATOR_SLACK, CARD_OVERHEAD_GIB, shape_from_config
from tests.conftest import train_args

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"

# preset -> (fixture folder, published parameter count in billions)
PRESETS = {
    "llama3-open-ko-8b-16gb": ("llama3-open-ko-8b", 8.03),
    "exaone-3.5-7.8b-16gb": ("exaone-3.5-7.8b", 7.8),
    "exaone-3.5-2.4b-12gb": ("exaone-3.5-2.4b", 2.4),
    "qwen2.5-7b-16gb": ("qwen2.5-7b", 7.6),
    "solar-10.7b-16gb": ("solar-10.7b", 10.7),
    "polyglot-ko-5.8b-12gb": ("polyglot-ko-5.8b", 5.8),
    "gemma-2-9b-24gb": ("gemma-2-9b", 9.2),
    "gemma-3-1b-12gb": ("gemma-3-1b", 1.0),
}


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def plan(preset: str, model: Path, corpus: Path, tmp_path: Path, *extra: str):
    return invoke("lora-train", "--config", str(ROOT / "configs" / f"{preset}.yaml"), "--model", str(model),
                  "--data", str(corpus), "--output", str(tmp_path / "out"), "--dry-run", *extra)


def gib(out: str, part: str) -> float:
    return float(re.search(rf"^  {part}\s+([\d.]+) GiB", out, re.M).group(1))


def refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for w in words:
        assert w in result.output, (w, result.output)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_plans_against_its_base(preset, small_corpus, tmp_path):
    fixture, billions = PRESETS[preset]
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    result = plan(preset, FIXTURES / fixture, small_corpus, tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "memory plan" in out
    params = float(re.search(r"([\d.]+) B parameters", out).group(1))
    assert params == pytest.approx(billions, rel=0.03)  # the shape is read right for this family
    assert f"vocab {config['vocab_size']:,} +" in out
    # The card the preset is named for holds training, loading and evaluation, with the allocator's
    # slack and the CUDA context, even without Liger (the verdict of the plan's own line).
    card = int(re.search(r"-(\d+)gb$", preset).group(1))
    need = max(gib(out, "peak"), gib(out, "loading"), gib(out, "evaluation")) * (1 + ALLOCATOR_SLACK)
    assert need + CARD_OVERHEAD_GIB <= card, out
    # A folder holding only config.json plans, but says what a real run would miss.
    assert "warning:" in out and "lacks model weights" in out and "lacks a tokenizer" in out
    assert not (tmp_path / "out").exists()


def test_presets_are_documented_and_cover_every_fixture():
    for preset in PRESETS:
        head = (ROOT / "configs" / f"{preset}.yaml").read_text(encoding="utf-8").split("\nmodel:")[0]
        for piece in ("--dry-run", "peftko merge", "GB card", "Why these settings"):
            assert piece in head, (preset, piece)
    assert {f for f, _ in PRESETS.values()} == {p.name for p in FIXTURES.iterdir() if p.is_dir()}


def test_shapes_the_families_differ_in():
    def shape(name):
        return shape_from_config(json.loads((FIXTURES / name / "config.json").read_text()))

    exaone24, exaone78 = shape("exaone-3.5-2.4b"), shape("exaone-3.5-7.8b")
    assert (exaone24.layers, exaone24.head_dim, exaone24.tied) == (30, 80, True)  # num_layers; no tie key
    assert (exaone78.layers, exaone78.tied) == (32, False)
    gemma = shape("gemma-2-9b")
    assert gemma.heads * gemma.head_dim == 4096 != gemma.hidden  # head_dim is read, not derived
    assert [n for n, _, _ in shape("polyglot-ko-5.8b").linears][0] == "query_key_value"


# --- refusals, before any slow work

@pytest.fixture()
def no_loading(monkeypatch):
    """Any attempt to load a tokenizer or a model fails the test."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_exaone_without_trust_remote_code_names_the_flag(small_corpus, tmp_path, no_loading):
    r = plan("exaone-3.5-2.4b-12gb", FIXTURES / "exaone-3.5-2.4b", small_corpus, tmp_path, "--no-trust-remote-code")
    refused(r, "'exaone'", "--trust-remote-code", "tie_word_embeddings")


def test_unknown_architecture_with_its_own_code_names_the_flag(small_corpus, tmp_path, no_loading):
    config = json.loads((FIXTURES / "llama3-open-ko-8b" / "config.json").read_text())
    config.update(model_type="koreanlm", auto_map={"AutoModelForCausalLM": "modeling_koreanlm.KoreanLM"})
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    r = invoke("lora-train", "--model", str(tmp_path / "base"), "--data", str(small_corpus),
               "--output", str(tmp_path / "out"), "--dry-run")
    refused(r, "'koreanlm'", "--trust-remote-code")
    # With the flag the dry run plans, and names the code file a real run would need.
    r = invoke("lora-train", "--model", str(tmp_path / "base"), "--data", str(small_corpus),
               "--output", str(tmp_path / "out"), "--dry-run", "--trust-remote-code")
    assert r.exit_code == 0, r.output
    assert "modeling_koreanlm.py" in r.output


def test_soft_capped_attention_refuses_sdpa(small_corpus, tmp_path, no_loading):
    r = plan("gemma-2-9b-24gb", FIXTURES / "gemma-2-9b", small_corpus, tmp_path, "--attn-implementation", "sdpa")
    refused(r, "sdpa", "soft-capping", "eager")
    # The refusal follows the soft-capping, not the family name: Gemma-3 does not cap.
    r = plan("gemma-3-1b-12gb", FIXTURES / "gemma-3-1b", small_corpus, tmp_path, "--attn-implementation", "sdpa")
    assert r.exit_code == 0, r.output


def test_seq_len_beyond_the_context_of_a_real_base(small_corpus, tmp_path, no_loading):
    r = plan("polyglot-ko-5.8b-12gb", FIXTURES / "polyglot-ko-5.8b", small_corpus, tmp_path, "--seq-len", "4096")
    refused(r, "--seq-len 4096", "2048")


def test_a_real_run_on_a_config_only_folder_refuses_before_loading(small_corpus, tmp_path, no_loading):
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "exaone-3.5-2.4b", base)
    out = tmp_path / "out"
    r = invoke(*train_args(base, small_corpus, out, "--trust-remote-code"))
    refused(r, "model weights", "tokenizer", "configuration_exaone.py", "modeling_exaone.py")
    assert not out.exists()


def test_a_tokenizer_error_is_reported_whole(tmp_path):
    from peftko.model.base import load_tokenizer
    from peftko.core.errors import UserError

    # No tokenizer file at all: transformers explains over several lines ("... from one of: (1) ...
    # (2) ..."), all of which must reach the user, not a sentence cut at its colon.
    (tmp_path / "config.json").write_text((FIXTURES / "solar-10.7b" / "config.json").read_text())
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)
    message = str(e.value)
    assert "\n" not in message and not message.rstrip().endswith(":"), message
    assert "(1)" in message, message


# --- seq_len auto

def test_default_seq_len_fits_the_base(tiny_bases, small_corpus, tmp_path):
    """No --seq-len: the built-in size of base (1024 positions) must not be refused for 2048."""
    args = train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "out", "--max-steps", "1")
    i = args.index("--seq-len")
    del args[i : i + 2]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "seq_len: 1024" in r.output
    assert json.loads((tmp_path / "out" / "peftko.json").read_text())["config"]["seq_len"] == 1024


def test_explicit_seq_len_is_kept(tiny_bases, small_corpus, tmp_path):
    r = invoke("lora-train", "--model", str(tiny_bases["llama-tied"]), "--data", str(small_corpus),
               "--output", str(tmp_path / "out"), "--dry-run", "--seq-len", "512")
    assert r.exit_code == 0, r.output
    assert "seq_len: " not in r.output.split("memory plan")[0] and " x 512 x " in r.output
