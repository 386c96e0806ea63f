#!/usr/bin/env python
"""Peak memory and time of `peftko merge` against base size: the whole-model merge vs the streaming one.

    python benchmarks/merge_memory.py                      # bases of about 0.5, 1 and 2 GB
    python benchmarks/merge_memory.py --sizes 0.05 --workdir /tmp/m
    python benchmarks/merge_memory.py --sizes 8 --paths new   # the streaming merge alone

Each base is a random Llama in bf16 (hidden 2048, MLP 5632, 16 heads, vocabulary padded to 32,000
rows as Qwen pads it, untied head), as many layers as the size asks for, written in shards of at
most 200 MB with a model.safetensors.index.json, as a hub checkpoint is. Its adapter is a random
LoRA (r=16, alpha=32, every linear layer) with 7 marker rows in the input and output embeddings,
in peft's file layout, beside a tokenizer with the markers registered. Nothing is trained: the
merge reads the same files either way.

Each (size, path) runs in a fresh process (this script with --child), bf16 output, so its peak
belongs to that merge alone:
  old   what `peftko merge` did before: load the base, apply the adapter with peft, compare logits
        on the marker sentences, merge_and_unload(), save_pretrained (peftko.merge.in_memory.merge_and_check).
  new   the streaming merge (peftko.merge.streaming.stream_merge, with its per-tensor self-check)
        and config.json / generation_config.json (peftko.merge.model_files.write_config).
Peak RSS is the child's VmHWM (/proc/self/status); `after imports` is its value before the merge
starts (torch, transformers and peft loaded), so the merge's own share is the difference. The
output is deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GB = 10**9
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000, tie_word_embeddings=False)
MARKERS = ["|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>",
           "|START_OF_DIALOGUE|>", "|END_OF_DIALOGUE|>", "|SOUND|>"]
SHARD = 200 * 10**6
RANK = 16
PATHS = ("old", "new")


def layers_for(size_gb: float) -> int:
    h, m, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    per_layer = 2 * (4 * h * h + 3 * h * m)  # bf16 bytes
    return max(1, round((size_gb * GB - 2 * 2 * v * h) / per_layer))


def make_base(folder: Path, layers: int) -> dict:
    """A random bf16 Llama written shard by shard (never whole in memory), and its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftko.model.tiny_base import sample_texts, train_tokenizer

    folder.mkdir(parents=True)
    tokenizer = train_tokenizer(sample_texts())
    config = LlamaConfig(num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16", **SHAPE)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    parts: list[list[str]] = []  # tensor names per shard, in order
    current: dict = {}

    def flush():
        save_file(current, folder / f"part-{len(parts)}.safetensors", metadata={"format": "pt"})
        parts.append(list(current))
        current.clear()

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * (1.0 if name.endswith("norm.weight") else 0.02)).to(torch.bfloat16)
        if current and sum(v.numel() * 2 for v in current.values()) + t.numel() * 2 > SHARD:
            flush()
        current[name] = t
    flush()
    weight_map = {}
    for i, names in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(folder / f"part-{i}.safetensors", folder / final)
        weight_map.update({n: final for n in names})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return shapes


def make_adapter(run: Path, base: Path, shapes: dict) -> dict:
    """A random LoRA + marker rows in peft's layout, with the tokenizer and manifest merge reads."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from peftko.model.token_rows import register_markers

    run.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [t.id for t in register_markers(tokenizer, MARKERS)]
    tokenizer.save_pretrained(run)
    gen = torch.Generator().manual_seed(1)
    tensors, targets = {}, []
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and ".layers." in name:
            targets.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=gen) * 0.01
    for module in ("model.embed_tokens", "lm_head"):
        tensors[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"] = (
            torch.randn(len(ids), SHAPE["hidden_size"], generator=gen) * 0.02)
    save_file(tensors, run / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, task_type="CAUSAL_LM",
                        trainable_token_indices={"embed_tokens": ids, "lm_head": ids})
    config.save_pretrained(run)
    manifest = {"base_model": str(base), "base_fingerprint": {},
                "markers": [{"marker": m, "id": i} for m, i in zip(MARKERS, ids)],
                "config": {"doc_end_marker": "|END_OF_BOOK|>"},
                "vocab": {"rows_after": SHAPE["vocab_size"]}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def peak_mib() -> float:
    """VmHWM: this process image's RSS high-water mark. (getrusage's ru_maxrss keeps the parent's
    peak across exec, and the parent generated the base.)"""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(path: str, run: Path, base: Path, out: Path) -> None:
    import torch  # noqa: F401  (imports count in the baseline, not in the merge)
    import transformers  # noqa: F401
    import peft  # noqa: F401

    from peftko.merge.in_memory import merge_and_check
    from peftko.merge.model_files import write_config
    from peftko.run.records import RunRecord

    manifest = RunRecord.from_json(json.loads((run / "manifest.json").read_text()), run / "manifest.json")
    out.mkdir(parents=True)
    before = peak_mib()
    start = time.perf_counter()
    if path == "old":
        model, _ = merge_and_check(run, base, manifest, "bfloat16")
        model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    else:
        from peftko.merge.streaming import stream_merge

        stream_merge(run, base, manifest.vocab.rows_after, "bfloat16", out)
        write_config(base, manifest, "bfloat16", out)
    seconds = time.perf_counter() - start
    print(json.dumps({"imports_mib": before, "peak_mib": peak_mib(), "seconds": seconds}))


def measure(path: str, run: Path, base: Path, workdir: Path) -> dict:
    out = workdir / f"out-{path}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", path, "--run", str(run), "--base", str(base),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{path} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2], help="base sizes in GB")
    ap.add_argument("--workdir", type=Path, help="where bases are written (default: a temp dir, removed)")
    ap.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"],
                    help="hidden size (the MLP is 2.75x); smaller only to check that the script runs")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                    help="which merges to measure (the old one holds the whole model in memory)")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.run, args.base, args.out)
    if args.hidden_size < 1 or args.hidden_size % SHAPE["num_attention_heads"]:
        ap.error(f"--hidden-size must be a positive multiple of {SHAPE['num_attention_heads']} (the heads)")
    SHAPE.update(hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 11 // 4)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peftko-merge-bench-"))
    print(f"machine: {machine()}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| base GB | shards | largest tensor MB | path | peak RSS MiB | after imports MiB | merge share MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for size in args.sizes:
            base, run = workdir / f"base-{size}", workdir / f"run-{size}"
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            shapes = make_base(base, layers_for(size))
            make_adapter(run, base, shapes)
            on_disk = sum(p.stat().st_size for p in base.glob("*.safetensors")) / GB
            shards = len(list(base.glob("*.safetensors")))
            largest = max(math.prod(s) for s in shapes.values()) * 2 / 10**6
            for path in args.paths:
                r = measure(path, run, base, workdir)
                print(f"| {on_disk:.2f} | {shards} | {largest:.0f} | {path} | {r['peak_mib']:.0f} | "
                      f"{r['imports_mib']:.0f} | {r['peak_mib'] - r['imports_mib']:.0f} | {r['seconds']:.1f} |",
                      flush=True)
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
