#!/usr/bin/env bash
# The GPU run, unattended, on one GPU, in under 8 minutes, from a plain checkout:
#
#     bash benchmarks/gpu.sh [OUT_DIR]               # default OUT_DIR: benchmarks/results/gpu
#     GPU_DRY_RUN=1 bash benchmarks/gpu.sh [OUT_DIR]  # the same steps on CPU, tiny sizes
#                                                     # (default OUT_DIR: a new temporary folder)
#
# Needs torch (2.11 or newer) with CUDA (Triton included) and pytest (the test steps
# say so and fail where it is missing; the benchmarks still run); uses torchvision and
# timm models where they import (random weights: nothing is downloaded) and the project's
# own models otherwise. The package is not installed: src/ and the checkout root go on
# PYTHONPATH. Four steps, each under its own time limit, each timed (what each measures:
# benchmarks/README.md, "GPU"): grid (python -m benchmarks.run --preset gpu, OUT_DIR/grid/),
# tests (pytest --device cuda tests/test_numerics.py), cudagraphs (python -m
# benchmarks.cudagraphs, OUT_DIR/cudagraphs/) and eager (pytest -m device
# tests/test_eager.py; skipped, saying so, where convbn_pass.tune is not callable).
#
# Each step's output goes to OUT_DIR/NAME.log; OUT_DIR also gets nvidia-smi.txt,
# environment.txt and steps.txt (each step's seconds and exit status). Exit status: 0
# when every step passed or was skipped for want of convbn_pass.tune, 2 where the run
# cannot start (no CUDA, the package does not import), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY="${GPU_DRY_RUN:-0}"
if [ "$DRY" = 1 ]; then
    OUT="${1:-$(mktemp -d -t convbn-gpu-dry.XXXXXX)}"
else
    OUT="${1:-benchmarks/results/gpu}"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # convbn_pass and benchmarks
export HF_HUB_OFFLINE=1                                          # timm: never reach for the hub

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # The MLP (Linear-BN pairs: PyTorch's built-in pass, conv-only, has nothing to do
    # there), one warm-up compile (shared kernel cache), one round.
    GRID=(--models mlp_bn --batches 2 --device cpu --modes compile pass_memory deploy
          --shared-kernel-cache --rounds 1 --steps 1 --time-per-cell 5 --budget 200)
    TESTS=(-k "light_float64 and conv2d-bias-affine-groups1")
    GRAPHS=(--model mlp_bn --batch 4 --px 32 --steps 2)
    LIMITS=(260 120 200 120)
else
    DEVICE=cuda
    GRID=(--preset gpu)
    TESTS=()
    GRAPHS=(--model torchvision:resnet18 --batch 32 --px 224 --steps 20)
    LIMITS=(230 100 90 45)     # seconds per step: 465 in all, under the 8 minutes
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: CUDA is not available here (GPU_DRY_RUN=1 runs the CPU dry run)" >&2
        exit 2
    fi
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
if ! "$PY" -c "import convbn_pass, benchmarks.run" 2> "$OUT/import-error.txt"; then
    echo "gpu.sh: cannot import the package from $ROOT/src: $(tail -1 "$OUT/import-error.txt")" >&2
    exit 2
fi
rm -f "$OUT/import-error.txt"
"$PY" - > "$OUT/environment.txt" <<'EOF'
import importlib, torch, convbn_pass
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("torchvision", "timm", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
print("convbn_pass", convbn_pass.__file__)
EOF
cat "$OUT/environment.txt" >&2
: > "$OUT/steps.txt"
failed=0

step() {  # step NAME LIMIT COMMAND...: run under `timeout LIMIT`, log, record seconds
    local name=$1 limit=$2 begin=$SECONDS status=0
    shift 2
    echo "== gpu.sh: $name (at most $limit s)" >&2
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || status=$?
    echo "$name: $((SECONDS - begin)) s, exit status $status" | tee -a "$OUT/steps.txt" >&2
    [ "$status" -eq 0 ] || failed=1
    return "$status"
}

if ! step grid "${LIMITS[0]}" "$PY" -m benchmarks.run "${GRID[@]}" --out "$OUT/grid"; then
    echo "gpu.sh: the grid ended early; rebuilding its tables from results.json" >&2
    "$PY" -m benchmarks.run --report-only "$OUT/grid" || true
fi
if "$PY" -c "import pytest" 2>/dev/null; then
    step tests "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" \
        tests/test_numerics.py ${TESTS[@]+"${TESTS[@]}"}
else
    echo "tests: skipped: pytest is not installed (pip install pytest)" | tee -a "$OUT/steps.txt" >&2
    failed=1
fi
step cudagraphs "${LIMITS[2]}" "$PY" -m benchmarks.cudagraphs "${GRAPHS[@]}" \
    --device "$DEVICE" --out "$OUT/cudagraphs"
if "$PY" -c "import sys, convbn_pass; sys.exit(0 if callable(getattr(convbn_pass, 'tune', None)) else 1)" \
        && [ -f tests/test_eager.py ] && "$PY" -c "import pytest" 2>/dev/null; then
    step eager "${LIMITS[3]}" "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" \
        -m device tests/test_eager.py
else
    echo "eager: skipped: convbn_pass.tune is not callable in this checkout (or tests/test_eager.py or pytest is missing)" \
        | tee -a "$OUT/steps.txt" >&2
fi
echo "gpu.sh: results in $OUT" >&2
exit "$failed"
