#!/usr/bin/env bash
# peftko on one CUDA card, in one pass (about 9 minutes on one H100/H200), highest value first:
#   1. the CUDA-only tests (`pytest -m gpu`: lora-train in 4-bit/8-bit/bf16 with Liger on and off,
#      fp16 + GradScaler + the non-finite guard, a real out-of-memory, eval/generate/merge on CUDA);
#   2. peftko's own commands end to end on the Llama-3.2-1B shape: --dry-run, lora-train (4-bit,
#      held-out split, checkpoints), merge with its self-check, eval of the merged model;
#   3. benchmarks/recipes.py, the common recipe against peftko, on the 1B and the 8B shapes;
#   4. the 8B shape alone at longer sequences (what fits 12 / 24 GiB).
# Random weights with real shapes and 128,256-row vocabularies; every stage has its own timeout
# and is skipped (saying so) when the budget is spent. The two bases are written in the background
# while the tests run.
#
#   bash benchmarks/gpu_check.sh                       # results under $OUT (or /tmp/peftko-gpu-check)
#   BUDGET_S=500 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#   STAGES="pytest cli" bash benchmarks/gpu_check.sh    # a subset: pytest, cli, recipes, long
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

STAGES=${STAGES:-pytest cli recipes long}
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
want recipes || want long || { kill $BUILD_8B 2>/dev/null; wait $BUILD_8B 2>/dev/null; }

# 1. Every CUDA-only test.
want pytest && TAIL=25 stage pytest-gpu 60 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" \
    tests/test_cuda.py tests/test_kernels.py

# 2. The commands themselves on the 1B shape.
wait $BUILD_1B; say "1B base written: exit $? ($(du -sh "$BASES/1b" | cut -f1))"
if want cli; then
RUN=$WORK/run-1b
TRAIN=(-m peftko lora-train --model "$BASES/1b" --data peftko/sample_corpus --output "$RUN" --device cuda
       --quant 4bit --seq-len 2048 --batch-size 4 --grad-accum 1 --max-steps 8 --save-steps 4 --eval-steps 4
       --val-fraction 0.1 --logging-steps 2)
TAIL=20 stage cli-dry-run-1b 30 60 "$PY" "${TRAIN[@]}" --dry-run
TAIL=20 stage cli-train-1b 60 180 "$PY" "${TRAIN[@]}" && {
    TAIL=10 stage cli-merge-1b-fp32 50 150 "$PY" -m peftko merge "$RUN" --output "$WORK/merged-1b" --dtype float32
    TAIL=6 stage cli-eval-merged-1b 20 90 "$PY" -m peftko eval "$WORK/merged-1b" --data peftko/sample_corpus \
        --device cuda --seq-len 2048 --json
    TAIL=10 stage cli-merge-1b-bf16 40 150 "$PY" -m peftko merge "$RUN" --output "$WORK/merged-1b-bf16"
}
fi

if want recipes; then
# 3. Common recipe vs peftko, 4 x 2048 tokens a step, each recipe in its own process.
recipes 1b 90 --shape 1b --steps 6 --base-dir "$BASES/1b"
wait $BUILD_8B; say "8B base written: exit $? ($(du -sh "$BASES/8b" | cut -f1))"
recipes 8b 150 --shape 8b --steps 6 --base-dir "$BASES/8b"
fi
if want long; then
wait $BUILD_8B

# 4. The lean path alone on the 8B shape, longer sequences.
recipes 8b-1x8192 50 --shape 8b --recipes peftko --seq-len 8192 --batch-size 1 --steps 4 --warmup-steps 1 --base-dir "$BASES/8b"
recipes 8b-2x8192 50 --shape 8b --recipes peftko --seq-len 8192 --batch-size 2 --steps 4 --warmup-steps 1 --base-dir "$BASES/8b"
recipes 8b-4x8192 50 --shape 8b --recipes peftko --seq-len 8192 --batch-size 4 --steps 4 --warmup-steps 1 --base-dir "$BASES/8b"
fi

say "done in $(($(date +%s) - START)) s"
"$PY" - "$JSONL" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| stage | recipe | tokens | trainable | tokens/s | train peak GiB | predicted | load peak GiB | predicted load | MFU |")
print("|---|---|---|---|---|---|---|---|---|---|")
f = lambda x, s="{:.2f}": "n/a" if x is None else s.format(x)
for r in rows:
    print(f"| {r['stage']} | {r['recipe']} | {r['batch_size']}x{r['seq_len']} | {r['trainable_params']:,} | "
          f"{r['error'] or f(r['tokens_per_s'], '{:,.0f}')} | {f(r['peak_gib'])} | {f(r['predicted_peak_gib'])} | "
          f"{f(r['load_peak_gib'])} | {f(r['predicted_load_gib'])} | {f(r['mfu'], '{:.1%}')} |")
PYEOF
