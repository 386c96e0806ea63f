"""What the libraries peftko loads may not do: reach the network, or print advice the user cannot act on.

peftko loads local paths only and fetches nothing at run time. Two libraries would otherwise:
- bitsandbytes, on a CPU with AVX512-BF16, imports the optional `kernels` package as it loads and,
  through it, downloads a CPU kernel from the Hugging Face Hub; without the package it logs
  "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" on every
  command. The package is hidden from this process (bitsandbytes then uses its built-in kernel)
  and that one logger is kept to errors.
- peft asks transformers 5 for a deprecated attribute name on every model it wraps.
Called once, before any of them is imported (peftko.cli does so at import).
"""

from __future__ import annotations

import logging
import sys
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def keep_libraries_offline_and_quiet() -> None:
    # None in sys.modules makes `import kernels` fail at once, as if it were not installed.
    sys.modules.setdefault("kernels", None)
    logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
