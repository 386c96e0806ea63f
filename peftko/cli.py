"""The command line: parse, then call one function per command (peftko.commands).

Each command's module is imported inside the command, the one place peftko imports lazily: torch,
transformers and matplotlib load only for a command that needs them, so `peftko --help` is
instant. Every TrainConfig field is also a `lora-train` flag, generated from the dataclass, so the
config file, the flags and `--help` can never drift apart; rich-click shows them in the groups that
the fields name (config.GROUPS), so the first screen answers "what do I need to set".
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing

import rich_click as click

from peftko.commands import arguments
from peftko.commands.frame import HELP_LAYOUT, OPTIONS, RUN, Group, progress_option
from peftko.core.aliases import flag_hint
from peftko.core.config import FIELDS, GROUPS, MODEL, REQUIRED, TrainConfig, load_config
from peftko.core.errors import UserError
from peftko.core.libraries import keep_libraries_offline_and_quiet
from peftko.merge.gguf import DEFAULT_TYPE, GgufOptions, TYPES as GGUF_TYPES

keep_libraries_offline_and_quiet()  # before any command imports torch, peft or bitsandbytes


CONFIG_HELP = ("YAML config; flags override it. Axolotl, LLaMA-Factory, TRL and Unsloth key names are read "
               "too (docs/en/coming-from-other-tools.md).")
SET_HELP = "Override any config key (other tools' names too); repeatable."



# The context setting, not the rich_config decorator, which imports rich: --help stays instant.
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "rich_help_config": HELP_LAYOUT})
@click.version_option(package_name="peftko")
def main():
    """peftko: LoRA fine-tuning for Korean text with structural markers.

    \b
    peftko lora-train --config configs/demo.yaml    # the demo: CPU, minutes
    peftko markers corpus/                           # lint a corpus
    peftko report runs/demo                          # runs/demo/report.png
    peftko merge runs/demo --output runs/demo-merged # standalone model
    peftko generate runs/demo --prompt '|START_OF_TITLE|>'
    peftko eval runs/demo --data corpus/             # bits per character
    peftko bench runs/demo --tasks kobest            # Korean benchmarks, beside the base
    peftko ablate --config configs/demo.yaml --output runs/ablate
    peftko cache --clear tokens                      # peftko's caches: list, clear
    """


class _ConfigCommand(click.RichCommand):
    """lora-train and ablate: a flag spelled as another tool spells it (--learning-rate,
    --num_train_epochs) gets one line naming peftko's (--lr), not click's usage box."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            hint = _peer_flag_hint(e.option_name)
            if hint is None:
                raise
            raise UserError(f"no such option {e.option_name}: {hint}") from None


def _peer_flag_hint(option: str) -> str | None:
    name = option.lstrip("-").replace("-", "_")
    if name in FIELDS:  # --grad_accum, as Hugging Face scripts write flags
        return "peftko spells it --" + name.replace("_", "-")
    return flag_hint(option)


