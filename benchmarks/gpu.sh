#!/usr/bin/env bash
# The GPU grid, unattended, on one GPU, in under 8 minutes:
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu
#
# Needs torch with CUDA (Triton included); uses torchvision and timm models where
# they import (random weights: weights=None / pretrained=False, nothing is
# downloaded) and the project's own models otherwise. Everything lands in
# OUT_DIR: results.json/.csv/.md, PNGs, command.txt, log.txt, nvidia-smi.txt.
#
# Time: the harness's own budget (390 s, preset "gpu") skips cells and modes
# that would not fit and still writes results; `timeout` below is the hard stop
# behind it, after which the tables are rebuilt from what results.json holds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # convbn_pass from this checkout
export HF_HUB_OFFLINE=1                               # timm: never reach for the hub

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: CUDA is not available here" >&2
    exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

timeout --kill-after=10 445 python -m benchmarks.run --preset gpu --out "$OUT" \
    2> >(tee "$OUT/log.txt" >&2)
status=$?
if [ "$status" -ne 0 ]; then
    echo "gpu.sh: the run ended with status $status; rebuilding tables from results.json" >&2
    python -m benchmarks.run --report-only "$OUT" || true
fi
echo "gpu.sh: results in $OUT" >&2
exit "$status"
