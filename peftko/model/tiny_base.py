"""Tiny bases built locally from a config: the built-in demo and the test fixtures.

No weights are downloaded, ever. A real transformers model class (Llama, Qwen2, GPT-NeoX) is
initialised at random from a small config, and a real byte-level BPE tokenizer is trained with
`tokenizers` on the bundled Korean corpus with its markers removed, so, as with a real base,
the markers start out split into several pieces.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftko.core.config import BUILTIN_MODEL, DEFAULT_MARKER_PATTERN
from peftko.core.paths import sample_corpus_dir
from peftko.core.progress import phase
from peftko.model.built_base import built_base, builtin_folder

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BUILTIN_PRETRAIN_STEPS = 120

# arch name -> (transformers config class name, extra config kwargs)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}),
}


def sample_texts(strip_markers: bool = True) -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(sample_corpus_dir().glob("*.txt"))]
    if strip_markers:
        texts = [re.sub(DEFAULT_MARKER_PATTERN, "", t) for t in texts]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1200):
    """A byte-level BPE tokenizer, like Llama-3's or Qwen's, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def tiny_config(arch: str, vocab_size: int, tie: bool, bos_id: int, eos_id: int, hidden: int = 64):
    import transformers

    cls_name, extra = ARCHS[arch]
    return getattr(transformers, cls_name)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if arch != "gpt_neox" else None,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        **extra,
    )


def pretrain(model, tokenizer, texts: list[str], steps: int, seq_len: int = 128, batch: int = 8) -> None:
    """A few seconds of full training on marker-free text, so the demo base has seen Korean.

    A purely random base predicts uniformly and LoRA on it learns slowly; a base that already
    models the language, but never saw a marker, is what a real user starts from.
    """
    import torch

    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_tiny_base(
    directory: str | Path,
    arch: str = "llama",
    tie: bool = True,
    pad_vocab_to: int | None = None,
    texts: list[str] | None = None,
    seed: int = 0,
    pretrain_steps: int = 0,
) -> Path:
    """Write a tiny base (safetensors + tokenizer) to `directory` and return it.

    pad_vocab_to gives the embedding matrix more rows than the tokenizer has ids, as Qwen does.
    pretrain_steps > 0 trains it briefly on `texts` (markers already removed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(ARCHS)}")
    tokenizer = train_tokenizer(texts if texts is not None else sample_texts())
    rows = max(len(tokenizer), pad_vocab_to or 0)
    config = tiny_config(arch, rows, tie, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if pretrain_steps:
        pretrain(model, tokenizer, texts if texts is not None else sample_texts(), pretrain_steps)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def builtin_base() -> Path:
    """The built-in demo base, built once and reused (deterministic: same seed, same corpus), verified
    against its build record on each use (peftko.model.built_base)."""
    def build(out: Path) -> None:
        with phase("build base", total=None, unit="steps"):
            build_tiny_base(out, arch="llama", tie=True, pretrain_steps=BUILTIN_PRETRAIN_STEPS)

    return built_base(builtin_folder(BUILTIN_MODEL), "the built-in tiny base", build,
                      "about a minute on 2 CPU cores")
