"""Every reader trusts only what was verified: each file a run (or a merge) wrote is sealed, and
merge, generate and eval refuse a forged one, naming it, exit code 2, no traceback.

Each file the run holds is forged one at a time: a byte edited, cut short, removed, replaced by a
link, swapped with another run's; an unsealed file dropped beside them. Then the forgeries the
seal cannot see (the hashes recomputed by `reseal`, as a careful forger would): peftko.json and
adapter_config.json edited to disagree, NaN and inf rows in the adapter. Those are the facts
peftko.model.run_facts recomputes from the files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftko.cli import main
from peftko.run.identity import sha256_file
from tests.conftest import train_args

COMMANDS = ("merge", "generate", "eval")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A fresh copy of the session's finished tiny run, to forge."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def invoke(command: str, run_dir: Path, corpus: Path, tmp: Path):
    args = {"merge": ["merge", str(run_dir), "--output", str(tmp / "merged"), "--dtype", "float32"],
            "generate": ["generate", str(run_dir), "--prompt", "달빛", "--max-new-tokens", "3", "--device", "cpu"],
            "eval": ["eval", str(run_dir), "--data", str(corpus), "--device", "cpu", "--seq-len", "64"]}[command]
    return CliRunner().invoke(main, args)


def assert_refused(run_dir: Path, corpus: Path, tmp: Path, names: str, commands=COMMANDS) -> None:
    """Each command ends with exit 2 and a message naming NAMES (a file or a key), no traceback."""
    for command in commands:
        result = invoke(command, run_dir, corpus, tmp)
        assert result.exit_code == 2, f"{command}: exit {result.exit_code}\n{result.output}{result.exception!r}"
        assert isinstance(result.exception, SystemExit), f"{command}: {result.exception!r}"
        assert "Traceback" not in result.output, result.output
        assert names in result.output, f"{command}: {names!r} not in\n{result.output}"
        assert not (tmp / "merged").exists()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "peftko.json").read_text(encoding="utf-8"))


def write_manifest(run_dir: Path, data: dict) -> None:
    (run_dir / "peftko.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def reseal(run_dir: Path) -> None:
    """What a careful forger does after editing a file: recompute its hash in peftko.json, so the
    seal matches and only the facts can tell."""
    data = manifest(run_dir)
    data["seal"] = {name: sha256_file(run_dir / name) for name in data.get("seal", [WEIGHTS])}
    data["adapter_sha256"] = data["seal"][WEIGHTS]
    write_manifest(run_dir, data)


def edit_config(run_dir: Path, change) -> None:
    config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    change(config)
    (run_dir / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    reseal(run_dir)


def edit_rows(run_dir: Path, value: float) -> str:
    """Set the first trained token row of the adapter to VALUE; the name of the tensor changed."""
    tensors = load_file(run_dir / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("trainable_tokens_delta"))
    tensors[key][0] = value
    save_file(tensors, run_dir / WEIGHTS, metadata={"format": "pt"})
    reseal(run_dir)
    return key


def test_a_run_seals_every_file_it_wrote(tiny_run):
    seal = manifest(tiny_run)["seal"]
    assert {WEIGHTS, CONFIG, "tokenizer_config.json", "README.md", "metrics.jsonl"} <= set(seal)
    assert "peftko.json" not in seal
    assert all(seal[name] == sha256_file(tiny_run / name) for name in seal)
    assert manifest(tiny_run)["adapter_sha256"] == seal[WEIGHTS]


# --- what the seal catches: each file, one at a time
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _link(path: Path) -> None:
    """The same bytes, behind a symbolic link: peftko wrote a file there, not a link."""
    target = path.with_name(f"elsewhere-{path.name}")
    shutil.move(path, target)
    path.symlink_to(target.name)


def named(run_dir: Path, name: str, how: str) -> str:
    """How the refusal names the file: by its path, a removed one too (peftko.json says the run finished)."""
    return f"{run_dir / name}"


FORGERIES = {"edit": _flip_byte, "truncate": _truncate, "remove": Path.unlink, "link": _link}
FILES = (WEIGHTS, CONFIG, "tokenizer.json", "tokenizer_config.json", "README.md", "metrics.jsonl")


@pytest.mark.parametrize("how", FORGERIES)
def test_each_sealed_file_forged_is_refused_by_generate(run, small_corpus, tmp_path, how):
    # Fast: every file, one command. The slow test below runs all three commands on each.
    for name in FILES:
        copy = tmp_path / f"{how}-{name}"
        shutil.copytree(run, copy, symlinks=True)
        FORGERIES[how](copy / name)
        assert_refused(copy, small_corpus, tmp_path, named(copy, name, how), commands=("generate",))


@pytest.mark.slow  # 24 forgeries x 3 commands: ~20 s on a quiet 2-core machine
@pytest.mark.parametrize("how", FORGERIES)
@pytest.mark.parametrize("name", FILES)
def test_each_sealed_file_forged_is_refused_by_every_reader(run, small_corpus, tmp_path, how, name):
    FORGERIES[how](run / name)
    assert_refused(run, small_corpus, tmp_path, named(run, name, how))


@pytest.mark.parametrize("name", ["tokenizer.model", "added_tokens.json", "special_tokens_map.json"])
def test_an_unsealed_file_a_loader_would_read_is_refused(run, small_corpus, tmp_path, name):
    (run / name).write_text("{}", encoding="utf-8")
    assert_refused(run, small_corpus, tmp_path, f"{run / name}")


def test_a_run_without_a_seal_is_refused_as_written_by_an_older_peftko(run, small_corpus, tmp_path):
    data = manifest(run)
    del data["seal"]
    write_manifest(run, data)
    assert_refused(run, small_corpus, tmp_path, "older peftko")


@pytest.mark.slow  # a second training run (~5 s)
def test_a_file_swapped_with_another_runs_is_refused(run, tiny_bases, small_corpus, tmp_path):
    other = tmp_path / "other"
    trained = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], small_corpus, other, "--quant", "none",
                                                  "--max-steps", "2", "--lora-alpha", "16"))
    assert trained.exit_code == 0, trained.output
    for name in (WEIGHTS, CONFIG):
        copy = tmp_path / f"swap-{name}"
        shutil.copytree(run, copy)
        shutil.copyfile(other / name, copy / name)
        assert_refused(copy, small_corpus, tmp_path, f"{copy / name}")
    # Both adapter files swapped and resealed: the other run's lora_alpha is not this run's.
    for name in (WEIGHTS, CONFIG):
        shutil.copyfile(other / name, run / name)
    reseal(run)
    assert_refused(run, small_corpus, tmp_path, "lora_alpha")


# --- what only the facts catch: the seal recomputed, or peftko.json itself edited
def test_lora_alpha_edited_is_refused(run, small_corpus, tmp_path):
    edit_config(run, lambda c: c.update(lora_alpha=c["lora_alpha"] * 10))  # the 32 -> 320
    assert_refused(run, small_corpus, tmp_path, "lora_alpha")


def test_r_edited_is_refused(run, small_corpus, tmp_path):
    edit_config(run, lambda c: c.update(r=c["r"] * 2))
    assert_refused(run, small_corpus, tmp_path, f"{run / CONFIG}")


@pytest.mark.parametrize("change", [
    lambda c: c.update(target_modules=c["target_modules"][1:]),  # one module's LoRA left out
    lambda c: c.update(target_modules=["q_proj"]),
    lambda c: c.update(target_modules=[*c["target_modules"], "lm_head"]),
], ids=["one-dropped", "narrowed", "widened"])
def test_target_modules_edited_is_refused(run, small_corpus, tmp_path, change):
    edit_config(run, change)
    assert_refused(run, small_corpus, tmp_path, "target_modules")


@pytest.mark.parametrize("pattern", ["alpha_pattern", "rank_pattern"])
def test_a_per_module_scale_added_is_refused(run, small_corpus, tmp_path, pattern):
    edit_config(run, lambda c: c.update({pattern: {"q_proj": 64}}))
    assert_refused(run, small_corpus, tmp_path, pattern)


def test_trainable_token_indices_shifted_is_refused(run, small_corpus, tmp_path):
    edit_config(run, lambda c: c.update(trainable_token_indices={
        k: [i + 1 for i in v] for k, v in c["trainable_token_indices"].items()}))
    assert_refused(run, small_corpus, tmp_path, "trains rows")


def test_the_output_rows_alone_shifted_are_refused(run, small_corpus, tmp_path):
    """Merge used to compare the first module's rows only: a shifted lm_head list got through."""
    def shift_last(config):
        spec = config["trainable_token_indices"]
        last = list(spec)[-1]
        spec[last] = [i + 1 for i in spec[last]]
    edit_config(run, shift_last)
    assert_refused(run, small_corpus, tmp_path, "trains rows")


