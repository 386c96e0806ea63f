#!/usr/bin/env bash
# peftko on one CUDA card, in one pass (about 8 minutes on one H100/H200), highest value first:
#   1. the CUDA-only tests (`pytest -m gpu`: lora-train in 4-bit/8-bit/bf16 with Liger on and off,
#      fp16 + GradScaler + the non-finite guard, a real out-of-memory, eval/generate/merge on CUDA,
#      peftko's fused loss against the model's own, offloaded checkpoints);
#   2. peftko's own commands end to end on the Llama-3.2-1B shape: --dry-run, lora-train (4-bit,
#      held-out split, checkpoints), merge with its self-check, eval of the merged model;
#   3. benchmarks/recipes.py, the common recipe (with and without the Trainer's autocast) against
#      peftko, on the 1B and the 8B shapes, with a profile of one step of each;
#   4. what fits a 12 GiB and a 24 GiB card on the 8B shape (allocator capped), with and without
#      offloaded checkpoints, and the 1B shape without gradient checkpointing.
# Alongside the GPU tests, the CPU test suite runs on the host's CPU with the GPU hidden (stage
# "cpu"): the whole suite where pytest-xdist is installed, else the files whose path depends on the
# CPU (bitsandbytes' AVX512-BF16 kernel).
# Random weights with real shapes and 128,256-row vocabularies; every stage has its own timeout
# and is skipped (saying so) when the budget is spent. The two bases are written in the background
# while the tests run.
#
#   bash benchmarks/gpu_check.sh                       # results under $OUT (or /tmp/peftko-gpu-check)
#   BUDGET_S=500 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#   STAGES="pytest cli" bash benchmarks/gpu_check.sh    # a subset: cpu, pytest, cli, recipes, fit
#
# Needs: a CUDA build of torch, transformers, peft, bitsandbytes, datasets; liger-kernel + triton for
# the Liger rows (pip install 'peftko[gpu]'). The bases (16 GB for 8B) go to $WORK, not $OUT.
set -u
PY=${PYTHON:-$(command -v python || command -v python3)}
RESULTS=${OUT:-/tmp/peftko-gpu-check}
WORK=${WORK:-/tmp/peftko-gpu-work}
BASES=$WORK/bases
BUDGET_S=${BUDGET_S:-500}
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$RESULTS" "$BASES"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PEFTKO_HOME=$WORK/home
SUMMARY=$RESULTS/summary.md LOG=$RESULTS/full.log JSONL=$RESULTS/recipes.jsonl
: > "$SUMMARY"; : > "$LOG"; : > "$JSONL"

STAGES=${STAGES:-cpu pytest cli recipes fit}
want() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME NEED_S MAX_S CMD...: run CMD under min(MAX_S, what is left); full output to full.log,
# its last lines (and the exit code) to summary.md.
stage() {
    local name=$1 need=$2 max=$3; shift 3
    local t; t=$(left)
    if [ "$t" -lt "$need" ]; then say "## $name: skipped, $t s left of the budget (needs about $need s)"; return 1; fi
    [ "$t" -gt "$max" ] && t=$max
    local t0; t0=$(date +%s)
    echo "## $name ($(date -u +%H:%M:%S))" >> "$LOG"
    timeout --kill-after=10 "$t" "$@" > "$WORK/$name.out" 2>&1
    local rc=$?
    cat "$WORK/$name.out" >> "$LOG"
    say "## $name: exit $rc in $(( $(date +%s) - t0 )) s"
    grep -v -e '^ *$' -e 'it/s\]' -e 's/it\]' "$WORK/$name.out" | tail -n "${TAIL:-12}" >> "$SUMMARY"
    return $rc
}

recipes() {  # recipes NAME NEED_S ARGS...: one benchmarks/recipes.py run; its JSON lines go to recipes.jsonl
    local name=$1 need=$2; shift 2
    TAIL=8 stage "$name" "$need" 400 "$PY" benchmarks/recipes.py --device cuda "$@"
    grep '^{"recipe"' "$WORK/$name.out" | sed "s/^{/{\"stage\": \"$name\", /" >> "$JSONL"
}

{
    echo "# peftko GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" - <<'PYEOF'
import importlib, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
for m in ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "liger_kernel", "triton", "pyarrow"):
    try:
        print(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:  # a missing package is a result here, not a crash
        print(f"{m}: {type(e).__name__}: {e}")
PYEOF
} 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device: stop"; exit 1; }

# The bases, written while the tests run (the card is barely used by either).
"$PY" benchmarks/recipes.py --worker build --shape 1b --base "$BASES/1b" --device cuda > "$WORK/build-1b.out" 2>&1 &
BUILD_1B=$!
"$PY" benchmarks/recipes.py --worker build --shape 8b --base "$BASES/8b" --device cuda > "$WORK/build-8b.out" 2>&1 &
BUILD_8B=$!
want recipes || want fit || { kill $BUILD_8B 2>/dev/null; wait $BUILD_8B 2>/dev/null; }

# 0. (background) The CPU tests on this host's CPU, GPU hidden: the whole suite in 6 processes when
#    pytest-xdist is installed (some 10 minutes in one), else the files whose path depends on the CPU.
#    Waited for before the timed stages. Tests needing what this host lacks (the llama.cpp sdist,
#    matplotlib, tensorboard) skip or fail on that alone: read the failures' causes.
if want cpu; then
    grep -o -w -e avx512_bf16 -e amx_bf16 -e avx512f /proc/cpuinfo | sort -u | tr '\n' ' ' > "$WORK/cpu-flags.txt"
    say "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) flags: $(cat "$WORK/cpu-flags.txt")"
    if "$PY" -c "import xdist" 2>/dev/null; then CPU_SET=(-n 6 tests/) CPU_THREADS=2
    else CPU_SET=(tests/test_eval_side_effects.py tests/test_train_merge.py tests/test_fused_loss.py) CPU_THREADS=6; fi
    say "cpu tests (GPU hidden): ${CPU_SET[*]}"
    CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=$CPU_THREADS timeout 420 "$PY" -m pytest -q -p no:cacheprovider \
        -o addopts="-ra" -m "not gpu" "${CPU_SET[@]}" > "$WORK/cpu-tests.out" 2>&1 &
    CPU_TESTS=$!
