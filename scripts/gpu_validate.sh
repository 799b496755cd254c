#!/usr/bin/env bash
# The GPU validation in one command, within 6 minutes of device time, on a machine with a CUDA GPU and
# torch, numpy, transformers and pytest (simpy, plotly, typer and rich are not needed; tiersim need not be
# installed). In this order, each step under its own timeout (SIGTERM, then SIGKILL 5 s later); a failed or
# killed step does not stop the next:
#
#   0. one process checks torch, transformers and the GPU and names it                      <= 25 s
#   1. the CUDA tests: the graph executor's first (replay == eager step, segmented capture),
#      then the validator's, then the cache's (which passed on an H100 on 2026-11-26: cut
#      first if time runs short; each test's line is written as it ends)                     <= 55 s
#   2. the graph-executor grid (the decode step captured as a CUDA graph): 7B shape,
#      batch 1,8,32,64 x context 2K,8K x HBM 1.0,0.5,0.25; right after batch 1 / 2K, the same
#      point at HBM 0.5 with host attention and with hybrid (fetch share 0.5); then the compressed
#      check (batch 1, 2K, HBM 0.5 and 0.25 with a quarter of the context quantized); points
#      past the 120 s budget are listed as skipped; <gpu>-graph.json is rewritten after every
#      point (so a killed grid keeps what it measured)                                      <= 150 s
#   3. the operator profile of the same shape, writes <gpu>-operators.json                   <= 50 s
#   4. measured vs simulated on the grid's file (python -m tiersim.simulator.against, the
#      recurrence without simpy): needs only <gpu>-graph.json                               <= 10 s
#   4b. the grid's points beside the predictions committed before the run
#      (docs/validation/predicted-<preset>.json; none for this GPU's preset is no failure)  <= 5 s
#   5. the figures issue 23 asks to quote (python -m tiersim.validator.quote, standard library
#      only), the median |error| of step 4 last                                               <= 5 s
#   Device time: at most 305 s of steps and nvidia-smi (345 s if every step had to be killed), within 6 minutes; the
#   per-step times are estimates (the graph executor has not yet run on a GPU; the H100 ran 13 cache tests in 38 s).
#
#   bash scripts/gpu_validate.sh 2>&1 | tee $OUT/gpu_validate.log   # into $OUT (the device tool's folder), else docs/validation
#   DRY_RUN=1 bash scripts/gpu_validate.sh     # the whole script on the CPU at tiny sizes (< 30 s), into a temp dir
#
# Every step writes its output into $DEST as it runs (<gpu>-{tests,graph,operators,against,quote}.txt, on the
# console too; <gpu>-preregistered.txt for 4b), and the Python steps their JSON atomically; DEST defaults to $OUT, so what a killed run leaves
# still comes back. With DEST elsewhere and $OUT set, each step's files are copied to $OUT when it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# pytest for step 1 where the device has none: `pip install --no-deps --target build/gpu_deps pytest pluggy
# iniconfig pygments` here (pure Python), then the device tool's carry ["build/gpu_deps"] (build/ is git-ignored).
# Used only when the device's Python cannot import pytest, and after everything else on the path.
GPU_DEPS=${GPU_DEPS:-$PWD/build/gpu_deps}
if [ -d "$GPU_DEPS" ] && ! "$PY" -c 'import pytest' 2>/dev/null; then
  export PYTHONPATH="$PYTHONPATH:$GPU_DEPS"
  echo "== pytest from $GPU_DEPS (the device's Python has none)"