def test_swapped_marker_ids_are_refused(run, small_corpus, tmp_path):
    data = manifest(run)
    first, second = data["markers"][0], data["markers"][1]
    first["id"], second["id"] = second["id"], first["id"]
    write_manifest(run, data)
    assert_refused(run, small_corpus, tmp_path, "marker")


def test_rows_after_plus_one_is_refused(run, small_corpus, tmp_path):
    data = manifest(run)
    data["vocab"]["rows_after"] += 1
    write_manifest(run, data)
    assert_refused(run, small_corpus, tmp_path, "rows_after")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_non_finite_rows_are_refused(run, small_corpus, tmp_path, value):
    key = edit_rows(run, value)
    assert_refused(run, small_corpus, tmp_path, key)


def test_a_non_finite_lora_weight_is_refused(run, small_corpus, tmp_path):
    tensors = load_file(run / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, run / WEIGHTS, metadata={"format": "pt"})
    reseal(run)
    assert_refused(run, small_corpus, tmp_path, key)


def test_the_untouched_run_is_accepted(run, small_corpus, tmp_path):
    """The refusals above are the forgeries', not every run's."""
    result = invoke("generate", run, small_corpus, tmp_path)
    assert result.exit_code == 0, result.output + repr(result.exception)


# --- a merged model: sealed by its mark, checked by generate and eval
@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sealed-merge") / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out


