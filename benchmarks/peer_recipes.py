#!/usr/bin/env python
"""The peers' recipes for new marker tokens, written from their documentation with plain transformers +
PEFT: this file never imports peftko (tests/test_peers_benchmark.py checks), so what it measures is
the recipe, not peftko's code. benchmarks/peers_real.py runs it, one process per recipe.

    python benchmarks/peer_recipes.py train --recipe peft-tokens --base DIR --train-file F [...] --out RUN
    python benchmarks/peer_recipes.py merge --base DIR --adapter RUN/adapter --out MERGED

Recipes (every one: the base in 4-bit NF4 with double quantization, float32 compute, LoRA r16/alpha 32 on
all linear layers, no dropout, prepare_model_for_kbit_training, transformers' Trainer with AdamW):
  peft-tokens  the markers added as tokens (AddedToken, as Axolotl's `tokens:` adds them), the
               embedding resized (transformers' mean resizing), and PEFT's
               LoraConfig(trainable_token_indices={"embed_tokens": new ids}): what PEFT, TRL and
               Axolotl document for new tokens. The adapter is saved with save_embedding_layers=True,
               as PEFT does by itself ("auto") for a resized embedding.
  unsloth      the markers added and the embedding resized the same way; Unsloth's advice for new
               tokens: modules_to_save=["embed_tokens", "lm_head"] (both whole matrices trained) with the
               embedding learning rate a tenth of the LoRA one (UnslothTrainer's
               embedding_learning_rate, written here as a second AdamW parameter group).
  as-text      no added tokens at all: the markers stay text in the base tokenizer, plain LoRA.

Data: each training file is one book, tokenised with the tokenizer's BOS and followed by EOS, the books
concatenated and cut into blocks of --seq-len tokens, the last short block dropped (transformers'
run_clm.py `group_texts`, labels a copy of the ids) and default_data_collator, as run_clm.py does (full
blocks need no padding; DataCollatorForLanguageModeling would also mask every EOS once pad_token is set
to eos_token, as tutorials do for bases without one); the Trainer shuffles the blocks with --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

MARKERS = ["|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>",
           "|START_OF_DIALOGUE|>", "|END_OF_DIALOGUE|>", "|SOUND|>"]
RECIPES = ("peft-tokens", "unsloth", "as-text")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--recipe", choices=RECIPES, required=True)
    t.add_argument("--base", required=True)
    t.add_argument("--train-file", action="append", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--max-steps", type=int, default=40)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--warmup-ratio", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=42)
    m = sub.add_parser("merge")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    return p.parse_args(argv)


def add_markers(tokenizer) -> list[int]:
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(m, normalized=False, special=False, lstrip=False, rstrip=False)
                          for m in MARKERS])
    return tokenizer.convert_tokens_to_ids(MARKERS)


def blocks(tokenizer, files: list[str], seq_len: int) -> list[dict]:
    ids: list[int] = []
    for f in files:
        ids += tokenizer(Path(f).read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len], "labels": ids[i * seq_len:(i + 1) * seq_len]}
            for i in range(n)]


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations, self.losses, self._t = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.durations.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def train(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments,
                              default_data_collator, set_seed)

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    new_ids = add_markers(tokenizer) if args.recipe != "as-text" else []
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=qconfig, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    if new_ids:
        model.resize_token_embeddings(len(tokenizer))
    # No gradient checkpointing: the demo trains without it, so every recipe computes the same.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    extra = {}
    if args.recipe == "peft-tokens":
        extra = {"trainable_token_indices": {"embed_tokens": new_ids}}
    elif args.recipe == "unsloth":
        extra = {"modules_to_save": ["embed_tokens", "lm_head"]}
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                      **extra)
    model = get_peft_model(model, lora)
    optimizers = (None, None)
    if args.recipe == "unsloth":
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        embed = [p for n, p in trainable if "modules_to_save" in n]
        rest = [p for n, p in trainable if "modules_to_save" not in n]
        optimizers = (torch.optim.AdamW([{"params": rest, "lr": args.lr},
                                         {"params": embed, "lr": args.lr / 10}], lr=args.lr, weight_decay=0.0), None)
    data = blocks(tokenizer, args.train_file, args.seq_len)
    out = Path(args.out)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(args.warmup_ratio * args.max_steps), weight_decay=0.0, optim="adamw_torch",
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    timer = step_timer()
    trainer = Trainer(model=model, args=targs, train_dataset=data, optimizers=optimizers,
                      data_collator=default_data_collator, callbacks=[timer])
    trainer.train()
    adapter = out / "adapter"
    model.save_pretrained(adapter, save_embedding_layers=True if args.recipe == "peft-tokens" else "auto")
    tokenizer.save_pretrained(adapter)
    facts = {"recipe": args.recipe, "blocks": len(data), "trainable_params":
             sum(p.numel() for p in model.parameters() if p.requires_grad),
             "step_s": [round(d, 3) for d in timer.durations], "losses": timer.losses}
    (out / "train.json").write_text(json.dumps(facts))
    return facts


def merge(args) -> None:
    """The adapter merged into the float32 base, written as a plain Hugging Face folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, device_map={"": "cpu"})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter brings the rows
    model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        merge(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