def _config_options(func, skip: tuple[str, ...] = ()):
    """One click option per TrainConfig field (but `skip`, which the command declares itself); None
    means 'not given', so files are not overridden."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed([f for f in dataclasses.fields(TrainConfig) if f.name not in skip]):
        flag = "--" + f.name.replace("_", "-")
        common = {"help": f.metadata["help"] + f"  [{_default_note(f)}]", "panel": f.metadata["group"]}
        if hints[f.name] is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, **common)
        elif f.metadata.get("multiple"):
            opt = click.option(flag, f.name, multiple=True, metavar=_metavar(f, hints[f.name]), **common)
        else:
            opt = click.option(flag, f.name, default=None, metavar=_metavar(f, hints[f.name]), **common)
        func = opt(func)
    # Panels are shown in the order they are declared: how to run first, then the config groups.
    for group in reversed((RUN, *GROUPS)):
        func = click.option_panel(group)(func)
    return func


MULTIPLE = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("multiple")]
# Repeated flags that read as one comma-separated value, as `--markers A,B` always has (`auto` too).
JOINED = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("joined")]


def _default_note(f: dataclasses.Field) -> str:
    if f.name in REQUIRED:  # config.load_config(required_by=...) checks them
        return "required: the flag, --set or --config"
    if f.default_factory is not dataclasses.MISSING:
        return "default: " + ",".join(f.default_factory())
    return f"default: {f.default}"


def _metavar(f: dataclasses.Field, tp) -> str:
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    if typing.get_origin(tp) is typing.Literal:
        return "[" + "|".join(typing.get_args(tp)) + "]"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "TEXT")


@main.command("lora-train", cls=_ConfigCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), panel=RUN,
              help=CONFIG_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", panel=RUN, help=SET_HELP)
@click.option("--dry-run", is_flag=True, panel=RUN, help="Check config and corpus, print the memory plan, train nothing.")
@click.option("--resume", is_flag=True, panel=RUN, help="Continue from the latest checkpoint in --output.")
@click.option("--force", is_flag=True, panel=RUN,
              help="Resume even if the config, corpus or base changed; replace an earlier run (only what peftko wrote).")
@click.option("--strict", is_flag=True, panel=RUN, help="Refuse to train when the corpus has marker problems.")
@click.option("--num-processes", type=int, default=None, metavar="N", panel=RUN,
              help="With --dry-run: plan for N GPUs (torchrun --nproc_per_node N); a launched run uses the launcher's count.")
@click.help_option("-h", "--help", panel=RUN)
@_config_options
@progress_option(panel=RUN)
def lora_train(config_file, sets, resume, force, dry_run, strict, num_processes, **flags):
    """Train LoRA adapters plus the marker embedding rows on a (quantized) base.

    Needs --model, --data and --output, as flags or from a --config. Writes OUTPUT/report.png at the
    end (loss curves and bits per character); the flags below override the --config file, which
    overrides the defaults.
    """
    _no_library_bars_in_files()
    # before torch loads: a slip answers at once (a dry run also shows how other tools' keys were read)
    cfg = _load_config(config_file, sets, flags, "lora-train", explain=dry_run)
    from peftko.commands.lora_train import run_lora_train

    sys.exit(run_lora_train(cfg, resume=resume, force=force, dry_run=dry_run, strict=strict,
                            num_processes=num_processes))


def _load_config(config_file, sets, flags: dict, command: str, explain: bool = False) -> TrainConfig:
    """The TrainConfig from the file, --set and the generated flags (see _config_options); the
    command needs model, data and output from one of them, never the demo's defaults."""
    for name in MULTIPLE:  # an empty tuple means "not given", so the config file's list stays
        flags[name] = list(flags[name]) or None
    for name in JOINED:  # every repeat counts: --markers A --markers B is A,B, never just B
        flags[name] = ",".join(flags[name]) if flags[name] else None
    return load_config(config_file, flags, list(sets), required_by=command, explain=explain)


def _no_library_bars_in_files() -> None:
    """Off a terminal, the loading and tokenising bars of transformers and datasets go too.

    A bar redraws itself with carriage returns, which `> train.log 2>&1` keeps as clutter; the
    switches are environment variables read when those libraries load, so set them first.
    TQDM_DISABLE reaches a library's bare tqdm bars only where tqdm is imported after it (tqdm reads
    it at import, and the renderer imports tqdm first): the GGUF loader's bar, drawn while
    builtin:gemma-3-270m is built, is switched off where it is called (peftko.model.gemma_base).
    """
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(var, "1")


@main.command("merge")
@click.argument("adapter_dir", type=click.Path())
@click.option("--output", required=True, type=click.Path(), help="Directory for the standalone model.")
@click.option("--base", type=click.Path(), help="Base model directory (default: the one in peftko.json).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Dtype the merged model's weights are saved in.")
@click.option("--force", is_flag=True, help="Replace an earlier merged model (only one peftko wrote).")
@click.option("--full-check", is_flag=True,
              help="Also compare the merged model's logits with the adapter's (loads the model; needs its RAM).")
@click.option("--gguf", type=click.Choice(GGUF_TYPES), is_flag=False, flag_value=DEFAULT_TYPE, default=None,
              metavar="[TYPE]", help=f"Also write OUTPUT/model-TYPE.gguf and an Ollama Modelfile (TYPE: "
              f"{', '.join(GGUF_TYPES)}; --gguf alone: {DEFAULT_TYPE}). Needs llama.cpp's converter.")
