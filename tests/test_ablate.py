"""`peftko ablate`: three variants trained alike; each variant's tokenizer and training data checked."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from peftko.cli import main
from tests.conftest import train_args

MARKER = re.compile(r"\|[A-Z][A-Z0-9_]*\|>")


@pytest.fixture(scope="module")
def ablation(tiny_bases, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "abl"
    args = train_args(tiny_bases["llama-tied"], small_corpus, out, "--max-steps", "2")
    # samples from the config (as lora-train reads it): ablate samples each variant, no variant samples itself
    result = CliRunner().invoke(main, ["ablate", *args[1:], "--set", "samples=1", "--sample-tokens", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"out": out, "base": tiny_bases["llama-tied"], "corpus": small_corpus, "output": result.stdout}


def manifest(out, variant):
    return json.loads((out / variant / "peftko.json").read_text())


def test_each_variant_tokenizer(ablation):
    out, base = ablation["out"], ablation["base"]
    base_vocab = len(AutoTokenizer.from_pretrained(base))
    registered = AutoTokenizer.from_pretrained(out / "registered")
    markers = manifest(out, "registered")["markers"]
    assert {"|START_OF_BOOK|>", "|END_OF_BOOK|>", "|SOUND|>"} <= {m["marker"] for m in markers}
    for m in markers:
        assert registered(m["marker"], add_special_tokens=False)["input_ids"] == [m["id"]]
    for variant in ("as-text", "deleted"):
        assert manifest(out, variant)["markers"] == []
        assert len(AutoTokenizer.from_pretrained(out / variant)) == base_vocab  # vocabulary unchanged
        assert manifest(out, variant)["vocab"]["rows_after"] == manifest(out, variant)["vocab"]["rows_before"]


def test_deleted_variant_trains_on_marker_free_text_and_the_same_split(ablation):
    from peftko.core.config import TrainConfig
    from peftko.corpus.scan import scan_corpus
    from peftko.data.packing import choose_val_docs, prepare_data
    from peftko.core.paths import peftko_home

    out = ablation["out"]
    cfg = TrainConfig(**manifest(out, "deleted")["config"])
    files = scan_corpus(cfg.data, cfg.marker_pattern, cfg.jsonl_field).files
    tok = AutoTokenizer.from_pretrained(out / "deleted")
    data = prepare_data(files, tok, cfg.blocks(), peftko_home() / "datasets")
    assert data.from_cache  # exactly the blocks the deleted run trained on
    trained = tok.decode([i for block in data.train["input_ids"] for i in block], skip_special_tokens=True)
    assert "|>" not in trained and not MARKER.search(trained)
    assert "의" in trained  # the story text is there
    # The same documents are held out: same count, same seed, so the same indices.
    report = json.loads((out / "ablation.json").read_text())
    registered_cfg = manifest(out, "registered")["config"]
    docs = [json.loads(line)["text"] for line in (out / "deleted-data" / "corpus.jsonl").open(encoding="utf-8")]
    assert sorted(choose_val_docs(len(docs), cfg.val_fraction, cfg.seed)) == report["held_out_documents"]
    assert registered_cfg["val_fraction"] == cfg.val_fraction and registered_cfg["seed"] == cfg.seed
    assert data.val_docs == len(report["held_out_documents"])


def test_same_settings_but_markers_and_data(ablation):
    out = ablation["out"]
    configs = {v: manifest(out, v)["config"] for v in ("registered", "as-text", "deleted")}
    differ = {"output", "markers", "data", "jsonl_field"}
    for v in ("as-text", "deleted"):
        assert {k: x for k, x in configs[v].items() if k not in differ} == \
               {k: x for k, x in configs["registered"].items() if k not in differ}
    assert configs["as-text"]["data"] == configs["registered"]["data"]
    assert all(manifest(out, v)["results"]["steps"] == 2 for v in configs)


def test_report_files_and_table(ablation):
    out = ablation["out"]
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["registered", "as-text", "deleted"]
    for r in rows.values():
        assert r["bpc_text"] > 0
    for v in ("registered", "as-text"):
        assert rows[v]["bpc"] > 0 and rows[v]["marker_top1"] is not None
        assert 0 <= rows[v]["structure"]["structure"] <= 1 and rows[v]["structure"]["samples"] >= 1
    assert rows["deleted"]["bpc"] is None and rows["deleted"]["structure"] is None
    # Both modes where the markers are tokens: strict's closers fit in any 4 tokens; as text there is nothing to keep
    assert rows["registered"]["structure"]["strict"]["structure"] == 1 and "strict" not in rows["as-text"]["structure"]
    assert rows["as-text"]["tokens_per_char"] > rows["registered"]["tokens_per_char"]
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "ablation.md").read_text()
    assert md.count("\n| ") == 3 and "| as-text |" in md and "--structure strict" in md
    assert "| deleted |" in ablation["output"]


def test_structure_check():
    from peftko.evaluate.structure import structure_ok

    markers = ["|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>"]
    pattern = r"\|[A-Z][A-Z0-9_]*\|>"
    end = "|END_OF_BOOK|>"
    assert structure_ok("|START_OF_BOOK|>\n|START_OF_TITLE|>a|END_OF_TITLE|>\nb|END_OF_BOOK|>", markers, end,
                        pattern) == (True, True)
    assert structure_ok("|START_OF_BOOK|>\n|START_OF_TITLE|>a\nb|END_OF_BOOK|>", markers, end, pattern) == (False, True)
    # Cut off by the token limit: judged on its complete lines, not ending counted once.
    assert structure_ok("|START_OF_BOOK|>\nxx\n|START_OF_TITLE|>a", markers, end, pattern) == (True, False)


def test_refuses_without_output_or_markers(tmp_path, tiny_bases):
    runner = CliRunner()
    no_output = runner.invoke(main, ["ablate", "--model", str(tiny_bases["llama-tied"])])
    assert no_output.exit_code == 2 and "--output" in no_output.output
    (tmp_path / "plain.txt").write_text("마커 없는 글.\n|END_OF_BOOK|>\n또 다른 글.\n", encoding="utf-8")
    args = train_args(tiny_bases["llama-tied"], tmp_path / "plain.txt", tmp_path / "out")
    plain = runner.invoke(main, ["ablate", *args[1:], "--markers", "auto", "--marker-pattern", r"\|SOUND\|>"])
    assert plain.exit_code == 2 and "no markers" in plain.output


def test_an_output_inside_the_corpus_is_refused_before_anything_is_written(tmp_path, tiny_bases, small_corpus):
    import shutil

    corpus = shutil.copytree(small_corpus, tmp_path / "corpus")
    before = sorted(p.name for p in corpus.rglob("*"))
    args = train_args(tiny_bases["llama-tied"], corpus, corpus / "ablate")
    result = CliRunner().invoke(main, ["ablate", *args[1:]])
    assert result.exit_code == 2 and "lies inside --data" in result.output, result.output
    assert sorted(p.name for p in corpus.rglob("*")) == before


@pytest.mark.parametrize("given, expected", [
    ((), (2, 256)),  # lora-train's default samples (0: none) would leave ablate without its score
    (("--set", "samples=3", "--set", "sample_tokens=9"), (3, 9)),  # the config's, as lora-train reads them
    (("--set", "samples=3", "--samples", "1", "--sample-tokens", "4"), (1, 4)),  # the flags win
])
def test_ablate_samples_as_the_flags_else_the_config_else_two(monkeypatch, tmp_path, given, expected):
    seen = {}
    monkeypatch.setattr("peftko.commands.ablate.run_ablate", lambda cfg, opts, **kw: seen.update(cfg=cfg, opts=opts))
    result = CliRunner().invoke(main, ["ablate", "--model", "m", "--data", "d", "--output", tmp_path / "a", *given])
    assert result.exit_code == 0, result.output
    assert (seen["opts"].samples, seen["opts"].max_new_tokens) == expected


def test_the_variants_leave_sampling_to_ablate(ablation):
    for variant in ("registered", "as-text", "deleted"):
        assert "structure" not in manifest(ablation["out"], variant)["results"], variant


class _SigintAtStep:
    """A real SIGINT to this process as a training step begins (the as-text variant's step 2),
    as a Ctrl-C would arrive."""

    def __init__(self, output_name: str, step: int, signum: int = 2):
        self.output_name, self.step, self.sent, self.signum = output_name, step, False, signum

    def __call__(self, real):
        import os
        import signal

        from transformers import TrainerCallback

        outer = self

        class Send(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if not outer.sent and state.global_step + 1 == outer.step and args.output_dir.endswith(
                        outer.output_name):
                    outer.sent = True
                    os.kill(os.getpid(), signal.Signals(outer.signum))

        def make_trainer(*a, **kw):
            trainer = real(*a, **kw)
            trainer.add_callback(Send())
            return trainer

        return make_trainer


@pytest.mark.slow  # four short trainings and two evaluations
@pytest.mark.parametrize("signum, code, rerun", [(2, 130, []), (15, 143, ["--resume"])],
                         ids=["SIGINT-plain", "SIGTERM-resume"])
def test_an_interrupted_ablate_exits_130_and_a_plain_rerun_continues_it(signum, code, rerun, tiny_bases, small_corpus,
                                                                         tmp_path, monkeypatch):
    import peftko.train.session

    out = tmp_path / "abl"
    args = ["ablate", *train_args(tiny_bases["llama-tied"], small_corpus, out, "--max-steps", "2",
                                  "--save-steps", "1")[1:], "--samples", "1", "--sample-tokens", "4"]
    monkeypatch.setattr(peftko.train.session, "make_trainer",
                        _SigintAtStep("as-text", 2, signum)(peftko.train.session.make_trainer))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    assert "lora-train --resume" not in r.output  # ablate says how to continue itself
    assert "while training the as-text variant" in r.output and "Run the same ablate command again" in r.output
    registered = (out / "registered" / "peftko.json").read_bytes()
    assert not (out / "as-text" / "peftko.json").exists() and not (out / "ablation.json").exists()

    r = CliRunner().invoke(main, [*args, *rerun])  # the same command (or with --resume), no --force
    assert r.exit_code == 0, r.output
    assert f"kept: {out / 'registered'}" in r.output and "resuming from" in r.output
    assert (out / "registered" / "peftko.json").read_bytes() == registered  # kept, not trained again
    assert json.loads((out / "as-text" / "peftko.json").read_text())["results"]["steps"] == 2
    assert (out / "ablation.json").exists()


def test_the_verdict_on_a_toy_base_says_it_is_about_the_toy(tiny_bases, tmp_path):
    import json as _json

    from peftko.commands.ablate import toy_base_note

    note = toy_base_note(tiny_bases["llama-untied"])
    assert "a toy initialised at random" in note and "not for a pretrained base" in note
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(_json.dumps({  # Gemma-3-270M's shape: no note
        "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144}))
    assert toy_base_note(real) == ""


def test_ablate_resume_and_force_together_are_refused_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["ablate", "--model", "builtin:tiny-llama", "--data", "builtin:sample",
                                  "--output", str(tmp_path / "abl"), "--resume", "--force"])
    assert r.exit_code == 2 and "--resume keeps what an interrupted ablate trained" in r.output, r.output
    assert not (tmp_path / "abl").exists()
