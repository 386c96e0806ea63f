"""What the libraries peftko loads may not do: reach the network, or print advice the user cannot act on.

peftko loads local paths only and fetches nothing at run time. Two libraries would otherwise:
- bitsandbytes, on a CPU with AVX512-BF16, imports the optional `kernels` package as it loads and,
  through it, downloads a CPU kernel from the Hugging Face Hub; without the package it logs
  "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" on every
  command. The package is hidden from this process (bitsandbytes then uses its built-in kernel)
  and that one logger is kept to errors.
- transformers (from 5.25) swaps layers for "hub kernels" it downloads with the `kernels` package,
  by default, on every from_pretrained: USE_HUB_KERNELS=NO turns that off (and with `kernels`
  hidden, leaving it on makes every load fail with "Kernels are not available").
- peft asks transformers 5 for a deprecated attribute name on every model it wraps.
Called once, before any of them is imported (peftko.cli does so at import).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def keep_libraries_offline_and_quiet() -> None:
    # None in sys.modules makes `import kernels` fail at once, as if it were not installed.
    sys.modules.setdefault("kernels", None)
    os.environ["USE_HUB_KERNELS"] = "NO"  # read at each from_pretrained, so this reaches every later load
    logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
