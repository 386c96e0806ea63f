"""The base is identified by every byte of its weight files (issue 34, item 1): an edit anywhere,
between the chunks the fingerprint once sampled, is refused by merge, which names the file."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.errors import UserError
from peftko.run.identity import FULL, base_differences, fingerprint_base, sampled_fingerprint, _sampled_hash
from peftko.run.manifest import check_base
from tests.conftest import train_args

ROWS = 20_000  # a 5 MB weight file: the old fingerprint's 64 sampled chunks leave gaps of ~16 KB


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def unsampled_offset(path, width=4096) -> int:
    """An offset near the middle of the file that the old sampled fingerprint never read."""
    size = path.stat().st_size
    starts = [size * i // 64 for i in range(64)]
    for i in range(32, 63):
        lo, hi = starts[i] + (1 << 16), starts[i + 1]
        if hi - lo > 2 * width and lo > (1 << 20):
            return lo + width // 2
    raise AssertionError(f"{path} ({size} bytes) is too small to have a gap between the sampled chunks")


def overwrite(path, offset, width=4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        flipped = bytes(b ^ 0x5A for b in f.read(width))  # every byte differs from what was there
        f.seek(offset)
        f.write(flipped)


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    from peftko.model.tiny_base import build_tiny_base, sample_texts

    return build_tiny_base(tmp_path_factory.mktemp("big") / "base", arch="llama", tie=True, pad_vocab_to=ROWS,
                           texts=sample_texts())


def test_an_edit_between_the_old_samples_changes_the_fingerprint(big_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(big_base, base)
    weights = base / "model.safetensors"
    before, sampled_before = fingerprint_base(base), _sampled_hash(weights)
    overwrite(weights, unsampled_offset(weights))
    assert _sampled_hash(weights) == sampled_before  # the edit the old fingerprint missed
    after = fingerprint_base(base)
    assert before.scheme == FULL and base_differences(before, after) == ["model.safetensors"]


@pytest.mark.slow  # a training run on a 10 MB base, then a merge (about 6 s on 2 cores)
def test_merge_refuses_a_base_edited_between_the_old_samples(big_base, small_corpus, tmp_path):
    run = tmp_path / "run"
    result = invoke(*train_args(big_base, small_corpus, run, "--quant", "none"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "peftko.json").read_text(encoding="utf-8"))["base_fingerprint"]["scheme"] == FULL
    base = tmp_path / "base"
    shutil.copytree(big_base, base)
    weights = base / "model.safetensors"
    overwrite(weights, unsampled_offset(weights))
    out = tmp_path / "merged"
    result = invoke("merge", run, "--output", out, "--base", base)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "the base changed since training: model.safetensors differs" in result.output, result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    # the untouched base still merges
    assert invoke("merge", run, "--output", out, "--base", big_base).exit_code == 0


def test_a_run_with_the_old_sampled_fingerprint_is_checked_by_it_and_told_so(big_base, tmp_path, capsys):
    """Such a run can only be checked by the parts it recorded; the user is told so."""
    fake = type("Run", (), {"base_model": str(big_base), "base_fingerprint": sampled_fingerprint(big_base)})()
    assert fake.base_fingerprint.scheme is None
    assert check_base(fake, None) == big_base
    shown = capsys.readouterr()
    assert "sampled parts" in shown.out + shown.err and "train again" in shown.out + shown.err
    base = tmp_path / "base"
    shutil.copytree(big_base, base)
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()), "x": 1}))
    with pytest.raises(UserError, match="config.json differs"):
        check_base(fake, str(base))


def test_resuming_a_run_recorded_with_the_sampled_fingerprint_says_why_it_differs(big_base):
    from peftko.run.records import RunIdentity
    from peftko.run.resume import identity_changes

    old = RunIdentity({}, [], "t", sampled_fingerprint(big_base), 1)
    new = RunIdentity({}, [], "t", fingerprint_base(big_base), 1)
    changes = identity_changes(old, new)
    assert len(changes) == 1 and "sampled parts" in changes[0] and "--force" in changes[0], changes


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5])
def test_the_sliced_hash_of_a_mapped_file_is_its_sha256(tmp_path, monkeypatch, size):
    """Every slice boundary (a file shorter than, equal to and longer than whole slices; an empty file
    that cannot be mapped) gives hashlib's SHA-256 of the whole file."""
    import hashlib
    import os

    from peftko.core import hashing

    monkeypatch.setattr(hashing, "SLICE", 4096)
    path = tmp_path / "weights.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert hashing.sha256_of(path) == hashlib.sha256(data).hexdigest()
