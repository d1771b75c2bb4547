#!/usr/bin/env bash
# One check of a fresh GPU box with this project, an ImageFolder dataset and MobileNetV2 weights:
#   1. env            python, torch, optuna, pytest, nvidia-smi and the git revision
#   2. pytest-cuda    $PY -m pytest -m cuda (on a CPU the CUDA tests skip themselves)
#   3. trial-cost     $PY -m bench.trial_cost: project vs plain trial per model, cold and warm
#   4. throughput     $PY -m bench.search_throughput: trials/min and GPU busy % for 1, 2, 4 workers per GPU,
#                     with nvidia-smi sampled into nvidia-smi.csv meanwhile
#   5. search         $PY -m search.cli search: a short search of all five models
#   6. best           $PY -m search.cli best --model all
#   7. report         $PY -m search.cli report
#   8. trial-packs    $PY -m bench.trial_packs: trials/min of a trial pack vs K solo trials and K worker processes
# Every log and table goes into one folder (--out: STEP.log, nvidia-smi.csv, throughput/, search/, report/,
# summary.txt). Each step has its own time limit, so one stuck step cannot eat the budget (10 minutes on one
# H100 or H200 in all); a failed step does not stop the others, but the script exits 1 after printing a
# summary of every step (name, seconds, exit code, log file).
#
#   bash bench/gpu_check.sh --data-root DIR --weights FILE           # on the GPU box
#   bash bench/gpu_check.sh --device cpu                             # the same steps, small sizes, on a CPU
#
# Options: --device cuda|cpu (default cuda), --data-root DIR (default $STL10_SEARCH_BENCH_DATA),
# --weights FILE (default $STL10_SEARCH_BENCH_WEIGHTS), --out DIR (default gpu-check-<date>/),
# --python PY (default .venv/bin/python if present, else python3).
# The project need not be installed: the checkout goes first on PYTHONPATH and the CLI runs as
# `$PY -m search.cli` (as on a box prepared with ../shared/tools/gpu-prep.sh, whose /tmp/site stays on it).
# A box with only PyTorch and torchvision (and what pip installed with them) also needs these wheels, all of
# which ../shared/tools/gpu-prep.sh fetches; tests/test_bench.py runs this script with exactly these importable:
#   wheels: optuna alembic colorlog Mako SQLAlchemy PyYAML tqdm packaging optuna-dashboard bottle
#   wheels: plotly narwhals filelock pytest pluggy iniconfig Pygments
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
device=cuda
data_root=${STL10_SEARCH_BENCH_DATA:-}
weights=${STL10_SEARCH_BENCH_WEIGHTS:-}
out=
py=

usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --data-root) data_root=${2:?--data-root needs a folder}; shift 2 ;;
    --weights) weights=${2:?--weights needs a file}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --python) py=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device takes cuda or cpu, not $device" >&2; exit 2 ;; esac
if [ -z "$data_root" ] || [ ! -d "$data_root/train" ]; then
  echo "gpu_check: --data-root (or \$STL10_SEARCH_BENCH_DATA) must be an ImageFolder dataset with train/ and test/" >&2
  exit 2
fi
if [ -n "$weights" ] && [ ! -f "$weights" ]; then
  echo "gpu_check: --weights $weights is not a file" >&2; exit 2