fi
# Step timeouts (s). The grid's and the profile's are their budgets plus the process's start (~8 s, an estimate),
# the point or section in flight when the budget is spent (the largest grid point, batch 64 x 8K at HBM 0.25: ~15 s)
# and the file.
PRE_S=25 SMI_S=5 TESTS_S=${TESTS_S:-55} AGAINST_S=10 PREREG_S=5 QUOTE_S=5 KILL_S=5 GRID_EXTRA_S=30 OPS_EXTRA_S=15
if [ "${DRY_RUN:-0}" = "1" ]; then
  export OMP_NUM_THREADS=1
  DEVICE=cpu SHAPE=${SHAPE:-tiny} BATCH=${BATCH:-1} CONTEXT=${CONTEXT:-80} HBM=${HBM:-1.0,0.5}
  STEPS=${STEPS:-1} WARMUP=${WARMUP:-1} GRID_BUDGET_S=${GRID_BUDGET_S:-20} OPS_BUDGET_S=${OPS_BUDGET_S:-2}
  COMPRESSED=${COMPRESSED:-0.25} STRATEGY_CHECK=${STRATEGY_CHECK-host-attention,hybrid}
  DEST=${DEST:-$(mktemp -d)} slug=cpu-dry-run
  PREREG_DIR=${PREREG_DIR:-$DEST}  # no predictions are registered for the tiny grid: step 4b says so
  ops_args=(--steps 1 --warmup 1)
  read -ra cuda_tests <<< "${CUDA_TESTS:-tests/test_graph_executor.py}"  # every CUDA test skips on a CPU
