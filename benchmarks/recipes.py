#!/usr/bin/env python
"""The common QLoRA-with-new-tokens recipe against peftko's own training path.

    python benchmarks/recipes.py --shape tiny --device cpu        # < 2 minutes on 2 CPU cores
    python benchmarks/recipes.py --shape 8b --device cuda         # see benchmarks/gpu_check.sh

A randomly initialised model of a named shape (real vocabulary sizes: 128,256 rows for the Llama-3
shapes) is written once as safetensors, then each recipe loads it with the quantization config
(as a real run loads a checkpoint), adds 4 marker tokens, and trains the same batches: same seed,
same token ids, same order.

  common  prepare_model_for_kbit_training + LoraConfig(modules_to_save=["embed_tokens", "lm_head"])
          + transformers' Trainer: what Axolotl, LLaMA-Factory and most tutorials do when tokens are
          added (benchmarks/RESULTS.md). Plain causal batches, as DataCollatorForLanguageModeling builds them.
          Trained under the Trainer's bf16 autocast (bf16=True, as Axolotl and LLaMA-Factory set it).
  common-noamp  the same without autocast (no bf16=True): the fp32-upcast tensors then compute in
          fp32, the configuration of the reference measurements in benchmarks/RESULTS.md.
  peftko  peftko's functions, not a copy: load_base, register_markers, grow_embeddings,
          init_marker_rows, attach_adapters, kernels.apply_fast_kernels, PackedCollator, make_trainer.

Each recipe runs in its own fresh process (this script with --worker): leftovers of an earlier
recipe inflated a later peak by 3-4 GiB in a shared process. The loading peak and the training peak
are read apart (torch.cuda.reset_peak_memory_stats() after loading). The model is built in a third
process, so the parent never holds GPU memory. The workers start together so their slow imports
overlap the build, then wait; each is let go only after the previous one has exited, so no recipe
shares the GPU or the CPU cores with another while it is measured.

Output: one JSON line per recipe, then a markdown table with peftko/common ratios.
tokens_per_s is batch x seq_len over the median step time, the first steps left out (allocator
warm-up, optimizer state creation, bitsandbytes' torch.compile on the CPU); step_s lists every
step. mfu is the usual
6 x parameters x tokens/s over the card's dense bf16 peak: it ignores attention FLOPs,
recomputation and the weight gradients frozen layers skip, so it compares recipes, not kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SEED = 1234
MARKERS = ["|START_OF_BOOK|>", "|START_OF_TITLE|>", "|START_OF_DIALOGUE|>", "|SOUND|>"]
GIB = 1024**3
RECIPES = ("common", "common-noamp", "peftko")

# name -> Llama config values; vocab None = the trained tiny tokenizer's size.
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12}
DEFAULTS = {  # shape -> (steps, seq_len, batch_size)
    "tiny": (6, 256, 4),
    "1b": (10, 2048, 4),
    "8b": (10, 2048, 4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, help="optimizer steps (default: 6 tiny, 10 otherwise)")
    p.add_argument("--seq-len", type=int, help="tokens per block (default: 256 tiny, 2048 otherwise)")
    p.add_argument("--batch-size", type=int, help="blocks per step (default 4)")
    p.add_argument("--quant", choices=["4bit", "8bit", "none"], default="4bit")
    p.add_argument("--liger", choices=["auto", "on", "off"], default="auto", help="for the peftko recipe")
    p.add_argument("--recipes", default="common,peftko",
                   help="comma-separated: common, common-noamp (the same without the Trainer's bf16 autocast), peftko")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="peftko recipe: keep every activation")
    p.add_argument("--offload-checkpoints", action="store_true", help="peftko recipe: checkpoints in CPU memory")
    p.add_argument("--profile", help="CUDA: write a torch.profiler table of the peftko recipe's last step to "
                   "PROFILE.<recipe>.txt")
    p.add_argument("--warmup-steps", type=int, help="steps left out of tokens/s (default: min(2, steps // 3))")
    p.add_argument("--base-dir", help="keep the generated model here and reuse it (default: a temp dir)")
    p.add_argument("--card-gib", type=float, help="CUDA: cap the allocator at this many GiB to emulate a "
                   "smaller card (an out-of-memory run reports error instead of tokens/s)")
    p.add_argument("--verbose", action="store_true", help="show the workers' output on stderr")
    p.add_argument("--worker", choices=["build", *RECIPES], help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps, seq_len, batch = DEFAULTS[args.shape]
    args.steps = args.steps or steps
    args.seq_len = args.seq_len or seq_len
    args.batch_size = args.batch_size or batch
    if args.warmup_steps is None:
        args.warmup_steps = min(2, args.steps // 3)
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in args.recipe_list if r not in RECIPES]
    if bad or not args.recipe_list:
        p.error(f"--recipes: choose from {', '.join(RECIPES)} (got {args.recipes!r})")
    return args


# --- building the base: config + tokenizer + random safetensors, no model class materialised

def build_base(shape: str, directory: Path, device: str) -> None:
    """Write a random model of `shape` (bf16 safetensors, like a real checkpoint) and its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftko.model.tiny_base import sample_texts, train_tokenizer

    spec = dict(SHAPES[shape])
    tokenizer = train_tokenizer(sample_texts())
    vocab = spec.pop("vocab_size") or len(tokenizer)
    if vocab > len(tokenizer):
        # Pad with reserved specials (as Llama-3's 256 are) so the markers land after row `vocab`.
        pad = [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(vocab - len(tokenizer))]
        tokenizer.add_tokens(pad, special_tokens=True)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec)
    with torch.device("meta"):
        names = {k: (tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    use_cuda = device != "cpu" and torch.cuda.is_available()  # auto or cuda[:N]: fill tensors on the GPU
    gen_device = (device if device.startswith("cuda") else "cuda") if use_cuda else "cpu"
    torch.manual_seed(SEED)
    directory.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard, shard_bytes = {}, 0

    for name, shp in names.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.empty(shp, dtype=torch.bfloat16, device=gen_device).normal_(0.0, 0.02).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes >= 2 * GIB:
            flush()
    flush()
    if len(files) == 1:
        os.replace(directory / files[0], directory / "model.safetensors")
    else:
        index = {"metadata": {"total_size": sum(n * 2 for n in map(_numel, names.values()))}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "peftko-bench.json").write_text(json.dumps({"shape": shape, "vocab": vocab}))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- the same batches for both recipes

def make_blocks(tokenizer, tokens, seq_len: int, n_blocks: int) -> list[dict]:
    """Packed blocks of random documents: BOS, a book marker, random ids with a marker every ~64
    tokens, EOS. peftko's own packer cuts them, so position_ids restart at each document."""
    import numpy as np

    from peftko.data.packing import pack_blocks

    rng = np.random.default_rng(SEED)
    base_vocab = min(t.id for t in tokens)  # markers sit after the base vocabulary
    marker_ids = [t.id for t in tokens]

    def documents():
        while True:
            n = int(rng.integers(seq_len // 4, 2 * seq_len))
            ids = rng.integers(2, base_vocab, size=n)
            ids[:: 64] = rng.choice(marker_ids, size=len(ids[::64]))
            yield {"input_ids": [[tokenizer.bos_token_id, marker_ids[0], *ids.tolist(), tokenizer.eos_token_id]]}

    blocks = []
    for block in pack_blocks(documents(), seq_len):
        blocks.append(block)
        if len(blocks) == n_blocks:
            return blocks
    raise AssertionError("unreachable: the document stream is endless")


class PlainCollator:
    """What DataCollatorForLanguageModeling(mlm=False) gives for full blocks: ids, labels, ones."""

    def __call__(self, rows):
        import torch

        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def step_timer(device):
    import torch
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations, self.losses, self._t = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.durations.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def step_profiler(args, device):
    """torch.profiler over the last step (slowed by the profiler, so left to the median's edge); its
    table (top operators by their own CUDA time) to a file."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.steps - 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None:
                torch.cuda.synchronize(device)
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
                Path(f"{args.profile}.{args.worker}.txt").write_text(table)
                self.prof = None

    return StepProfiler()


# --- the recipes (each in its own process)

def load_common(base: Path, args, precision, tokenizer):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qconfig = None
    if args.quant == "4bit":
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=precision.dtype)
    elif args.quant == "8bit":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=precision.dtype, quantization_config=qconfig,
                                                 device_map={"": str(precision.device)})
    model.resize_token_embeddings(len(tokenizer))
    # The tutorials' order: prepare (fp32 upcast of every non-quantized tensor, checkpointing on), then LoRA.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    return model, PlainCollator(), None


def train_common(model, args, precision, output: Path, blocks, collator, callbacks):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
        # common-noamp: no autocast, so the fp32-upcast tensors compute in fp32 (benchmarks/RESULTS.md).
        bf16=precision.bf16 and args.worker == "common", fp16=precision.fp16 and args.worker == "common",
        use_cpu=precision.device.type == "cpu",
        activation_checkpointing=True,
        optim="adamw_torch_fused" if precision.device.type == "cuda" else "adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], seed=SEED, data_seed=SEED,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=blocks, data_collator=collator, callbacks=callbacks)
    trainer.train()


def peftko_config(args):
    from peftko.core.config import TrainConfig

    return TrainConfig(
        quant=args.quant, device=args.device, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=1,
        max_steps=args.steps, lr=2e-4, embedding_lr=1e-4, scheduler="constant", warmup_ratio=0.0,
        lora_r=16, lora_alpha=32, lora_dropout=0.0, logging_steps=1, eval_steps=0, save_steps=0,
        liger=args.liger, seed=SEED, gradient_checkpointing=not args.no_gradient_checkpointing,
        offload_checkpoints=args.offload_checkpoints,
    )


def load_peftko(base: Path, args, precision, tokenizer, tokens):
    from peftko.model.builder import build_trainable
    from peftko.data.collate import PackedCollator

    built = build_trainable(base, tokenizer, tokens, peftko_config(args), precision)
    collator = PackedCollator.for_model(tokenizer, built.model.get_base_model(), precision.dtype)
    return built.model, collator, built.kernels


def train_peftko(model, args, precision, output: Path, blocks, collator, callbacks):
    from peftko.train.trainer import make_trainer

    trainer = make_trainer(model, peftko_config(args), precision, output, blocks, None, collator, callbacks=callbacks)
    trainer.train()


def preload(quant: str) -> None:
    """The slow imports (about 20 s on 2 CPU cores), done before the worker's turn; no CUDA work."""
    if quant != "none":
        import bitsandbytes  # noqa: F401  (on the CPU its import compiles kernels: ~10 s)
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import peftko.train.trainer  # noqa: F401


def run_worker(args) -> dict:
    import torch

    from peftko.model.base import load_tokenizer, pick_precision
    from peftko.data.packing import real_token_fraction
    from peftko.model import fused_loss
    from peftko.model.kernels import fused_ce_active
    from peftko.model.memory_plan import plan_memory, read_config, shape_from_config
    from peftko.model.token_rows import register_markers

    base = Path(args.base)
    precision = pick_precision(args.device)
    cuda = precision.device.type == "cuda"
    if cuda and args.card_gib:
        # Emulate a smaller card: the caching allocator may not grow past this (the CUDA context,
        # about 0.5 GiB on a real card, is not part of it).
        total = torch.cuda.get_device_properties(precision.device).total_memory
        index = precision.device.index if precision.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib * GIB / total), index)
    tokenizer = load_tokenizer(base)
    tokens = register_markers(tokenizer, MARKERS)
    blocks = make_blocks(tokenizer, tokens, args.seq_len, args.steps * args.batch_size)
    t0 = time.perf_counter()
    if args.worker != "peftko":
        model, collator, kernels = load_common(base, args, precision, tokenizer)
    else:
        model, collator, kernels = load_peftko(base, args, precision, tokenizer, tokens)
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_peak = None
    if cuda:
        torch.cuda.synchronize(precision.device)
        load_peak = torch.cuda.max_memory_allocated(precision.device) / GIB
        torch.cuda.reset_peak_memory_stats(precision.device)
    timer = step_timer(precision.device)
    error = None
    with tempfile.TemporaryDirectory(prefix="peftko-bench-run-") as out:
        train = train_peftko if args.worker == "peftko" else train_common
        profile = args.profile and cuda and args.worker == "peftko"
        callbacks = [timer] + ([step_profiler(args, precision.device)] if profile else [])
        try:
            train(model, args, precision, Path(out), blocks, collator, callbacks)
        except torch.OutOfMemoryError:
            error = "out of memory"  # a result too: this seq_len x batch does not fit
    peak = peak_reserved = None
    if cuda:
        torch.cuda.synchronize(precision.device)
        peak = torch.cuda.max_memory_allocated(precision.device) / GIB
        peak_reserved = torch.cuda.max_memory_reserved(precision.device) / GIB
    tokens_per_s = None
    measured = sorted(timer.durations[args.warmup_steps:])
    if error is None and measured:
        # The median step: robust to a neighbour's process stealing a core for one step (shared CPUs).
        median = (measured[(len(measured) - 1) // 2] + measured[len(measured) // 2]) / 2
        tokens_per_s = args.batch_size * args.seq_len / median

    shape = shape_from_config(read_config(base))
    device_name = torch.cuda.get_device_name(precision.device) if cuda else "cpu"
    peak_flops = next((f for key, f in PEAK_BF16.items() if key in device_name), None) if cuda else None
    n_params = shape.with_vocab(shape.vocab + len(MARKERS)).total_params
    plan = plan_memory(shape, quant=args.quant, seq_len=args.seq_len, batch_size=args.batch_size, lora_r=16,
                       marker_rows=len(MARKERS), compute_bytes=2 if precision.dtype != torch.float32 else 4,
                       liger=args.worker == "peftko" and fused_ce_active(model),
                       recipe="peftko" if args.worker == "peftko" else "common",
                       liger_forward=not fused_loss.installed(model.get_base_model()),
                       gradient_checkpointing=checkpoints(args) != "off",
                       offload_checkpoints=checkpoints(args) == "offload")
    return {
        "recipe": args.worker,
        "shape": args.shape,
        "device": precision.device.type,
        "device_name": device_name,
        "dtype": precision.dtype_name,
        "quant": args.quant,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "trainable_params": trainable,
        "peak_gib": _round(peak),
        "peak_reserved_gib": _round(peak_reserved),
        "load_peak_gib": _round(load_peak),
        "predicted_peak_gib": _round(plan.peak_gib),
        "predicted_load_gib": _round(plan.loading_gib),
        "tokens_per_s": _round(tokens_per_s, 1),
        "real_token_fraction": round(real_token_fraction(sum(len(b["input_ids"]) for b in blocks), len(blocks), args.seq_len), 4),
        "mfu": round(6 * n_params * tokens_per_s / peak_flops, 4) if peak_flops and tokens_per_s else None,
        "kernels": kernels,
        "loss_first": timer.losses[0] if timer.losses else None,
        "loss_last": timer.losses[-1] if timer.losses else None,
        "load_s": round(load_s, 1),
        "step_s": [round(d, 3) for d in timer.durations],
        "card_gib": args.card_gib,
        "gradient_checkpointing": checkpoints(args),
        "error": error,
    }


def checkpoints(args) -> str:
    """on, off or offload: the peftko recipe follows the switches, the common ones always checkpoint."""
    if args.worker != "peftko":
        return "on"
    return "off" if args.no_gradient_checkpointing else "offload" if args.offload_checkpoints else "on"


def _round(x, nd=3):
    return None if x is None else round(x, nd)


# --- the parent: build once, one process per recipe, JSON lines + table

def worker_command(args, role: str, base: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--base", str(base),
            "--shape", args.shape, "--device", args.device, "--steps", str(args.steps),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--quant", args.quant,
            "--liger", args.liger, "--warmup-steps", str(args.warmup_steps)] + \
        (["--card-gib", str(args.card_gib)] if args.card_gib else []) + \
        (["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else []) + \
        (["--offload-checkpoints"] if args.offload_checkpoints else []) + \
        (["--profile", args.profile] if args.profile else [])


class Child:
    """A worker process whose output goes to files (no pipe can fill up and stall it)."""

    def __init__(self, cmd: list[str], logdir: Path, name: str, wait_for_go: bool):
        self.name, self.cmd = name, cmd
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        self.ready = logdir / f"{name}.ready"
        if wait_for_go:
            cmd = [*cmd, "--ready-file", str(self.ready)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if wait_for_go else subprocess.DEVNULL,
                                         stdout=out, stderr=err, text=True, env=env)

    def finish(self, verbose: bool) -> str:
        rc = self.proc.wait()
        out, err = self.out.read_text(), self.err.read_text()
        if verbose or rc != 0:
            sys.stderr.write(f"--- {self.name} ---\n{out[-20000:]}{err[-20000:]}")
        if rc != 0:
            raise SystemExit(f"{self.name} worker failed (exit {rc})")
        return out

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_ready(children: list[Child], verbose: bool) -> None:
    """Block until every worker has imported its libraries (or one died)."""
    while not all(c.ready.exists() for c in children):
        for c in children:
            if c.proc.poll() is not None and not c.ready.exists():
                c.finish(verbose)  # raises with the worker's output
        time.sleep(0.2)


def base_dir(args) -> tuple[Path, Path | None, bool]:
    """(model directory, temp dir to remove or None, whether it must be built)."""
    temp = None
    if args.base_dir:
        base = Path(args.base_dir)
    else:
        temp = Path(tempfile.mkdtemp(prefix="peftko-bench-"))
        base = temp / args.shape
    stamp = base / "peftko-bench.json"
    reuse = stamp.is_file() and json.loads(stamp.read_text()).get("shape") == args.shape
    if not reuse and base.exists():
        shutil.rmtree(base)
    return base, temp, not reuse


def run_recipes(args) -> list[dict]:
    """Build the model (if needed) while the workers import torch & co., then run the workers one at a
    time: a worker starts loading only when the previous one has exited, so none competes with another
    for the GPU or the CPU cores while it is measured."""
    base, temp, build = base_dir(args)
    results, children = [], []
    logdir = Path(tempfile.mkdtemp(prefix="peftko-bench-logs-"))
    try:
        builder = Child(worker_command(args, "build", base), logdir, "build", False) if build else None
        children = [Child(worker_command(args, r, base), logdir, r, True) for r in args.recipe_list]
        if builder:
            builder.finish(args.verbose)
        wait_ready(children, args.verbose)
        for child in children:
            child.go()
            out = child.finish(args.verbose)
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
    finally:
        for child in children:
            child.stop()
        shutil.rmtree(logdir, ignore_errors=True)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return results


def fmt(x, spec="{:.2f}") -> str:
    return "n/a" if x is None else spec.format(x)


def table(results: list[dict]) -> str:
    lines = ["| recipe | shape | device | trainable params | tokens/s | peak GiB | predicted GiB | load peak GiB | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = r["error"] or fmt(r["tokens_per_s"], "{:,.0f}")
        lines.append(f"| {r['recipe']} | {r['shape']} | {r['device_name']} | {r['trainable_params']:,} | "
                     f"{speed} | {fmt(r['peak_gib'])} | {fmt(r['predicted_peak_gib'])} | "
                     f"{fmt(r['load_peak_gib'])} | {fmt(r['mfu'], '{:.1%}')} |")
    by = {r["recipe"]: r for r in results}
    p = by.get("peftko")
    baselines = [by[b] for b in RECIPES if b != "peftko" and b in by and by[b]["tokens_per_s"]]
    if p and p["tokens_per_s"] and baselines:
        lines += ["", "| peftko / baseline | tokens/s | peak memory | trainable params |", "|---|---|---|---|"]
        for c in baselines:
            memory = p["peak_gib"] / c["peak_gib"] if p["peak_gib"] and c["peak_gib"] else None
            lines.append(f"| peftko / {c['recipe']} | {p['tokens_per_s'] / c['tokens_per_s']:.2f}x | "
                         f"{fmt(memory, '{:.2f}x')} | {p['trainable_params'] / c['trainable_params']:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "build":
        build_base(args.shape, Path(args.base), args.device)
        return 0
    if args.worker:
        preload(args.quant)
        if args.ready_file:
            Path(args.ready_file).touch()
            sys.stdin.readline()  # the parent's go: the previous recipe has finished
        result = run_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = run_recipes(args)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
