#!/usr/bin/env bash
# The scale benchmark on a CUDA machine: every stage with --device cuda, beside a bare forward pass
# on the same GPU, at Broden density. Prints bench/scale.py's table and writes it, with the raw runs,
# to OUT_DIR (default bench/results/gpu/).
#
#   bash bench/gpu.sh [SIZES] [EPOCHS]          # defaults: 1000,4000,16000 and 30
#
# Where pip cannot reach an index (an offline GPU box), put wheels of n2vdb's dependencies in WHEELS
# (a directory) and they are installed into a scratch site-packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-1000,4000,16000}
EPOCHS=${2:-30}
OUT_DIR=${OUT_DIR:-bench/results/gpu}
mkdir -p "$OUT_DIR"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/n2vdb-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/n2vdb-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script is for a GPU machine")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python3 bench/scale.py --device cuda --sizes "$SIZES" --epochs "$EPOCHS" --workers "$(nproc)" \
    --results-dir "$OUT_DIR" --json "$OUT_DIR/runs.json" | tee "$OUT_DIR/table.txt"
