"""Run peftko (or pytest) as on a CPU with AVX2 only: no AVX512, no AVX512-BF16, on this one.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/as_avx2_cpu.py peftko lora-train ...
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/as_avx2_cpu.py pytest tests/...

The same code takes other library paths on such a CPU, and this takes them here:
- torch dispatches its CPU kernels by ATEN_CPU_CAPABILITY and oneDNN by ONEDNN_MAX_CPU_ISA, both read
  when torch loads (so the caller sets them);
- bitsandbytes asks its native library whether the CPU has AVX512-BF16 while its CPU backend is
  imported, and registers an inference-only 4-bit kernel if so: the answer is made "no" before that
  import. Its AVX512 paths follow torch's capability;
- peftko's own bf16 probe (dtype auto) answers no.
Used for benchmarks/RESULTS.md, "The demo on a CPU without AVX512": an emulation, not another machine.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class _NoAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":  # bitsandbytes.functional is loaded by then
            sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: False
        return None


def emulate() -> None:
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2" or os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        sys.exit("set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 first (torch reads them as it loads)")
    sys.meta_path.insert(0, _NoAvx512Bf16())
    from peftko.core.libraries import keep_libraries_offline_and_quiet

    keep_libraries_offline_and_quiet()
    import torch

    torch.cpu._is_avx512_bf16_supported = lambda: False
    import bitsandbytes.backends.cpu.ops as cpu_ops
    import bitsandbytes.nn.modules as bnb_modules

    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert not bnb_modules.has_avx512bf16() and not cpu_ops._has_avx512
    print("[emulated CPU] torch AVX2 kernels; bitsandbytes without AVX512 and AVX512-BF16", file=sys.stderr)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("peftko", "pytest"):
        sys.exit(__doc__)
    tool, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    emulate()
    if tool == "pytest":
        import pytest

        sys.exit(pytest.main(sys.argv[1:]))
    from peftko.cli import main as peftko

    peftko()


if __name__ == "__main__":
    main()