@click.option("--llama-cpp", type=click.Path(), metavar="DIR",
              help="llama.cpp folder holding convert_hf_to_gguf.py  [default: $PEFTKO_LLAMA_CPP]")
@progress_option
def merge(adapter_dir, output, base, dtype, force, full_check, gguf, llama_cpp):
    """Merge an adapter into its full-precision base: a standalone Hugging Face model.

    The merge streams tensor by tensor, so it needs memory for the largest tensor, not the model.
    With --gguf, also a GGUF for llama.cpp and Ollama, checked marker by marker, and a Modelfile.
    """
    _no_library_bars_in_files()
    from peftko.commands.merge import run_merge

    options = GgufOptions(gguf, llama_cpp) if gguf else None
    sys.exit(run_merge(adapter_dir, output, base=base, dtype=dtype, force=force, full_check=full_check,
                       gguf_options=options))


DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _inference_options(func):
    """--quant, --device and --dtype: how eval, bench and generate load a run, a merge or a model. In
    lora-train's panel for them: a panel without --help's -h column, so --dtype and its choices stay
    on one line at 80 columns."""
    func = click.option("--dtype", type=click.Choice(DTYPES), default=None, metavar="|".join(DTYPES), panel=MODEL,
                        help="Compute dtype; auto: the device's fastest exact-enough one  [default: as recorded: "
                             "the dtype the run trained or the merge wrote in; auto for other folders]")(func)
    func = click.option("--device", default="auto", show_default=True, panel=MODEL,
                        help="auto, cpu, cuda or cuda:N.")(func)
    func = click.option("--quant", type=click.Choice(["4bit", "8bit", "none"]), panel=MODEL,
                        help="Override the quantization (default: as trained for an adapter, none for a model "
                             "folder).")(func)
    return click.option_panel(OPTIONS)(click.option_panel(MODEL)(func))  # the command's own options first


def _marker_pattern_options(func):
    """--marker-pattern, the name lora-train gives it; --pattern, its earlier name on markers and
    eval, still works but is not shown."""
    func = click.option("--pattern", "old_pattern", default=None, hidden=True,
                        help="Earlier name of --marker-pattern.")(func)
    return click.option("--marker-pattern", default=FIELDS["marker_pattern"].default, show_default=True,
                        help="Regex that finds the markers.")(func)


def _one_pattern(marker_pattern: str, old_pattern: str | None) -> str:
    if old_pattern is None or old_pattern == marker_pattern:
        return marker_pattern
    if marker_pattern != FIELDS["marker_pattern"].default:
        raise UserError("--pattern is the earlier name of --marker-pattern; give one of them")
    return old_pattern


@main.command("report")
@click.argument("run_dir", type=click.Path())
@progress_option
def report(run_dir):
    """Plot a run (loss, learning rate, gradient norm, bits per character) into RUN_DIR/report.png."""
    from peftko.commands.report import run_report

    run_report(run_dir)


@main.command("markers")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", help="Base model directory: show how its tokenizer splits each marker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--strict", is_flag=True, help="Exit 1 when any problem is found.")
@click.option("--grammar", is_flag=True, help="Also show the markers' grammar learned from the corpus: pairs, "
              "nesting, document open and close, no back-to-back repeats (what generate --structure strict keeps).")
@_marker_pattern_options
@click.option("--jsonl-field", default="text", show_default=True, help="Text field of .jsonl files.")
@progress_option
def markers(paths, model, as_json, strict, grammar, marker_pattern, old_pattern, jsonl_field):
    """Inspect a corpus: encodings, markers, and marker mistakes with file and line."""
    from peftko.commands.markers import run_markers_command

    sys.exit(run_markers_command(list(paths), model=model, as_json=as_json, strict=strict,
                                 pattern=_one_pattern(marker_pattern, old_pattern), jsonl_field=jsonl_field,
                                 grammar=grammar))


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--data", multiple=True, required=True, metavar="PATH", help="Corpus files or folders; repeatable.")
@click.option("--seq-len", type=click.IntRange(min=2), help="Window length in tokens  [default: min(2048, context)]")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward pass.")
@_inference_options
@_marker_pattern_options
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also sample this many continuations of each document's first three quarters and score their "
                   "structure: pairs closed, book ended, whole markers only (no fragments such as |>).")
