"""The merged model's config files: the grown vocabulary, the output dtype, and a stop at the book end."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, GenerationConfig

from peftko.model.base import load_tokenizer
from peftko.run.records import RunRecord


def stop_at_book_end(generation_config, record: RunRecord) -> None:
    """Make generate() stop at the document-end marker as well as at the base's own eos.

    Training kept the marker in the labels, so the model learned to emit it where a book ends.
    """
    end = record.book_end()
    if end is None:
        return
    eos = generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    generation_config.eos_token_id = list(dict.fromkeys(eos + [end.id]))


def write_config(base_path: Path, record: RunRecord, dtype: str, stage: Path) -> None:
    """config.json with the grown vocabulary and the output dtype; generation_config.json with the stop."""
    remote = record.trust_remote_code
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=remote)
    config.get_text_config().vocab_size = record.vocab.rows_after
    config.dtype = dtype
    config.save_pretrained(stage)
    try:
        generation = GenerationConfig.from_pretrained(base_path)
    except OSError:  # no generation_config.json: what from_pretrained would derive
        generation = GenerationConfig.from_model_config(config)
    stop_at_book_end(generation, record)
    generation.save_pretrained(stage)
    for name in record.base_terms or []:  # the merged weights are still under the base's terms
        source = base_path / Path(name).name
        if source.is_file() and not source.is_symlink():
            shutil.copyfile(source, stage / source.name)
    if remote:  # the model's own code, which config.json's auto_map points at
        for code in base_path.glob("*.py"):
            shutil.copyfile(code, stage / code.name)


def merged_tokenizer(run_dir: Path, record: RunRecord):
    """The run's tokenizer, markers included: the merged model's."""
    return load_tokenizer(run_dir, record.trust_remote_code)