else
  DEVICE=cuda SHAPE=${SHAPE:-r1-distill-qwen-7b} BATCH=${BATCH:-1,8,32,64} CONTEXT=${CONTEXT:-2048,8192}
  HBM=${HBM:-1.0,0.5,0.25} STEPS=${STEPS:-16} WARMUP=${WARMUP:-2} GRID_BUDGET_S=${GRID_BUDGET_S:-120}
  COMPRESSED=${COMPRESSED:-0.25} STRATEGY_CHECK=${STRATEGY_CHECK-host-attention,hybrid}
  OPS_BUDGET_S=${OPS_BUDGET_S:-35} DEST=${DEST:-${OUT:-docs/validation}} PREREG_DIR=${PREREG_DIR:-docs/validation}
  ops_args=()
  # The graph executor's tests first: a timeout cuts the cache's, which have run on a GPU before.
  read -ra cuda_tests <<< "${CUDA_TESTS:-tests/test_graph_executor.py tests/test_graph_host.py tests/test_validator.py tests/test_cuda_cache.py}"
  # One process checks torch, transformers and the GPU and names it (CUDA starts once, not twice). No CUDA or no
  # torch ends the script; a slow start (its timeout) does not: the GPU is named by nvidia-smi and the steps go on.
  slug=$(timeout -k "$KILL_S" "$PRE_S" "$PY" - <<'PYEOF'
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
)
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== the GPU check timed out after $PRE_S s; naming the GPU by nvidia-smi and going on"
    slug=$(timeout "$SMI_S" nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' \
      | sed -e 's/nvidia//' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
    slug=${slug:-cuda-gpu}
  elif [ "$rc" -ne 0 ] || [ -z "$slug" ]; then
    exit 1
  fi
fi
GRID_S=$((GRID_BUDGET_S + GRID_EXTRA_S)) OPS_S=$((OPS_BUDGET_S + OPS_EXTRA_S))
mkdir -p "$DEST" || exit 1
failed=()
publish() {  # publish FILE...: copy each to $OUT (atomically: a temporary, then a rename) when DEST is elsewhere
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
  [ "$(cd "$DEST" && pwd)" != "$(cd "$OUT" && pwd)" ] || return 0
  local f
  for f in "$@"; do
    [ -f "$f" ] && cp "$f" "$OUT/.$(basename "$f").part" && mv "$OUT/.$(basename "$f").part" "$OUT/$(basename "$f")"
  done
  return 0
}
run_step() {  # run_step NAME SECONDS LOG CMD...: CMD's output into LOG as it runs (and on the console), under a
              # timeout (SIGTERM; SIGKILL $KILL_S s later); a failure is remembered and the next step runs.
  # timeout signals its own process group only: tee, outside it, keeps writing what the step printed.
  local name=$1 seconds=$2 log=$3; shift 3
  echo "== $(date -u +%T) $name (timeout $seconds s)"
  local start=$SECONDS
  timeout -k "$KILL_S" "$seconds" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    failed+=("$name (exit $rc: killed at its $seconds s timeout)")
  elif [ "$rc" -ne 0 ]; then
    failed+=("$name (exit $rc)")
  fi
  publish "$log" "$DEST/$slug"*.json
}

echo "== $(date -u +%FT%TZ) $slug: $("$PY" -c 'from importlib.metadata import version as v; print("torch", v("torch"), "transformers", v("transformers"))' 2>&1)"
echo "== plan: steps of at most $PRE_S (GPU check) + $TESTS_S + $GRID_S + $OPS_S + $AGAINST_S + $PREREG_S + $QUOTE_S s, into $DEST"
[ "$DEVICE" = cuda ] && { timeout "$SMI_S" nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true; }

# 1. The CUDA code paths (skipped on a CPU): graph replay == eager step, segmented capture, pinned DDR, prefetch.
# (hypothesis's and anyio's pytest plugins are not loaded: no CUDA test uses them, and they cost a second.)
run_step "cuda tests" "$TESTS_S" "$DEST/$slug-tests.txt" "$PY" -m pytest -v -p no:cacheprovider \
  -p no:hypothesispytest -p no:anyio "${cuda_tests[@]}" -k test_cuda -rs --durations=10

# 2. The graph-executor grid: link sweep, captured decode steps per point, compute fit, calibration file.
run_step "graph grid: $SHAPE, batch $BATCH, context $CONTEXT, hbm $HBM, strategy check ${STRATEGY_CHECK:-none}, compressed check $COMPRESSED" \
  "$GRID_S" "$DEST/$slug-graph.txt" "$PY" -m tiersim.validator --executor graph --device "$DEVICE" \
  --model-shape "$SHAPE" --batch "$BATCH" --context "$CONTEXT" --hbm "$HBM" --steps "$STEPS" --warmup "$WARMUP" \
  --budget-s "$GRID_BUDGET_S" --strategy-check "$STRATEGY_CHECK" --compressed "$COMPRESSED" \
  --out "$DEST/$slug-graph.json"

# 3. The operator profile (GEMMs, small ops, attention, HF decode steps) of the same shape.
run_step "operator profile: $SHAPE" "$OPS_S" "$DEST/$slug-operators.txt" "$PY" -m tiersim.validator.operators \
  --shape "$SHAPE" --device "$DEVICE" --budget-s "$OPS_BUDGET_S" ${ops_args[@]+"${ops_args[@]}"} --out "$DEST/$slug-operators.json"

# 4. Measured vs the simulator calibrated by the grid's own file (a partial file too: a stopped grid's).
against_log="$DEST/$slug-against.txt"
if [ -f "$DEST/$slug-graph.json" ]; then
  run_step "simulate --against" "$AGAINST_S" "$against_log" "$PY" -m tiersim.simulator.against "$DEST/$slug-graph.json"
else
  failed+=("simulate --against (no $slug-graph.json)")
fi

# 4b. The same points beside the uncalibrated predictions committed before this run (a held-out test: nothing the
# run measured tuned them), read from PREREG_DIR by the grid file's GPU preset; nothing is simulated.
if [ -f "$DEST/$slug-graph.json" ]; then
  run_step "pre-registered predictions" "$PREREG_S" "$DEST/$slug-preregistered.txt" "$PY" -m tiersim.simulator.against \
    "$DEST/$slug-graph.json" --preregistered "$PREREG_DIR"
fi

echo "== wrote $(ls "$DEST/$slug"* 2>/dev/null | tr '\n' ' ')"
[ "${#failed[@]}" -eq 0 ] || printf '== FAILED: %s\n' "${failed[@]}"
# 5. The figures to quote, last; its last line is the median |error| of step 4 (or "not measured").
echo "== $(date -u +%T) figures to quote (after $SECONDS s)"
timeout -k "$KILL_S" "$QUOTE_S" "$PY" -m tiersim.validator.quote "$DEST/$slug-graph.json" "$against_log" \
  > "$DEST/$slug-quote.txt" 2>&1
publish "$DEST/$slug-quote.txt"
if tail -n 1 "$DEST/$slug-quote.txt" 2>/dev/null | grep -q '^median |error|'; then
  cat "$DEST/$slug-quote.txt"
else  # the quote step itself failed: its output, then the median line the script always ends on
  cat "$DEST/$slug-quote.txt" 2>/dev/null
  if [ -f "$against_log" ] && grep -q '^median |error|' "$against_log"; then
    grep '^median |error|' "$against_log" | tail -n 1
  else
    echo "median |error|: not measured"
  fi
fi
[ "${#failed[@]}" -eq 0 ]