@click.option("--sample-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest sampled continuation, in tokens (with --samples).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option
def eval_(model, data, seq_len, batch_size, quant, device, dtype, marker_pattern, old_pattern, samples, sample_tokens,
          as_json):
    """Bits per character of a corpus, with and without the markers, and per marker.

    MODEL: a lora-train output, a merge output or a local Hugging Face model folder.
    """
    _no_library_bars_in_files()
    from peftko.commands.eval import run_eval
    from peftko.evaluate.structure import SampleOptions

    sampling = SampleOptions(samples=samples, max_new_tokens=sample_tokens) if samples else None
    run_eval(model, list(data), seq_len=seq_len, batch_size=batch_size, quant=quant, device=device, dtype=dtype,
             pattern=_one_pattern(marker_pattern, old_pattern), as_json=as_json, sampling=sampling)


KOREAN_TASKS = ("kobest (kobest_boolq, kobest_copa, kobest_hellaswag, kobest_sentineg, kobest_wic), kmmlu, "
                "kmmlu_hard, haerae, click")


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--tasks", default="kobest", show_default=True, metavar="NAMES",
              help=f"Comma-separated lm-eval task, group or tag names. Korean: {KOREAN_TASKS}; every "
                   "name: `lm-eval ls tasks`.")
@click.option("--include-path", type=click.Path(file_okay=False), metavar="DIR",
              help="A folder of your own lm-eval task YAMLs; their names join --tasks.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Only the first N items of each task: a quick check, not comparable with published scores.")
@click.option("--num-fewshot", type=click.IntRange(min=0), metavar="K",
              help="Examples shown before each question  [default: each task's own; 0 for the Korean ones]")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests per forward pass.")
@click.option("--no-base", is_flag=True, help="Score each run alone, not beside the base it was trained on.")
@_inference_options
@click.option("--json", "json_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the scores here  [default: RUN/bench.json for each run among MODELS]")
@click.option("--download", is_flag=True,
              help="Let lm-eval fetch task data from the Hugging Face Hub (once; later runs read the cache offline).")
@progress_option
def bench(models, tasks, include_path, limit, num_fewshot, batch_size, no_base, quant, device, dtype, json_file,
          download):
    """Benchmarks from EleutherAI's lm-evaluation-harness, each MODEL side by side.

    MODELS: lora-train outputs, merge outputs, local Hugging Face model folders or builtin:... bases.
    A run is scored beside the base it was trained on: did training on your books cost the model
    its general Korean? Needs pip install 'peftko[bench]'.
    """
    names = arguments.bench_tasks(tasks)
    _no_library_bars_in_files()
    from peftko.commands.bench import run_bench
    from peftko.evaluate.bench import BenchOptions

    options = BenchOptions(names, arguments.include_path(include_path), limit, num_fewshot, batch_size, download)
    run_bench(list(models), options, quant=quant, device=device, dtype=dtype, json_file=json_file,
              with_base=not no_base)


@main.command("generate")
@click.argument("model", type=click.Path())
@click.option("--prompt", help="Text to continue.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a UTF-8 file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="Longest continuation, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0: greedy (repeatable).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Sample from the most likely tokens that together hold this probability (1: off).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: off.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Above 1 makes tokens already written less likely (1: off).")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Sampling seed: the same seed repeats the same text on the same machine.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Continuations to write, each from the prompt.")
@click.option("--structure", type=click.Choice(["strict", "free"]), default=None,
              help="strict: markers only where the corpus's grammar allows them (pairs closed, the book end "
                   "last, whole markers only); free: as the model likes  [default: strict where the run or "
                   "merge recorded a grammar, else free]")
@_inference_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample instead of streaming.")
@progress_option
def generate(model, prompt, prompt_file, as_json, **options):
    """Continue a prompt, streaming token by token; markers are printed as written.

    Stops at the book-end marker, the base's eos, or --max-new-tokens.
    """
    _no_library_bars_in_files()
    from peftko.commands.generate import read_prompt, run_generate
    from peftko.model.generation import GenerateOptions

    text = read_prompt(prompt, prompt_file)
    sys.exit(run_generate(model, text, GenerateOptions(**options), as_json=as_json))


