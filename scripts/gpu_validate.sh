#!/usr/bin/env bash
# The whole GPU validation in one command, on a machine with a CUDA GPU, torch and transformers
# (no simpy, plotly, rich or typer needed; tiersim need not be installed). Takes 2-5 minutes on an
# H100; every step runs under a timeout so the total stays under 9 minutes.
#
#   bash scripts/gpu_validate.sh                 # writes docs/validation/<gpu>.json and <gpu>.txt
#   SHAPE=llama-3.1-8b bash scripts/gpu_validate.sh
#
# If $OUT is set (the device tool's output folder), the JSON and the table are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-r1-distill-qwen-7b}
BATCH=${BATCH:-1,8,32}
CONTEXT=${CONTEXT:-2048,8192}
HBM=${HBM:-1.0,0.5,0.25}
DEST=${DEST:-docs/validation}

"$PY" - <<'PYEOF' || exit 1
import sys
try:
    import torch, transformers  # noqa: F401
except ImportError as exc:
    sys.exit(f"the validator needs torch and transformers: {exc}")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device: torch {torch.__version__} sees none on this machine")
PYEOF
slug=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0).lower().replace('nvidia', ''); print(re.sub('[^a-z0-9]+', '-', n).strip('-'))")
mkdir -p "$DEST"
echo "== $(date -u +%FT%TZ) $slug: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true

echo "== smoke: the CUDA code path on the tiny shape"
timeout 150 "$PY" -m tiersim.validator --model-shape tiny --device cuda --batch 1,4 --context 512 \
  --hbm 1.0,0.5 --steps 8 --warmup 2 > /dev/null

echo "== validation: $SHAPE, batch $BATCH, context $CONTEXT, hbm $HBM"
# The grid gets 300 s (points left then are listed as skipped, so a file is always written); the
# hard timeout also covers the link sweep, the model build and the slowest single point.
timeout 420 "$PY" -m tiersim.validator --model-shape "$SHAPE" --batch "$BATCH" --context "$CONTEXT" \
  --hbm "$HBM" --budget-s "${BUDGET_S:-300}" --out "$DEST/$slug.json" | tee "$DEST/$slug.txt"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$DEST/$slug.json" "$DEST/$slug.txt" "$OUT/"
fi
echo "== wrote $DEST/$slug.json and $DEST/$slug.txt"
