#!/usr/bin/env bash
# The GPU measurements of docs/loader.md, in a few minutes on one GPU (run by hand where there is one):
#   1. images/s of the training loaders reference, fast and dali (when DALI is installed) on the DeiT-S recipe at
#      224 px with 1 and WORKERS workers (DALI: CPU threads), measured in one run by scripts/loader_benchmark.py,
#      with its verdict (CPU cores per GPU needed, against DeiT-S's rate measured here with AMP); 5 rounds, so the
#      median is not DALI's first pass, which defines its pipeline (seconds);
#   2. DeiT-S training steps/s with AMP (bf16), eager and torch.compile'd, plain and in every state of each method
#      (scripts/benchmark.py on the method's table config);
#   3. one epoch of the demo through main.py with loader: dali on the GPU (the mixed decoder path end to end).
#
#   bash scripts/gpu_check.sh [OUT_DIR]           # default OUT_DIR: runs/gpu_check; JSON files and logs land there
#
# Environment: DATA=/data/imagenet reads that ImageFolder tree (train/ and val/) instead of writing a small one of
# photo-sized JPEGs (500x375 crops of the two photos that ship with scikit-learn: scripts/dali_differences.py);
# WORKERS (default: the cores),
# STEPS (timed rounds of benchmark.py, default 20), BATCH (default 128), COMPILE=0 skips the compiled runs,
# PYTHON (default .venv/bin/python). DALI: .venv/bin/pip install -r requirements-dali.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu_check}
WORKERS=${WORKERS:-$(nproc)}
STEPS=${STEPS:-20}
BATCH=${BATCH:-128}
COMPILE=${COMPILE:-1}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print('GPU:', torch.cuda.get_device_name())"

if [ -z "${DATA:-}" ]; then
  DATA="$OUT/jpegs"
  "$PY" scripts/dali_differences.py --write_images "$DATA"
fi

echo "== 1. loader images/s (reference, fast, dali) on the DeiT-S recipe, $WORKERS workers"
"$PY" -c "import nvidia.dali" 2>/dev/null \
  || echo "note: DALI is not installed (pip install -r requirements-dali.txt): dali is left out of the loader run"
"$PY" scripts/loader_benchmark.py --config configs/deit_s.yaml --data_path "$DATA" --data_set folder \
  --batch_size "$BATCH" --num_workers 1 "$WORKERS" --rounds 5 --amp bf16 --bench_batch "$BATCH" \
  --json "$OUT/loader.json" \
  2>&1 | tee "$OUT/loader.txt"

echo "== 2. DeiT-S steps/s with AMP bf16, batch $BATCH: plain and every state of each method"
modes=("")
[ "$COMPILE" = "1" ] && modes+=("--compile")
for cfg in deit_s_toe deit_s_pss deit_s_trilevel deit_s_et; do
  for mode in "${modes[@]}"; do
    tag="$cfg${mode:+_compiled}"
    echo "-- $tag"
    "$PY" scripts/benchmark.py --config "configs/$cfg.yaml" --amp bf16 $mode --batch "$BATCH" --steps "$STEPS" \
      --warmup 5 --no-inference --json "$OUT/$tag.json" 2>&1 | tee "$OUT/$tag.txt"
  done
done

echo "== 3. one demo epoch through main.py with loader: dali on the GPU"
if "$PY" -c "import nvidia.dali" 2>/dev/null; then
  rm -rf "$OUT/demo_dali"
  "$PY" main.py --config configs/demo.yaml --loader dali --epochs 1 --warmup_epochs 0 --methods '[]' \
    --num_workers 4 --output_dir "$OUT/demo_dali" 2>&1 | tail -n 4 | tee "$OUT/demo_dali.txt"
else
  echo "skipped: DALI is not installed"
fi
echo "done: results in $OUT"