fi
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
out=${out:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
data_root=$(cd "$data_root" && pwd)
[ -n "$weights" ] && weights=$(cd "$(dirname "$weights")" && pwd)/$(basename "$weights")
weights_arg=${weights:-none}
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export STL10_SEARCH_BENCH_DATA=$data_root STL10_SEARCH_BENCH_WEIGHTS=$weights
export PYTHONUNBUFFERED=1

sampler_pid=
stop_sampler() {  # by its PID only, never a bare `wait`: the script must not hang on it
  [ -n "$sampler_pid" ] || return 0
  kill "$sampler_pid" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$sampler_pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$sampler_pid" 2>/dev/null
  sampler_pid=
}
trap stop_sampler EXIT
trap 'stop_sampler; exit 130' INT TERM

names=() seconds=() codes=() logs=()
started_all=$(date +%s)
run_step() {  # NAME LIMIT_S COMMAND...: output to $out/NAME.log, its last lines shown
  local name=$1 limit=$2 log=$out/$1.log start code
  shift 2
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  { echo "\$ $*"; echo; } >"$log"
  timeout --kill-after=5 "$limit" "$@" </dev/null >>"$log" 2>&1
  code=$?
  [ "$code" -eq 124 ] && echo "(stopped: passed its ${limit}s limit)" >>"$log"
  names+=("$name") seconds+=($(( $(date +%s) - start ))) codes+=("$code") logs+=("$log")
  tail -n "${TAIL_LINES:-12}" "$log" | sed 's/^/   /'
  echo "   -> exit $code after ${seconds[-1]}s"
}

if [ "$device" = cuda ]; then
  data=$data_root
  trial_cost=(--device cuda --images 3500 --epochs 3 --frozen-epochs 10 --plain-frozen-epochs 2 --workers 4
              --repeats 1 --cudnn-benchmark on,off)
  throughput=(--device cuda --workers-per-gpu 1,2,4 --trials 16 --epochs 3 --storage-trials 12 --timeout 35)
  search=(--n-trials 4 --param epochs=3 --gpus 0 --workers-per-gpu 2)
  best_device=cuda:0
  limits=(20 60 105 115 100 45 20)  # 465 s in all, and the packs' 120 s: the check ends within 10 minutes
  packs=(--device cuda --images 3500 --image-size 64 --epochs 2 --models logreg,cnn --packs 1,8 --no-steps)
  packs_limit=120
else
  # Small sizes: 20 train and 10 test images per class, linked from --data-root.
  data=$out/data-small
  for part_count in train:20 test:10; do
    part=${part_count%%:*} count=${part_count##*:}
    for class_dir in "$data_root/$part"/*/; do
      target=$data/$part/$(basename "$class_dir")
      mkdir -p "$target"
      find "$class_dir" -maxdepth 1 -type f | sort | head -n "$count" | while read -r file; do
        ln -sf "$file" "$target/"
      done
    done
  done
  export STL10_SEARCH_BENCH_DATA=$data
  trial_cost=(--device cpu --images 140 --epochs 2 --frozen-epochs 3 --plain-frozen-epochs 1 --repeats 1)
  throughput=(--device cpu --workers 1,2 --trials 8 --storage-trials 8 --timeout 60)
  search=(--n-trials 2 --param epochs=1 --workers 2)
  best_device=cpu
  limits=(30 120 300 300 240 240 60)
  packs=(--device cpu --images 140 --image-size 32 --epochs 1 --models logreg,cnn --packs 1,2 --threads 1
         --step-repeats 1)
  packs_limit=180
fi
search_dir=$out/search
storage=sqlite:///$search_dir/studies.db
mkdir -p "$search_dir"

echo "gpu_check: device $device, data $data, weights ${weights:-none}, python $py, output in $out"
env_report() {
  echo "date: $(date -Is)"; echo "host: $(hostname)"
  echo "git: $(git -C "$root" rev-parse --short HEAD 2>/dev/null) $(git -C "$root" status --porcelain 2>/dev/null | wc -l) changed file(s)"
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); [print("gpu", i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]' || return 1
  "$py" -c 'import optuna; print("optuna", optuna.__version__)' || return 1
  "$py" -c 'import pytest; print("pytest", pytest.__version__)' 2>/dev/null || echo "pytest: not installed"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
}
export py root
export -f env_report
TAIL_LINES=8 run_step env "${limits[0]}" bash -c env_report

pytest_cuda() {
  if ! "$py" -c 'import pytest' 2>/dev/null; then
    echo "pytest is not importable by $py; it needs the wheels pytest, pluggy, iniconfig, packaging and Pygments"
    echo "(../shared/tools/gpu-prep.sh fetches them)"
    return 127
  fi
  "$py" -m pytest -m cuda -q -p no:cacheprovider tests
  local code=$?
  if [ "$code" -eq 5 ]; then echo "no test is marked cuda: nothing to run"; return 0; fi
  return "$code"
}
export -f pytest_cuda
TAIL_LINES=6 run_step pytest-cuda "${limits[1]}" bash -c pytest_cuda

TAIL_LINES=12 run_step trial-cost "${limits[2]}" "$py" -m bench.trial_cost "${trial_cost[@]}"

if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    >"$out/nvidia-smi.csv" 2>/dev/null </dev/null &
  sampler_pid=$!
fi
TAIL_LINES=14 run_step throughput "${limits[3]}" "$py" -m bench.search_throughput "${throughput[@]}" \
  --work-dir "$out/throughput"
stop_sampler

TAIL_LINES=10 run_step search "${limits[4]}" "$py" -m search.cli search --model all "${search[@]}" \
  --dataset imagefolder --data-root "$data" --weights "$weights_arg" --storage "$storage" \
  --cache-dir "$search_dir/cache" --log-dir "$search_dir/logs" \
  --param mobilenet_frozen.image_size=96 --param mobilenet_finetune.image_size=96
TAIL_LINES=6 run_step best "${limits[5]}" "$py" -m search.cli best --model all --storage "$storage" \
  --device "$best_device" --cache-dir "$search_dir/cache" --artifacts "$search_dir/artifacts"
TAIL_LINES=3 run_step report "${limits[6]}" "$py" -m search.cli report --storage "$storage" --out "$out/report" \
  --cache-dir "$search_dir/cache"

TAIL_LINES=12 run_step trial-packs "$packs_limit" "$py" -m bench.trial_packs "${packs[@]}"

busy=
if [ -s "$out/nvidia-smi.csv" ]; then
  busy=$(awk -F', *' '{ u += $3; if ($4 > m) m = $4; n++ } END { if (n) printf "%.0f%% mean utilization, %d MiB peak, %d samples", u / n, m, n }' "$out/nvidia-smi.csv")
fi
failed=0
for code in "${codes[@]}"; do [ "$code" -eq 0 ] || failed=$((failed + 1)); done
{
  echo
  echo "gpu_check summary: device $device, $(( $(date +%s) - started_all ))s in all, output in $out"
  printf '%-12s | %7s | %4s | %s\n' step seconds exit log
  printf '%s\n' "-------------+---------+------+------------------------------"
  for i in "${!names[@]}"; do
    printf '%-12s | %7s | %4s | %s\n' "${names[$i]}" "${seconds[$i]}" "${codes[$i]}" "${logs[$i]#"$out"/}"
  done
  [ -n "$busy" ] && echo "GPU during the throughput step (nvidia-smi.csv): $busy"
  if [ "$failed" -eq 0 ]; then echo "all steps passed"; else echo "$failed step(s) failed: see their logs"; fi
} | tee "$out/summary.txt"
[ "$failed" -eq 0 ]