# ablate's own options first, in the run panel, as lora-train's are.
@main.command("ablate", cls=_ConfigCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), panel=RUN, help=CONFIG_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", panel=RUN, help=SET_HELP)
@click.option("--resume", is_flag=True, panel=RUN,
              help="Continue an interrupted ablate, as running it again does: finished variants are kept and the "
                   "interrupted one resumes from its checkpoint.")
@click.option("--force", is_flag=True, panel=RUN, help="Run again into an --output that holds an ablation "
              "(variants are replaced).")
@click.option("--samples", type=click.IntRange(min=1), default=None, metavar="INT", panel=RUN,
              help=f"Sampled continuations per held-out document for the structure score  [default: the "
                   f"config's samples when above 0, else {arguments.ABLATE_SAMPLES}]")
@click.option("--sample-tokens", type=click.IntRange(min=1), default=None, metavar="INT", panel=RUN,
              help="Longest sampled continuation, in tokens  [default: the config's sample_tokens, 256]")
@click.option("--json", "as_json", is_flag=True, panel=RUN, help="Print one JSON object instead of the table.")
@click.help_option("-h", "--help", panel=RUN)
@functools.partial(_config_options, skip=("samples", "sample_tokens"))
@progress_option(panel=RUN)
def ablate(config_file, sets, resume, force, samples, sample_tokens, as_json, **flags):
    """Train three variants (markers registered / left as text / deleted) and compare them held out.

    Takes every lora-train option and needs --model and --data as it does; --output DIR, given on
    the command line, receives DIR/<variant>/, ablation.json, .md and .png.
    """
    _no_library_bars_in_files()
    arguments.ablate_output(flags["output"], resume, force)
    cfg = _load_config(config_file, sets, flags, "ablate")
    n, tokens = arguments.ablate_sampling(samples, sample_tokens, cfg.samples, cfg.sample_tokens)
    from peftko.commands.ablate import run_ablate
    from peftko.evaluate.structure import SampleOptions

    run_ablate(cfg, SampleOptions(samples=n, max_new_tokens=tokens), force=force, as_json=as_json)


@main.command("cache")
@click.option("--clear", type=click.Choice(["tokens", "bases", "all"]), is_flag=False, flag_value="all", default=None,
              metavar="[WHAT]", help="Remove peftko's caches: tokens (packed token blocks), bases (built bases) "
              "or all (--clear alone). Prints each folder removed; asks nothing.")
@progress_option
def cache(clear):
    """List what peftko keeps in its cache ($PEFTKO_HOME, else ~/.cache/peftko), with sizes.

    Token blocks of each corpus (rebuilt when needed) and the bases peftko built (builtin:..., built
    again on next use). --clear removes only what peftko wrote; anything else there is left alone.
    """
    from peftko.commands.cache import run_cache

    run_cache(clear)


@main.command("studio")
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The folder the studio reads and writes in (corpora, configs, runs); nothing outside it.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but the loopback requires a token (printed once).")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="Port to listen on.")
@click.option("--token", envvar="PEFTKO_STUDIO_TOKEN", default=None, metavar="TEXT",
              help="Require this token on every request (off the loopback one is made up when not given)  "
                   "[env: PEFTKO_STUDIO_TOKEN]")
def studio(root, host, port, token):
    """The whole loop in a local web page: corpus, training, runs, generation (Korean first).

    Needs pip install 'peftko[studio]'. Trainings it starts run as their own processes: stopping
    the studio leaves them running, and a new studio on the same --root finds them again.
    """
    try:
        from peftko.studio.serve import serve
    except ImportError as e:
        raise UserError(f"peftko studio needs {e.name}: pip install 'peftko[studio]'") from None
    serve(root, host, port, token)


def _same_metavars(group: click.Group) -> None:
    """INT and FLOAT on every command, as lora-train's flags: not click's INTEGER (RANGE)."""
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.metavar is None and not param.is_flag:
                param.metavar = {int: "INT", float: "FLOAT"}.get(getattr(param.type, "_number_class", None))


_same_metavars(main)

if __name__ == "__main__":
    main()
