#!/usr/bin/env bash
# GPU figures for benchmarks/RESULTS.md: the common recipe against peftko on the Llama-3.2-1B and
# Llama-3-8B shapes (random weights, real 128,256-row vocabularies), then the lean path alone at
# longer sequences. About 8 minutes on one H100/H200; every run has its own inner timeout, and a
# stage is skipped (and says so) when the budget is spent.
#
#   bash benchmarks/gpu_check.sh                       # results under $OUT (or /tmp/peftko-gpu-check)
#   BUDGET_S=500 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Needs: a CUDA build of torch, transformers, peft, bitsandbytes; liger-kernel + triton for the
# Liger rows (pip install 'peftko[gpu]'); without them the peftko rows run without Liger and the
# "kernels" field of each JSON line says null. The generated checkpoints (16 GB for 8B) go to
# $BASES, not to the results folder.
set -u
PY=${PYTHON:-$(command -v python || command -v python3)}
RESULTS=${OUT:-/tmp/peftko-gpu-check}
BASES=${BASES:-/tmp/peftko-bench-bases}
BUDGET_S=${BUDGET_S:-500}
START=$(date +%s)
mkdir -p "$RESULTS" "$BASES"
cd "$(dirname "$0")/.." || exit 1

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

run() {  # run NAME MIN_SECONDS ARGS...: one benchmarks/recipes.py invocation under the remaining budget
    local name=$1 need=$2; shift 2
    local t; t=$(left)
    if [ "$t" -lt "$need" ]; then
        echo "## $name: skipped, $t s left of the budget (needs about $need s)" | tee -a "$RESULTS/summary.md"
        return
    fi
    echo "## $name ($(date -u +%H:%M:%S), $t s left)" | tee -a "$RESULTS/summary.md"
    timeout --kill-after=15 "$t" "$PY" benchmarks/recipes.py --device cuda "$@" \
        > "$RESULTS/$name.out" 2> "$RESULTS/$name.err"
    local rc=$?
    cat "$RESULTS/$name.out" | tee -a "$RESULTS/summary.md"
    [ $rc -eq 0 ] || { echo "exit $rc; last lines of stderr:"; tail -n 25 "$RESULTS/$name.err"; } | tee -a "$RESULTS/summary.md"
}

{
    echo "# peftko GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" - <<'PYEOF'
import importlib.util, torch, transformers, peft, bitsandbytes
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("liger_kernel", "triton", "flash_attn"):
    spec = importlib.util.find_spec(m)
    print(f"{m}: {'installed' if spec else 'missing'}")
PYEOF
} 2>&1 | tee "$RESULTS/summary.md"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: stop"; exit 1; }

# 1. The Liger/marker-row correctness test on the card (seconds).
timeout 120 "$PY" -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -n 3 | tee -a "$RESULTS/summary.md"

# 2. Common vs peftko, 4 x 2048 tokens a step (the setting of benchmarks/RESULTS.md's reference table), each recipe in its own process.
run 1b 120 --shape 1b --base-dir "$BASES/1b"
run 8b 240 --shape 8b --base-dir "$BASES/8b"

# 3. The lean path alone on the 8B shape: how far seq_len x batch goes in 12 / 24 GiB, and Liger's share.
run 8b-1x4096 60 --shape 8b --recipes peftko --seq-len 4096 --batch-size 1 --steps 6 --base-dir "$BASES/8b"
run 8b-1x8192 60 --shape 8b --recipes peftko --seq-len 8192 --batch-size 1 --steps 6 --base-dir "$BASES/8b"
run 8b-no-liger 60 --shape 8b --recipes peftko --liger off --steps 6 --base-dir "$BASES/8b"
run 8b-2x8192 60 --shape 8b --recipes peftko --seq-len 8192 --batch-size 2 --steps 6 --base-dir "$BASES/8b"

echo "done in $(($(date +%s) - START)) s; results in $RESULTS/summary.md" | tee -a "$RESULTS/summary.md"
