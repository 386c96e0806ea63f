"""The frame every command runs in: UserError and stops as one line and an exit code, the renderer
that prints the engine's events (`--progress`), and how `--help` is laid out. Kept apart from
peftko.cli so that file stays the list of commands and their options."""

from __future__ import annotations

import functools

import rich_click as click

from peftko.commands.render import MODES as PROGRESS_MODES, Renderer
from peftko.core import progress
from peftko.core.errors import Interrupted, UserError
from peftko.core.signals import Stopper

RUN = "실행 (run)"
OPTIONS = "옵션 (options)"
class Group(click.RichGroup):
    """Turns UserError into one line on stderr and exit code 2 (or 3), and a stop by Ctrl-C or
    SIGTERM into one line and 130 or 143 (peftko.core.signals): never a traceback."""

    def invoke(self, ctx):
        # The engine reports through events; this renderer prints them (a command's --progress
        # switches it to JSON lines before the command runs).
        renderer = ctx.meta[RENDERER] = Renderer()
        with progress.reporting(renderer):
            try:
                # lora-train and merge install their own, by phase; every other command (eval, generate,
                # report, ...) writes nothing half-done, so a stop there is one line and 130/143 too.
                with Stopper("before the command finished.").installed():
                    return super().invoke(ctx)
            except UserError as e:
                progress.emit(progress.Message(f"peftko: error: {e}", "error", err=True))
                ctx.exit(e.exit_code)
            except Interrupted as e:
                progress.emit(progress.Message(f"peftko: {e}", "error", err=True))
                ctx.exit(e.exit_code)


RENDERER = "peftko.renderer"


def progress_option(func=None, panel: str | None = None):
    """--progress on every command: how the engine's events are shown."""
    if func is None:
        return functools.partial(progress_option, panel=panel)
    extra = {"panel": panel} if panel else {}
    return click.option("--progress", **extra, type=click.Choice(PROGRESS_MODES), default="text", show_default=True,
                        expose_value=False, is_eager=True, callback=set_progress,
                        help="text: lines (and bars on a terminal); json: every event as one JSON object a line on "
                             "stdout (docs/en/progress.md).")(func)


def set_progress(ctx, param, value) -> None:
    renderer = ctx.meta.get(RENDERER)
    if renderer is not None:
        renderer.mode = value


# How --help lays out an option, so that no flag name, metavar or choice is ever split across
# lines (tests/test_help_layout.py). rich shrinks the widest columns of a table together when it
# is too wide, folding inside words: so a flag and its metavar share one column (they wrap at the
# space between them, never inside), and the slash of --x/--no-x gets spaces to wrap at.
HELP_LAYOUT = {
    "options_table_column_types": ["required", "opt_long_metavar", "opt_short", "help"],
    "delimiter_slash": " / ",
    "append_metavars_help_string": "{}",  # --dtype auto|float32|..., --lora-r INT
    # The metavar column showed an IntRange's bounds; with it gone they follow the help.
    "options_table_help_sections": ["help", "deprecated", "envvar", "default", "range", "required"],
    # Every panel titled as lora-train's are, Korean first (RUN, config.GROUPS).
    "options_panel_title": OPTIONS,
    "commands_panel_title": "명령 (commands)",
    "arguments_panel_title": "인자 (arguments)",
}
