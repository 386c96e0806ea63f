"""No accidental toy runs: lora-train and ablate take the base, the corpus and the output folder
from a flag, --set or a config file, never from the demo's defaults; and the marker pattern is
--marker-pattern on every command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def trained(monkeypatch):
    """run_lora_train replaced: what the command would have trained, and its options."""
    seen = {}

    def fake(cfg, **options):
        seen.update(cfg=cfg, **options)
        return 0

    monkeypatch.setattr("peftko.commands.lora_train.run_lora_train", fake)
    return seen


@pytest.mark.parametrize("args, missing", [
    ([], "--model, --data, --output"),
    (["--output", "o"], "--model, --data"),
    (["--model", "m", "--data", "d", "--dry-run"], "--output"),  # a dry run follows the same rule
    (["--set", "model=m", "--set", "output_dir=o"], "--data"),  # a peer's name counts too
])
def test_a_missing_base_corpus_or_output_is_one_line_naming_each(trained, args, missing):
    result = invoke("lora-train", *args)
    assert result.exit_code == 2 and not trained, result.output
    assert result.output == f"peftko: error: lora-train needs {missing} (or a --config that sets " \
                            f"{'it' if ',' not in missing else 'them'})\n"


def test_a_config_that_sets_them_is_enough_and_names_itself_when_it_does_not(trained, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("base_model: m\nlr: 1.0e-3\n", encoding="utf-8")
    result = invoke("lora-train", "--config", str(partial))
    assert result.exit_code == 2 and f"needs --data, --output (flags, --set or keys in {partial})" in result.output
    result = invoke("lora-train", "--config", str(partial), "--data", "d", "--set", "output=o")
    assert result.exit_code == 0, result.output
    assert (trained["cfg"].model, trained["cfg"].data, trained["cfg"].output) == ("m", ["d"], "o")


def test_the_demo_command_runs_as_before(trained):
    result = invoke("lora-train", "--config", str(DEMO), "--force")
    assert result.exit_code == 0, result.output
    assert trained["force"] is True
    assert dataclasses.asdict(trained["cfg"]) == dataclasses.asdict(load_config(DEMO))


def test_ablate_needs_a_base_and_a_corpus_too():
    result = invoke("ablate", "--output", "abl")
    assert result.exit_code == 2, result.output
    assert result.output == "peftko: error: ablate needs --model, --data (or a --config that sets them)\n"


@pytest.mark.parametrize("command", ["lora-train", "ablate"])
def test_help_says_which_settings_are_required(command):
    helps = {p.name: p.help for p in main.commands[command].params}
    for key in ("model", "data", "output"):
        assert helps[key].endswith("[required: the flag, --set or --config]"), helps[key]


# --- one name for the marker pattern


@pytest.mark.parametrize("command", ["markers", "eval"])
def test_marker_pattern_is_the_shown_name_and_pattern_a_hidden_alias(command):
    text = CliRunner().invoke(main, [command, "-h"], terminal_width=200).output
    assert "--marker-pattern" in text and "--pattern" not in text


def test_markers_reads_both_names_alike():
    corpus = str(ROOT / "peftko" / "sample_corpus")
    runs = [invoke("markers", corpus, "--json", *flag) for flag in
            (["--marker-pattern", r"\|SOUND\|>"], ["--pattern", r"\|SOUND\|>"], [])]
    assert [r.exit_code for r in runs] == [0, 0, 0], [r.output for r in runs]
    assert runs[0].output == runs[1].output != runs[2].output
    both = invoke("markers", corpus, "--marker-pattern", "A", "--pattern", "B")
    assert both.exit_code == 2 and "earlier name of --marker-pattern" in both.output
