#!/usr/bin/env bash
# One command for one H100/H200, within 8 minutes: vidlora bench on videollava-7b with random bf16
# weights (LoRA r=128, alpha=256, 8 frames, batch 1, gradient checkpointing on and off, sdpa and
# flash-attention 2 when installed, ZeRO off), vidlora plan for the same settings (peak predicted
# vs measured), and smoke runs of the CUDA-only paths (plain bf16 Trainer, single-GPU ZeRO-3 with
# checkpointing, --bits 4, predict batched vs one by one in bf16). Writes OUT/gpu.json + OUT/gpu.md.
#
#   benchmarks/gpu.sh [OUT]          # on the GPU machine (OUT defaults to $OUT, else ./gpu_out)
#   DRY_RUN=1 benchmarks/gpu.sh OUT  # on a CPU: the tiny model, 2 steps, the same code paths
#
# Runs from the source tree (PYTHONPATH=src) with the machine's own python3 (its torch/CUDA build).
# Packages that machine lacks can travel as wheels in ./.whl (av; transformers >= 5.24 with its
# huggingface_hub/tokenizers where the image's are older; deepspeed/bitsandbytes for their smoke
# runs): they are installed into /tmp/site first. A missing optional package turns
# its step into a recorded skip, never a failure of the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
"$PYTHON" -c "import av, peft, transformers; from packaging.version import Version as V; assert V(transformers.__version__) >= V('5.24'), transformers.__version__" || {
    echo "benchmarks/gpu.sh: vidlora needs av, peft and transformers >= 5.24 here (carry wheels in .whl)" >&2
    exit 2
}
ARGS=(--out "$OUT_DIR" --budget "${BUDGET:-450}")
[[ "${DRY_RUN:-0}" == "1" ]] && ARGS+=(--dry-run)
exec "$PYTHON" benchmarks/gpu.py "${ARGS[@]}"
