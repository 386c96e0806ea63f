"""`--help` that reads well at 80 and 100 columns: no flag name, metavar or choice broken across
lines, and every option says what it does.

The tokens to keep whole come from the click parameters themselves, so a new option or command
(`bench` included) is checked without touching this file.
"""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from peftko.cli import main

WIDE = 250  # wide enough that rich never wraps a token: the reference rendering
BOX = re.compile("[\u2500-\u257f]")  # the panels' box-drawing characters


def _commands() -> list[tuple[str, ...]]:
    return [(), *((name,) for name in sorted(main.commands))]


def _render(path: tuple[str, ...], width: int) -> str:
    result = CliRunner().invoke(main, [*path, "-h"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def _command(path: tuple[str, ...]) -> click.Command:
    return main.commands[path[0]] if path else main


def _tokens(command: click.Command) -> dict[str, list[str]]:
    """Per shown parameter: its option names, its metavar (as click writes it and without the
    brackets) and its choices; every one must be printed whole."""
    ctx = click.Context(command, info_name="peftko")
    tokens = {}
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        if isinstance(param, click.Argument):  # shown in the usage line, upper case
            tokens[param.name] = [param.human_readable_name]
            continue
        words = [*param.opts, *param.secondary_opts]
        if isinstance(param, click.Option) and not param.is_flag:
            metavar = param.make_metavar(ctx)
            words += [metavar, metavar.strip("[]")]
        words += [str(c) for c in getattr(param.type, "choices", ())]
        tokens[param.name] = words
    return tokens


def _count(token: str, text: str) -> int:
    """Whole occurrences on one line: not part of a longer flag or word."""
    return len(re.findall(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text))


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "peftko")
@pytest.mark.parametrize("width", [80, 100])
def test_help_never_breaks_a_flag_a_metavar_or_a_choice(path, width):
    wide, narrow = (BOX.sub(" ", _render(path, w)) for w in (WIDE, width))
    lines = narrow.splitlines()
    assert max(map(len, lines)) <= width, "the width did not take effect"
    if width == 100 and path:
        assert max(map(len, lines)) > 80, "rendered narrower than asked: the check would prove nothing"
    broken = []
    for name, words in _tokens(_command(path)).items():
        assert any(_count(w, wide) for w in words), f"{name}: none of {words} is shown in the help"
        broken += [f"{name}: {w!r}" for w in words if _count(w, narrow) != _count(w, wide)]
    assert not broken, f"broken across lines at {width} columns:\n" + "\n".join(broken) + "\n" + narrow


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "peftko")
def test_every_shown_option_says_what_it_does(path):
    command = _command(path)
    silent = [p.name for p in command.params
              if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not silent, f"give these options of {' '.join(path) or 'peftko'} a help text: {silent}"


PANEL_TITLE = re.compile(r"[╭]─ (.+?) ─")
HANGUL = re.compile("[\uac00-\ud7a3]")


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "peftko")
def test_every_command_speaks_the_same_help_language(path):
    """One spelling of an integer (INT, never click's INTEGER or INTEGER RANGE), panel titles as
    lora-train's (Korean first, English in brackets), and --dtype beside its choices at 80 columns."""
    text = _render(path, 80)
    assert "INTEGER" not in text, text
    titles = PANEL_TITLE.findall(text)
    assert titles, text
    odd = [t for t in titles if t != "LoRA" and not (HANGUL.search(t.split(" (")[0]) and t.endswith(")"))]
    assert not odd, f"panel titles not as lora-train's: {odd}"
    dtype = [line for line in text.splitlines() if "--dtype" in line]
    assert all(re.search(r"--dtype (auto\|)?[a-z0-9|]*float", line) for line in dtype), dtype


def test_ablate_lists_its_own_options_first():
    text = _render(("ablate",), 80)
    first_group = text.index("─ 데이터 (data) ─")
    for flag in ("--config", "--set", "--force", "--samples", "--sample-tokens", "--json"):
        assert text.index(f"{flag} ") < first_group, flag
