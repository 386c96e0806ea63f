"""What a `peftko lora-train` output folder holds: every name peftko writes there, in one place.

A finished run directory holds:
  adapter_model.safetensors, adapter_config.json   LoRA + the marker rows (never whole matrices)
  tokenizer files                                  the base tokenizer with the markers added (and
                                                   the base's SentencePiece model, if it has one)
  README.md                                        the model card (peftko.run.card)
  peftko.json                                      base path + fingerprint, markers and ids,
                                                   vocabulary sizes, quantization, resolved config
  metrics.jsonl                                    one JSON object per log
  report.png                                       the run's picture (peftko.run.plot)
  bench.json                                       optional: `peftko bench` scores, the run beside its base
  checkpoint-N/                                    optional, for --resume (peftko.run.checkpoints)
  run.json                                         what the run trains on, checked by --resume
peftko.json is written last, by an atomic rename: its presence means the run is complete.
The ownership rules (peftko.run.ownership) let --force replace exactly these names.
"""

from __future__ import annotations

MANIFEST = "peftko.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json",)
METRICS = "metrics.jsonl"
REPORT = "report.png"
BENCH = "bench.json"
RUN_FILE = "run.json"
LOG_DIRS = ("tensorboard", "wandb")  # --report-to tensorboard / wandb write inside the run
LOCK = ".peftko.lock"
FINAL_STAGE = ".final-"  # the final adapter is staged here, then renamed in
# The final files of a run whose peftko.json does not list them (saved before it did, or cut
# short between the renames): the adapter, peft's model card, and every tokenizer file name.
FINAL_FILES = (*ADAPTER_FILES, "README.md", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
               "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
               "chat_template.json")
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
FORMAT_VERSION = 1
MERGE_MARK = "peftko-merge.json"  # written last into a merged model: what it is, its dtype, which files are ours

