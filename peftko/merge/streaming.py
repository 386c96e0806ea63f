"""Merging an adapter tensor by tensor, in memory bounded by one tensor, not by the model.

The whole-model merge (load the base, peft's `merge_and_unload()`, save) needs the base in RAM:
about 16 GB for an 8B model in bf16. Here each base tensor is read from its safetensors file
through a memory map, merged, rounded once to the output dtype and written straight into the
output file; the next tensor replaces it. Peak memory: the largest tensor (in fp32, to add the
delta) plus the adapter.

What each tensor becomes is what `merge_and_unload()` gives:
  - a LoRA target: W + scaling * (B @ A) (transposed for fan_in_fan_out), the delta in fp32 as
    peft computes it, rounded once to the output dtype;
  - an embedding (input, and output unless tied): grown to the row count training used
    (peftko.json vocab.rows_after); the marker rows replaced by the trained ones
    (peft's `trainable_tokens_delta` holds whole rows, not differences);
  - a peft `modules_to_save` copy: replaces the base tensor;
  - anything else: the base tensor in the output dtype.
Rows grown beyond the markers (a base whose tokenizer had more ids than rows) are never trained;
transformers initialises them from N(0, initializer_range), and so does this, with a fixed seed.

Anything this cannot map one to one (weights stored under other names than the model's, no
safetensors, DoRA, LoRA on embeddings) raises StreamingUnsupported: the caller merges in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftko.core.atomic import write_json_atomic
from peftko.core.errors import UserError
from peftko.core.progress import phase

PEFT_PREFIX = "base_model.model."
DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # as `merge` wrote before (save_pretrained's max_shard_size="5GB")
PROBES = 4  # random vectors per LoRA target in the self-check
# Relative error of W'x against Wx + scale*B(Ax): fp32 differs only by summation order; bf16/fp16
# round each weight once (2^-9 / 2^-12 relative), which a sum over a row averages down.
PROBE_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
NEW_ROW_SEED = 0

# safetensors' dtype names (its format specification); the library serialises only whole dicts.
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class StreamingUnsupported(Exception):
    """This base or adapter cannot be merged tensor by tensor; the message says why."""


@dataclass
class Layout:
    """Where each base tensor lives and which ones are the embeddings."""

    files: dict[str, Path]  # tensor name -> safetensors file, in the base's order
    input_key: str  # the input embedding's weight
    output_keys: list[str]  # the output embedding's weight, unless tied
    tied_keys: list[str]  # the output embedding's name(s) when tied: never written (save_pretrained drops them)
    keep_fp32: set[str]  # tensors the model class keeps in fp32 whatever the dtype
    init_std: float
    # Weights of transformers' Conv1D (GPT-2), stored (in, out): peft merges them transposed
    # (fan_in_fan_out), whatever adapter_config.json says, and square ones cannot be told by shape.
    conv1d: set[str] = field(default_factory=set)


@dataclass
class LoraTarget:
    a: str
    b: str
    scaling: float
    fan_in_fan_out: bool


@dataclass
class AdapterPlan:
    path: Path  # adapter_model.safetensors
    lora: dict[str, LoraTarget] = field(default_factory=dict)  # base tensor -> its LoRA pair
    rows: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # embedding -> (ids, delta key)
    replace: dict[str, str] = field(default_factory=dict)  # base tensor -> modules_to_save copy
    replace_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class MergeReport:
    files: list[str]  # weight files written (shards and index)
    tensors: int
    lora_targets: int
    marker_rows: int
    worst_probe_error: float  # the largest relative error of the self-check


# ---------------------------------------------------------------- reading the base and the adapter


def base_files(base: Path) -> dict[str, Path]:
    """Tensor name -> file, from the sharded index or the single model.safetensors."""
    from safetensors import safe_open

    index = base / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {index}: {e}. Restore the base's index file.") from None
        return {name: base / weight_map[name] for name in weight_map}
    single = base / "model.safetensors"
    if not single.is_file():
        raise StreamingUnsupported(f"{base} has no model.safetensors or {INDEX}")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def read_layout(base: Path, remote_code: bool) -> Layout:
    """The base's tensors, and its embeddings found by identity on a weightless (meta) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = base_files(base)
    config = AutoConfig.from_pretrained(base, trust_remote_code=remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(model.state_dict())
    unknown = sorted(set(files) - expected)
    if unknown:  # transformers renames these on load (a checkpoint conversion): no 1:1 mapping
        raise StreamingUnsupported(f"the base stores {unknown[0]}, which the model names otherwise")
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    names_of = lambda w: [n for n, p in params.items() if p is w]  # noqa: E731
    input_key = names_of(inp)[0]
    out_names = [] if out is None else [n for n in names_of(out.weight) if n != input_key]
    tied = out is not None and out.weight is inp
    missing = sorted(n for n in params if n not in files and not (tied and n in out_names))
    if missing:
        raise StreamingUnsupported(f"the base's files lack {missing[0]}")
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    keep = {n for n in files if any(part in fp32 for part in n.split("."))}
    from transformers.pytorch_utils import Conv1D

    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return Layout(files, input_key, [] if tied else out_names, out_names if tied else [], keep,
                  float(getattr(config.get_text_config(), "initializer_range", 0.02)), conv1d)


def read_adapter_plan(run_dir: Path, layout: Layout) -> AdapterPlan:
    """Map every adapter tensor to the base tensor it changes."""
    from peft.utils.other import get_pattern_key
    from safetensors import SafetensorError, safe_open

    cfg = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias"):
        raise StreamingUnsupported("the adapter is not plain LoRA (DoRA or a LoRA bias)")
    path = run_dir / "adapter_model.safetensors"
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
    except (SafetensorError, OSError) as e:  # a run saved before its hash was recorded
        raise UserError(f"cannot read {path}: {e}. It was cut short or damaged: restore it, or train again.") from None
    plan = AdapterPlan(run_dir / "adapter_model.safetensors")
    token_ids = cfg.get("trainable_token_indices")
    for key in keys:
        if not key.startswith(PEFT_PREFIX):
            raise StreamingUnsupported(f"unexpected adapter tensor {key}")
        name = key[len(PEFT_PREFIX):]
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
            alpha = cfg.get("alpha_pattern") or {}
            alpha = alpha.get(get_pattern_key(alpha.keys(), module), cfg["lora_alpha"])
            r = shapes[key][0]
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            weight = f"{module}.weight"
            plan.lora[weight] = LoraTarget(key, b_key, scaling,
                                           bool(cfg.get("fan_in_fan_out")) or weight in layout.conv1d)
        elif name.endswith(".lora_B.weight"):
            continue
        elif name.endswith(DELTA_SUFFIX):
            module = name[: -len(DELTA_SUFFIX)]
            ids = token_ids if isinstance(token_ids, list) else (token_ids or {}).get(module.rsplit(".", 1)[-1])
            if ids is None or len(ids) != shapes[key][0]:
                raise UserError(f"{run_dir / 'adapter_config.json'}: trainable_token_indices does not list the "
                                f"{shapes[key][0]} rows of {key}; the adapter folder is damaged. Train again.")
            plan.rows[f"{module}.weight"] = (list(ids), key)
        elif name in layout.files and cfg.get("modules_to_save"):
            plan.replace[name] = key
            plan.replace_shapes[name] = shapes[key]
        else:
            raise StreamingUnsupported(f"the adapter tensor {key} has no streaming merge")
    for target in [*plan.lora, *plan.rows]:
        if target not in layout.files:
            raise StreamingUnsupported(f"the adapter changes {target}, which the base's files do not hold")
    return plan


# ---------------------------------------------------------------- merging one tensor


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of a memory map that is closed again at once: pages of the file
    touched through a map that stays open count as this process's memory until it is unmapped."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def lora_delta(plan: AdapterPlan, t: LoraTarget) -> torch.Tensor:
    """scaling * B @ A in fp32, in peft's order of operations (LoraLayer.get_delta_weight)."""
    delta = read_tensor(plan.path, t.b).float() @ read_tensor(plan.path, t.a).float()
    return (delta.T if t.fan_in_fan_out else delta) * t.scaling


def out_dtype(name: str, base_dtype: torch.dtype, dtype: torch.dtype, layout: Layout) -> torch.dtype:
    if not base_dtype.is_floating_point:
        return base_dtype
    return torch.float32 if name in layout.keep_fp32 else dtype


def merged_tensor(name: str, layout: Layout, plan: AdapterPlan, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if name in plan.replace:
        return read_tensor(plan.path, plan.replace[name]).to(out_dtype(name, torch.float32, dtype, layout))
    base = read_tensor(layout.files[name], name)
    target = out_dtype(name, base.dtype, dtype, layout)
    if name in plan.lora:
        w = base.float()
        del base
        w += lora_delta(plan, plan.lora[name])  # in fp32, then ONE rounding below
        return w.to(target)
    w = base.to(target)
    if name in (layout.input_key, *layout.output_keys) and w.shape[0] < rows:
        w = grow_rows(w, rows, layout.init_std)
    if name in plan.rows:
        ids, key = plan.rows[name]
        w[torch.tensor(ids)] = read_tensor(plan.path, key).to(target)  # whole trained rows, as peft's merge
    return w


def grow_rows(w: torch.Tensor, rows: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(NEW_ROW_SEED)
    new = torch.empty((rows - w.shape[0], *w.shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=gen)
    return torch.cat([w, new.to(w.dtype)])


def finite(w: torch.Tensor, name: str, plan: AdapterPlan) -> torch.Tensor:
    """`w`, unless it holds NaN or inf, which no merged model may: refused, naming where it came from."""
    if not w.is_floating_point() or bool(torch.isfinite(w).all()):
        return w
    bad = int((~torch.isfinite(w)).sum())
    source = ("the adapter's trained marker rows" if name in plan.rows else
              "the adapter's LoRA matrices" if name in plan.lora else
              "the adapter's copy" if name in plan.replace else "the base")
    raise UserError(f"merge refused: {name} would hold {bad:,} NaN or inf values, from {source}; nothing was "
                    "written. Restore the adapter (or the base) from a good copy, or train again.")


# ---------------------------------------------------------------- writing shards


@dataclass
class Entry:
    name: str
    dtype: torch.dtype
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_entries(layout: Layout, plan: AdapterPlan, rows: int, dtype: torch.dtype) -> list[Entry]:
    """Every output tensor's name, dtype and shape, known before any is computed, grouped by input file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in layout.files.items():
        if name not in layout.tied_keys:
            by_file.setdefault(path, []).append(name)
    entries = []
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in names:
                sl = f.get_slice(name)
                base_dtype = st_dtype(sl.get_dtype())
                if name in plan.replace:
                    shape = plan.replace_shapes[name]
                    base_dtype = torch.float32
                else:
                    shape = sl.get_shape()
                    if name in (layout.input_key, *layout.output_keys) and shape[0] < rows:
                        shape = [rows, *shape[1:]]
                entries.append(Entry(name, out_dtype(name, base_dtype, dtype, layout), list(shape)))
    return entries


def st_dtype(name: str) -> torch.dtype:
    for dt, st in ST_DTYPES.items():
        if st == name:
            return dt
    raise StreamingUnsupported(f"the base holds a tensor of dtype {name}")


def split_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' names, so loaders and converters find them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """One safetensors file written tensor by tensor (the library serialises only a whole dict
    held in memory). Every shape is known first, so the header goes first: an 8-byte little-endian
    length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back."""

    def __init__(self, path: Path, entries: list[Entry]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for e in entries:
            header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": e.shape,
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.pending = path, list(entries)
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, tensor: torch.Tensor) -> None:
        e = self.pending.pop(0)
        if tensor.dtype != e.dtype or list(tensor.shape) != e.shape:  # a bug here would corrupt the file
            raise RuntimeError(f"{e.name}: got {tensor.dtype} {list(tensor.shape)}, planned {e.dtype} {e.shape}")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors were not written")


def write_index(stage: Path, shards: list[list[Entry]], names: list[str]) -> None:
    weight_map = {e.name: n for shard, n in zip(shards, names) for e in shard}
    entries = [e for shard in shards for e in shard]
    write_json_atomic(stage / INDEX, {
        "metadata": {"total_parameters": sum(math.prod(e.shape) for e in entries),
                     "total_size": sum(e.nbytes for e in entries)},
        "weight_map": dict(sorted(weight_map.items())),
    })


def write_weights(stage: Path, layout: Layout, plan: AdapterPlan, rows: int, dtype: torch.dtype,
                  max_shard_bytes: int) -> tuple[list[Entry], list[str]]:
    entries = plan_entries(layout, plan, rows, dtype)
    shards = split_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    with phase("merge", len(entries), "tensors") as progress:
        for shard, name in zip(shards, names):
            writer = ShardWriter(stage / name, shard)
            try:
                for e in shard:
                    writer.write(finite(merged_tensor(e.name, layout, plan, rows, dtype), e.name, plan))
                    progress.advance()
            except BaseException:
                writer.file.close()  # the staging folder goes; this error, not "not written", is the news
                raise
            writer.close()
    if len(shards) > 1:
        write_index(stage, shards, names)
        names = [*names, INDEX]
    return entries, names


# ---------------------------------------------------------------- self-check, one tensor at a time


def check_weights(stage: Path, entries: list[Entry], layout: Layout, plan: AdapterPlan, rows: int,
                  dtype_name: str) -> float:
    """Read back what was written and check every tensor against the base and the adapter:
    LoRA targets on random probes (W'x against Wx + scale*B(Ax)), marker rows equal to the trained
    rows, every other row and tensor equal to the base's. Returns the worst probe error."""
    out_files = base_files(stage)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with phase("self-check", len(entries), "tensors") as progress:
        for e in entries:
            worst = max(worst, check_tensor(e, read_tensor(out_files[e.name], e.name), layout, plan, dtype_name, gen))
            progress.advance()
    return worst


def check_tensor(e: Entry, out: torch.Tensor, layout: Layout, plan: AdapterPlan, dtype_name: str, gen) -> float:
    """One written tensor against what it should hold; the probe error for a LoRA target, else 0."""
    if e.name in plan.replace:
        expect_equal(out, read_tensor(plan.path, plan.replace[e.name]).to(e.dtype), e.name)
    elif e.name in plan.lora:
        err = probe_error(out, read_tensor(layout.files[e.name], e.name), plan, plan.lora[e.name], gen)
        if not err <= PROBE_TOLERANCE[dtype_name]:
            raise UserError(f"merge self-check failed on {e.name}: W'x differs from Wx + scale*B(Ax) by "
                            f"{err:.2e} (limit {PROBE_TOLERANCE[dtype_name]:.0e}); nothing was written. "
                            "Try --dtype float32.")
        return err
    elif e.name in (layout.input_key, *layout.output_keys):
        check_embedding(out, read_tensor(layout.files[e.name], e.name).to(e.dtype), plan, e.name)
    else:
        expect_equal(out, read_tensor(layout.files[e.name], e.name).to(e.dtype), e.name)
    return 0.0


def check_embedding(out: torch.Tensor, base: torch.Tensor, plan: AdapterPlan, name: str) -> None:
    """The base's rows kept, the marker rows trained; grown rows past the markers are never trained."""
    ids, key = plan.rows.get(name, ([], None))
    kept = torch.ones(base.shape[0], dtype=torch.bool)
    kept[[i for i in ids if i < base.shape[0]]] = False
    expect_equal(out[: base.shape[0]][kept], base[kept], name)
    if key is not None:
        expect_equal(out[ids], read_tensor(plan.path, key).to(out.dtype), f"the marker rows of {name}")


def probe_error(out: torch.Tensor, base: torch.Tensor, plan: AdapterPlan, t: LoraTarget, gen) -> float:
    x = torch.randn(out.shape[1], PROBES, generator=gen)
    a, b = read_tensor(plan.path, t.a).float(), read_tensor(plan.path, t.b).float()
    lora = a.T @ (b.T @ x) if t.fan_in_fan_out else b @ (a @ x)
    want = base.float() @ x + t.scaling * lora
    got = out.float() @ x
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def expect_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not torch.equal(got, want):
        raise UserError(f"merge self-check failed: {what} in the written model differs from what it "
                        "should hold; nothing was written. Check the disk, then merge again.")


# ---------------------------------------------------------------- the whole merge


def stream_merge(run_dir: Path, base: Path, rows: int, dtype_name: str, stage: Path, remote_code: bool = False,
                 max_shard_bytes: int = SHARD_BYTES) -> MergeReport:
    """Write the merged weights (shards, and the index when there are several) into `stage`, and
    check them. Raises StreamingUnsupported before writing anything when this base or adapter needs
    the whole-model merge."""
    layout = read_layout(base, remote_code)
    plan = read_adapter_plan(run_dir, layout)
    entries, names = write_weights(stage, layout, plan, rows, getattr(torch, dtype_name), max_shard_bytes)
    worst = check_weights(stage, entries, layout, plan, rows, dtype_name)
    marker_rows = sum(len(ids) for ids, _ in plan.rows.values())
    return MergeReport(names, len(entries), len(plan.lora), marker_rows, worst)
