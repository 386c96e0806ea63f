"""Nothing is fetched at run time, and no library prints advice a user cannot act on.

bitsandbytes, on a CPU with AVX512-BF16, imports the optional `kernels` package as it loads (which
downloads a kernel from the Hugging Face Hub) and, without it, advises `pip install kernels`. The
path is forced here on any CPU, as bitsandbytes takes it on such a CPU, with a stand-in `kernels`
package that records being imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import importlib, sys
sys.path.insert(0, {fake!r})
{setup}
import bitsandbytes.backends.cpu.ops as ops
import bitsandbytes.functional as functional
functional.has_avx512bf16 = lambda: True  # what the native probe answers on an AVX512-BF16 CPU
importlib.reload(ops)
"""


def run(tmp_path: Path, setup: str) -> tuple[bool, str]:
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "fetched"
    (fake / "kernels" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def get_kernel(*a, **k):\n    raise RuntimeError('would download from the Hub')\n")
    marker.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(fake=str(fake), setup=setup)], cwd=REPO,
                          capture_output=True, text=True, env={"PATH": "", "HF_HUB_OFFLINE": "1",
                                                               "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return marker.exists(), done.stdout + done.stderr


def test_bitsandbytes_neither_fetches_a_kernel_nor_advises_installing_one(tmp_path):
    fetched, output = run(tmp_path, "import peftko.cli  # what every peftko command runs first")
    assert not fetched
    assert "pip install kernels" not in output and "kernels-community" not in output, output
    # Without peftko's setup, the same path imports the package and prints the advice.
    fetched, output = run(tmp_path, "")
    assert fetched and "kernels-community" in output, output
