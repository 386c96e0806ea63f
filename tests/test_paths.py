"""peftko.core.paths.shown: paths in messages read the same on every machine (the README quotes them)."""

from __future__ import annotations

from pathlib import Path

from peftko.core.paths import shown


def test_a_path_under_home_is_shown_from_tilde_and_others_as_they_are(monkeypatch, tmp_path):
    home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(home))
    assert shown(home / ".cache/peftko/bases/gemma-3-270m") == "~/.cache/peftko/bases/gemma-3-270m"
    assert shown(home) == "~"
    assert shown(tmp_path / "user2" / "x") == str(tmp_path / "user2" / "x")  # a sibling sharing the prefix
    assert shown(Path("runs/demo")) == "runs/demo"
