"""Every number in a config is finite, or the run is refused with its key named (YAML's .inf and
.nan are floats: an infinite epoch count used to overflow with a traceback, and a NaN weight decay
or clipping norm passed every check)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import load_config
from peftko.core.errors import UserError


@pytest.mark.parametrize("key", ["num_epochs", "weight_decay", "max_grad_norm", "learning_rate", "warmup_ratio"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_number_in_a_config_file_is_refused_with_its_key(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}: {key}: .* must be a finite number"):
        load_config(path)


def test_a_non_finite_flag_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["lora-train", "--model", "builtin:tiny-llama", "--data", "builtin:sample",
                                  "--output", str(tmp_path / "run"), "--max-grad-norm", "nan", "--dry-run"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--max-grad-norm: 'nan' must be a finite number" in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--lr", "--embedding-lr"])
def test_a_rate_torch_cannot_hold_is_refused_before_training(tmp_path, flag):
    # 1e38 is finite, yet AdamW's first step divides it by 0.1 and overflowed float32 with a traceback
    r = CliRunner().invoke(main, ["lora-train", "--model", "builtin:tiny-llama", "--data", "builtin:sample",
                                  "--output", str(tmp_path / "run"), flag, "1e38", "--dry-run"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{flag.lstrip('-').replace('-', '_')}: must be positive and at most 1e+30" in r.output, r.output
    assert not (tmp_path / "run").exists()
