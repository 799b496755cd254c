#!/usr/bin/env bash
# The GPU validation in one command, within 6 minutes of device time, on a machine with a CUDA GPU and
# torch, numpy, transformers and pytest only (no simpy, plotly, typer or rich; tiersim need not be
# installed). In this order, each step under its own timeout (a failed step does not stop the next):
#
#   1. the CUDA tests (25 collected): cache, validator, graph executor and its host strategies
#      (replay == eager step)                                                                 <= 70 s
#   2. the graph-executor grid (the decode step captured as a CUDA graph): 7B shape,
#      batch 1,8,32,64 x context 2K,8K x HBM 1.0,0.5,0.25; right after batch 1 / 2K, the same
#      point at HBM 0.5 with host attention and with hybrid (fetch share 0.5); then the compressed
#      check (batch 1, 2K, HBM 0.5 and 0.25 with a quarter of the context quantized); points
#      past the budget are listed as skipped; writes <gpu>-graph.json                          <= 180 s
#   3. the operator profile of the same shape, writes <gpu>-operators.json                    <= 70 s
#   4. measured vs simulated on the grid's file (python -m tiersim.simulator.against, the
#      recurrence without simpy); the median |error| is the script's last line               <= 20 s
#   Device time: at most 340 s of steps plus one short check of torch and the GPU, within 6 minutes
#   (the per-step times below are estimates: this script has not yet run on a GPU).
#
#   bash scripts/gpu_validate.sh               # writes docs/validation/<gpu>-{graph,operators}.{json,txt}, -tests.txt
#   DRY_RUN=1 bash scripts/gpu_validate.sh     # the whole script on the CPU at tiny sizes (< 30 s), into a temp dir
#
# Each step is one Python process, and importing transformers is most of a dry run's CPU time (~3 s of the
# grid's and the profile's 4-5 s each): the dry run keeps the GPU run's steps and starts nothing more.
#
# If $OUT is set (the device tool's output folder), every result file is copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${DRY_RUN:-0}" = "1" ]; then
  export OMP_NUM_THREADS=1
  DEVICE=cpu SHAPE=${SHAPE:-tiny} BATCH=${BATCH:-1} CONTEXT=${CONTEXT:-80} HBM=${HBM:-1.0,0.5}
  STEPS=${STEPS:-1} WARMUP=${WARMUP:-1} GRID_BUDGET_S=${GRID_BUDGET_S:-20} OPS_BUDGET_S=${OPS_BUDGET_S:-2}
  COMPRESSED=${COMPRESSED:-0.25} STRATEGY_CHECK=${STRATEGY_CHECK:-host-attention,hybrid}
  DEST=${DEST:-$(mktemp -d)} slug=cpu-dry-run
  ops_args=(--steps 1 --warmup 1)
  cuda_tests=(tests/test_graph_executor.py)  # every CUDA test skips on a CPU: collecting one file proves the step
else
  DEVICE=cuda SHAPE=${SHAPE:-r1-distill-qwen-7b} BATCH=${BATCH:-1,8,32,64} CONTEXT=${CONTEXT:-2048,8192}
  HBM=${HBM:-1.0,0.5,0.25} STEPS=${STEPS:-16} WARMUP=${WARMUP:-2} GRID_BUDGET_S=${GRID_BUDGET_S:-140}
  COMPRESSED=${COMPRESSED:-0.25} STRATEGY_CHECK=${STRATEGY_CHECK:-host-attention,hybrid}
  OPS_BUDGET_S=${OPS_BUDGET_S:-45} DEST=${DEST:-docs/validation}
  ops_args=()
  cuda_tests=(tests/test_cuda_cache.py tests/test_validator.py tests/test_graph_executor.py tests/test_graph_host.py)
  # One process checks torch, transformers and the GPU and names it (CUDA starts once, not twice: an estimated ~3 s saved).
  slug=$("$PY" - <<'PYEOF'
import re, sys
try:
    import torch, transformers  # noqa: F401
except ImportError as exc:
    sys.exit(f"the validator needs torch and transformers: {exc}")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device: torch {torch.__version__} sees none on this machine (DRY_RUN=1 runs on the CPU)")
name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
print(re.sub("[^a-z0-9]+", "-", name).strip("-"))
PYEOF
) || exit 1
fi
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

