"""`--help` a person can scan: flags in named groups, and `peftko --help` without the heavy imports."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from peftko.run.records import RunIdentity
from peftko.run.resume import identity_changes
from peftko.cli import RUN, main
from peftko.core.config import GROUPS, OUTPUT, TrainConfig, load_config, report_targets
from peftko.core.errors import UserError


# lora-train needs a base and a corpus named (run_lora_train is patched out where these are used).
REQUIRED_FLAGS = ("--model", "builtin:tiny-llama", "--data", "builtin:sample")


def test_every_config_field_names_one_of_the_help_groups():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") not in GROUPS]
    assert not missing, f"give these TrainConfig fields a group=... in config.py: {missing}"


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_lora_train_help_shows_the_groups_in_order_with_their_flags():
    text = _help("lora-train")
    titles = (RUN, *GROUPS)
    positions = [text.index(f"─ {title} ─") for title in titles]  # the panel headings
    assert positions == sorted(positions)
    # Each flag sits in its field's group: after its group's title and before the next one.
    starts, ends = dict(zip(titles, positions)), dict(zip(titles, positions[1:] + [len(text)]))
    for f in dataclasses.fields(TrainConfig):
        flag, group = "--" + f.name.replace("_", "-"), f.metadata["group"]
        at = text.find(flag + " ", starts[group])  # --lr FLOAT, --trust-remote-code / --no-...
        assert starts[group] < at < ends[group], f"{flag} is not listed under {group}"
    assert text.index("--config") < positions[1]  # how to run comes first


def test_help_for_each_command_renders():
    for command in ((), ("merge",), ("markers",), ("report",), ("bench",)):
        assert "Usage:" in _help(*command)
    assert "report" in _help()


def test_cli_module_does_not_import_the_heavy_libraries():
    """`peftko --help` stays instant: torch, transformers and matplotlib load inside the commands."""
    code = ("import sys, peftko.cli; "
            "print([m for m in ('torch', 'transformers', 'matplotlib', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- --report-to
def test_report_to_accepts_repeated_flags_set_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # both "installed"
    assert report_targets(load_config(None, {}).report_to) == []
    cfg = load_config(None, {"report_to": ["tensorboard", "wandb"]})
    assert report_targets(cfg.report_to) == ["tensorboard", "wandb"]
    assert report_targets(load_config(None, sets=["report_to=tensorboard,wandb"]).report_to) == [
        "tensorboard", "wandb"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("report_to: tensorboard\n")
    assert report_targets(load_config(yaml_file).report_to) == ["tensorboard"]


def test_report_to_flag_is_repeatable_on_the_command_line(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("peftko.commands.lora_train.run_lora_train",
                        lambda cfg, **kw: seen.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(main, ["lora-train", "--report-to", "tensorboard", "--report-to", "none",
                                       *REQUIRED_FLAGS, "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert report_targets(seen["cfg"].report_to) == ["tensorboard"]


@pytest.mark.parametrize("argv, expected", [
    (["--markers", "|A|>", "--markers", "|B|>"], ["|A|>", "|B|>"]),  # every repeat counts
    (["--markers", "|A|>,|B|>"], ["|A|>", "|B|>"]),
    (["--markers", "auto"], "auto"),
])
def test_markers_flag_accumulates_its_repeats(tmp_path, monkeypatch, argv, expected):
    seen = {}
    monkeypatch.setattr("peftko.commands.lora_train.run_lora_train", lambda cfg, **kw: seen.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(main, ["lora-train", *argv, *REQUIRED_FLAGS, "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].markers == expected


def test_unknown_or_missing_integration_is_one_clear_error(monkeypatch):
    with pytest.raises(UserError, match=r"report_to: unknown value 'tensorbord'"):
        load_config(None, {"report_to": ["tensorbord"]})
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'peftko\[wandb\]'"):
        load_config(None, {"report_to": ["wandb"]})


def test_report_to_is_in_the_output_group():
    assert {f.name: f for f in dataclasses.fields(TrainConfig)}["report_to"].metadata["group"] == OUTPUT


def test_changing_report_to_does_not_block_resume():
    old = {"config": load_config(None, {}).to_dict(), "corpus": [], "tokenizer": "t",
           "base": {"config_sha256": "x", "weights": {}}}
    new = json.loads(json.dumps(old))
    new["config"]["report_to"] = ["tensorboard"]
    assert identity_changes(RunIdentity.from_json(old), RunIdentity.from_json(new)) == []
    del old["config"]["report_to"]  # a run.json written before the key existed
    assert identity_changes(RunIdentity.from_json(old), RunIdentity.from_json(new)) == []