fi

# 1. Every CUDA-only test.
want pytest && TAIL=25 stage pytest-gpu 60 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" \
    tests/test_cuda.py tests/test_kernels.py tests/test_fused_loss.py
# 2. The commands themselves on the 1B shape.
wait $BUILD_1B; say "1B base written: exit $? ($(du -sh "$BASES/1b" | cut -f1))"
if want cli; then
RUN=$WORK/run-1b
TRAIN=(-m peftko lora-train --model "$BASES/1b" --data peftko/sample_corpus --output "$RUN" --device cuda
       --quant 4bit --seq-len 2048 --batch-size 4 --grad-accum 1 --max-steps 8 --save-steps 4 --eval-steps 4
       --val-fraction 0.1 --logging-steps 2)
TAIL=20 stage cli-dry-run-1b 30 60 "$PY" "${TRAIN[@]}" --dry-run
TAIL=20 stage cli-train-1b 60 180 "$PY" "${TRAIN[@]}" && {
    TAIL=10 stage cli-merge-1b-bf16 40 150 "$PY" -m peftko merge "$RUN" --output "$WORK/merged-1b-bf16"
    TAIL=6 stage cli-eval-merged-1b 20 90 "$PY" -m peftko eval "$WORK/merged-1b-bf16" --data peftko/sample_corpus \
        --device cuda --seq-len 2048 --json
}
fi

if want cpu; then
    wait $CPU_TESTS; say "## cpu tests (GPU hidden): exit $?"
    grep -e '^FAILED' -e '^ERROR' "$WORK/cpu-tests.out" | head -n 20 | tee -a "$SUMMARY"
    tail -n 3 "$WORK/cpu-tests.out" | tee -a "$SUMMARY"
    cat "$WORK/cpu-tests.out" >> "$LOG"
fi

if want recipes; then
# 3. The common recipe (with and without autocast) vs peftko, 4 x 2048 tokens a step, each in its own
#    process, with a profile of the last step of each.
#    The 8B base must be written first: writing 15 GB beside the 1B runs slowed their short,
#    launch-bound steps by a quarter (benchmarks/RESULTS.md, run 3).
wait $BUILD_8B; say "8B base written: exit $? ($(du -sh "$BASES/8b" | cut -f1))"
recipes 1b 90 --shape 1b --steps 6 --recipes common,common-noamp,peftko --base-dir "$BASES/1b" \
    --profile "$RESULTS/profile-1b"
recipes 8b 150 --shape 8b --steps 5 --recipes common,common-noamp,peftko --base-dir "$BASES/8b" \
    --profile "$RESULTS/profile-8b"
fi
if want fit; then
wait $BUILD_8B
# 4. What fits: the 8B shape with the allocator capped as a 12 / 24 GiB card would be (less 0.5 GiB
#    of CUDA context), offloaded checkpoints against plain; then the 1B shape with every activation kept.
P8=(--shape 8b --recipes peftko --steps 4 --warmup-steps 1 --base-dir "$BASES/8b")
# The 24 GiB rows first: the 12 GiB rows and the others were measured in runs 3 and 4
# (benchmarks/RESULTS.md). A 6 x 8192 step takes about 9 s.
recipes 8b-24g-offload-6x8192 80 "${P8[@]}" --card-gib 23.5 --seq-len 8192 --batch-size 6 --offload-checkpoints
recipes 8b-24g-3x8192 50 "${P8[@]}" --card-gib 23.5 --seq-len 8192 --batch-size 3
recipes 8b-12g-offload-2x8192 40 "${P8[@]}" --card-gib 11.5 --seq-len 8192 --batch-size 2 --offload-checkpoints
recipes 8b-12g-1x8192 40 "${P8[@]}" --card-gib 11.5 --seq-len 8192 --batch-size 1
recipes 8b-offload-4x2048 40 "${P8[@]}" --offload-checkpoints
recipes 1b-no-gc 30 --shape 1b --recipes peftko --steps 6 --base-dir "$BASES/1b" --no-gradient-checkpointing
fi

say "done in $(($(date +%s) - START)) s"
"$PY" - "$JSONL" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| stage | recipe | tokens | checkpoints | trainable | tokens/s | train peak GiB (reserved) | predicted | load peak GiB | predicted load | MFU | loss first/last |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda x, s="{:.2f}": "n/a" if x is None else s.format(x)
for r in rows:
    print(f"| {r['stage']} | {r['recipe']} | {r['batch_size']}x{r['seq_len']} | {r.get('gradient_checkpointing')} | "
          f"{r['trainable_params']:,} | {r['error'] or f(r['tokens_per_s'], '{:,.0f}')} | "
          f"{f(r['peak_gib'])} ({f(r['peak_reserved_gib'])}) | {f(r['predicted_peak_gib'])} | "
          f"{f(r['load_peak_gib'])} | {f(r['predicted_load_gib'])} | {f(r['mfu'], '{:.1%}')} | "
          f"{f(r['loss_first'], '{:.3f}')}/{f(r['loss_last'], '{:.3f}')} |")
PYEOF
