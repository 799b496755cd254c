#!/usr/bin/env bash
# The whole GPU validation in one command, on a machine with a CUDA GPU, torch and transformers
# (no simpy or plotly needed; tiersim need not be installed). About 5 minutes on an H100; every
# step runs under its own timeout, and a failed step does not stop the ones after it.
#
#   bash scripts/gpu_validate.sh          # writes docs/validation/<gpu>{.json,.txt,-tests.txt,-capture.txt}
#   SHAPE=llama-3.1-8b BUDGET_S=300 bash scripts/gpu_validate.sh
#
# Steps: (1) the CUDA tests of the cache and the validator (pinned DDR, side-stream prefetch, bit-exact
# output on the GPU); (2) a GPU `tiersim capture` on a SmolLM2-shaped model with random weights (needs
# the config + tokenizer folder MODEL_CONFIG, default .gpu/smollm2-config; see docs/validation/README.md);
# (3) the validator's link sweep and decode grid, which writes the calibration file.
# If $OUT is set (the device tool's output folder), every result file is copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-r1-distill-qwen-7b}
BATCH=${BATCH:-1,8,32}
CONTEXT=${CONTEXT:-2048,8192}
HBM=${HBM:-1.0,0.5,0.25}
BUDGET_S=${BUDGET_S:-180}
DEST=${DEST:-docs/validation}
MODEL_CONFIG=${MODEL_CONFIG:-.gpu/smollm2-config}
CAPTURE_N=${CAPTURE_N:-4}
CAPTURE_TOKENS=${CAPTURE_TOKENS:-192}

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
failed=()
run_step() {  # run_step NAME SECONDS CMD...: run under a timeout, remember a failure, go on
  local name=$1 seconds=$2; shift 2
  echo "== $(date -u +%T) $name"
  local start=$SECONDS
  timeout "$seconds" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

echo "== $(date -u +%FT%TZ) $slug: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true

# 1. The CUDA code path of the cache and of the validator's instrumentation (skipped on CPU-only CI).
run_step "cuda tests" 200 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider tests/test_cuda_cache.py \
  tests/test_validator.py -k cuda -rs 2>&1 | tee '$DEST/$slug-tests.txt'"

# 2. A GPU capture: SmolLM2's shape and tokenizer, random bf16 weights, the headline tier split.
if [ -f "$MODEL_CONFIG/config.json" ]; then
  model_dir=$(mktemp -d)
  run_step "capture" 200 bash -c "set -o pipefail; { '$PY' scripts/random_weights.py '$MODEL_CONFIG' '$model_dir' \
    --dtype bfloat16 && '$PY' -m tiersim capture --model '$model_dir' --device cuda --dtype bfloat16 \
    --n $CAPTURE_N --max-new-tokens $CAPTURE_TOKENS --out '$DEST/$slug-capture.parquet' \
    && '$PY' -c \"import pandas as pd; d = pd.read_parquet('$DEST/$slug-capture.parquet'); \
last = d[(d.layer == 0) & (d.step == d.groupby('seq_id').step.transform('max'))]; \
print('layer 0 at the last step:'); print(last[['seq_id', 'context_len', 'n_hbm', 'n_ddr', 'n_evicted']].to_string(index=False))\"; } \
    2>&1 | tee '$DEST/$slug-capture.txt'"
else
  echo "== capture skipped: $MODEL_CONFIG/config.json is missing"
  failed+=("capture (no $MODEL_CONFIG)")
fi

# 3. The validator: link sweep, decode grid under a time budget, compute fit, calibration file.
run_step "validation: $SHAPE, batch $BATCH, context $CONTEXT, hbm $HBM" $((BUDGET_S + 150)) bash -c \
  "set -o pipefail; '$PY' -m tiersim.validator --model-shape '$SHAPE' --batch '$BATCH' --context '$CONTEXT' \
  --hbm '$HBM' --budget-s '$BUDGET_S' --out '$DEST/$slug.json' | tee '$DEST/$slug.txt'"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  [ "$(cd "$DEST" && pwd)" = "$(cd "$OUT" && pwd)" ] || cp "$DEST/$slug"* "$OUT/" 2>/dev/null || true
fi
echo "== wrote $(ls "$DEST/$slug"* 2>/dev/null | tr '\n' ' ')"
if [ "${#failed[@]}" -gt 0 ]; then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all steps passed"