echo "== $(date -u +%FT%TZ) $slug: $("$PY" -c 'from importlib.metadata import version as v; print("torch", v("torch"), "transformers", v("transformers"))')"
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true; }

# 1. The CUDA code paths (skipped on a CPU): pinned DDR, side-stream prefetch, graph replay == eager step.
# (hypothesis's and anyio's pytest plugins are not loaded: no CUDA test uses them, and they cost a second.)
# 25 tests: ~5 s to collect (transformers' import; timed on a CPU), then, estimated (not yet run on a GPU),
# ~3 s of CUDA start and ~1 s a test at the tiny shape (a few eager decode steps, or a capture and 6 replays):
# ~35 s, 70 s allowed.
run_step "cuda tests" 70 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -p no:hypothesispytest \
  -p no:anyio ${cuda_tests[*]} -k test_cuda -rs 2>&1 | tee '$DEST/$slug-tests.txt'"

# 2. The graph-executor grid: link sweep, captured decode steps per point, compute fit, calibration file.
# The budget counts from the grid's start; the 40 s beyond it (estimates, not yet timed on a GPU): the process's
# start (~8 s), the point in flight when it is spent (the largest, batch 64 x 8K at HBM 0.25, ~15 s) and the file.
run_step "graph grid: $SHAPE, batch $BATCH, context $CONTEXT, hbm $HBM, strategy check $STRATEGY_CHECK, compressed check $COMPRESSED" $((GRID_BUDGET_S + 40)) bash -c \
  "set -o pipefail; '$PY' -m tiersim.validator --executor graph --device $DEVICE --model-shape '$SHAPE' \
  --batch '$BATCH' --context '$CONTEXT' --hbm '$HBM' --steps $STEPS --warmup $WARMUP --budget-s $GRID_BUDGET_S \
  --strategy-check '$STRATEGY_CHECK' --compressed $COMPRESSED --out '$DEST/$slug-graph.json' | tee '$DEST/$slug-graph.txt'"

# 3. The operator profile (GEMMs, small ops, attention, HF decode steps) of the same shape.
run_step "operator profile: $SHAPE" $((OPS_BUDGET_S + 25)) bash -c \
  "set -o pipefail; '$PY' -m tiersim.validator.operators --shape '$SHAPE' --device $DEVICE --budget-s $OPS_BUDGET_S \
  ${ops_args[*]:-} --out '$DEST/$slug-operators.json' | tee '$DEST/$slug-operators.txt'"

# 4. Measured vs the simulator calibrated by the grid's own file; its last line is the median |error|.
against_log="$DEST/$slug-against.txt"
if [ -f "$DEST/$slug-graph.json" ]; then
  run_step "simulate --against" 20 bash -c \
    "set -o pipefail; '$PY' -m tiersim.simulator.against '$DEST/$slug-graph.json' | tee '$against_log'"
else
  failed+=("simulate --against (no $slug-graph.json)")
fi

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  [ "$(cd "$DEST" && pwd)" = "$(cd "$OUT" && pwd)" ] || cp "$DEST/$slug"* "$OUT/" 2>/dev/null || true
fi
echo "== wrote $(ls "$DEST/$slug"* 2>/dev/null | tr '\n' ' ')"
[ "${#failed[@]}" -eq 0 ] || printf '== FAILED: %s\n' "${failed[@]}"
if [ -f "$against_log" ] && tail -n 1 "$against_log" | grep -q '^median |error|'; then
  tail -n 1 "$against_log"
else
  echo "median |error|: not measured"
fi
[ "${#failed[@]}" -eq 0 ]