def _merged_readers(folder: Path, corpus: Path):
    return [CliRunner().invoke(main, ["generate", str(folder), "--prompt", "달빛", "--max-new-tokens", "3",
                                      "--device", "cpu"]),
            CliRunner().invoke(main, ["eval", str(folder), "--data", str(corpus), "--device", "cpu",
                                      "--seq-len", "64"])]


def test_a_merge_seals_every_file_it_wrote(merged):
    mark = json.loads((merged / "peftko-merge.json").read_text(encoding="utf-8"))
    assert set(mark["seal"]) == set(mark["files"]) and "model.safetensors" in mark["seal"]
    assert all(mark["seal"][n] == sha256_file(merged / n) for n in mark["seal"])


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_a_merged_file_edited_is_refused(merged, small_corpus, tmp_path, name):
    copy = tmp_path / "merged"
    shutil.copytree(merged, copy)
    _flip_byte(copy / name)
    for result in _merged_readers(copy, small_corpus):
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert f"{copy / name}" in result.output and "Traceback" not in result.output


def test_a_merged_folder_whose_mark_does_not_read_is_refused(merged, small_corpus, tmp_path):
    copy = tmp_path / "merged"
    shutil.copytree(merged, copy)
    (copy / "peftko-merge.json").write_text("{", encoding="utf-8")
    for result in _merged_readers(copy, small_corpus):
        assert result.exit_code == 2 and "peftko-merge.json" in result.output, result.output


# --- bench loads runs as generate and eval do
def test_bench_refuses_a_forged_run(run, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the task YAML names its JSONL relative to the repository root
    edit_config(run, lambda c: c.update(lora_alpha=c["lora_alpha"] * 10))
    result = CliRunner().invoke(main, ["bench", str(run), "--no-base", "--tasks", "ko_copa_mini", "--include-path",
                                       str(repo / "tests" / "fixtures" / "bench"), "--device", "cpu",
                                       "--json", str(tmp_path / "bench.json")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output + repr(result.exception)
    assert "lora_alpha" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bench.json").exists() and not (run / "bench.json").exists()


# --- a checkpoint: sealed by its checkpoint.json, checked by --resume
def _checkpoint(output: Path, step: int = 2) -> Path:
    from peftko.run.checkpoints import REQUIRED_FILES, staged_checkpoint

    with staged_checkpoint(output, step, {}) as stage:
        folder = stage / f"checkpoint-{step}"
        folder.mkdir()
        for name in REQUIRED_FILES:
            (folder / name).write_bytes(b"x" * 64 if name != "trainer_state.json" else b'{"global_step": 2}')
    return output / f"checkpoint-{step}"


@pytest.mark.parametrize("how", FORGERIES)
def test_resume_refuses_a_forged_checkpoint(tmp_path, how):
    from peftko.core.errors import UserError
    from peftko.run.resume import resume_point

    checkpoint = _checkpoint(tmp_path)
    assert resume_point(tmp_path) == checkpoint  # as written
    forged = checkpoint / ("optimizer.pt" if how != "edit" else "trainer_state.json")
    if how == "edit":
        forged.write_bytes(b'{"global_step": 3}')
    else:
        FORGERIES[how](forged)
    if how == "remove":  # then it is not complete: none to resume from, said so
        with pytest.raises(UserError, match="no complete checkpoint"):
            resume_point(tmp_path)
        return
    with pytest.raises(UserError, match=f"{forged}.*Remove checkpoint-2"):
        resume_point(tmp_path)


def test_a_checkpoint_written_before_the_seal_is_resumed_from(tmp_path):
    from peftko.run.resume import resume_point

    checkpoint = _checkpoint(tmp_path)
    done = json.loads((checkpoint / "checkpoint.json").read_text(encoding="utf-8"))
    del done["seal"]
    (checkpoint / "checkpoint.json").write_text(json.dumps(done), encoding="utf-8")
    assert resume_point(tmp_path) == checkpoint
