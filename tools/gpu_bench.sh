#!/usr/bin/env bash
# Issue #7 on a GPU machine in one command: the GPU tests, then every benchmark; JSON, tables and
# logs under $OUT (default runs/gpu_bench). See docs/benchmarks.md.
#
#   ../shared/device/carry.sh --av            # once per checkout, on the CPU machine: wheels -> .whl/
#   bash tools/gpu_bench.sh                   # on the GPU machine (carry .whl); or name stages:
#   bash tools/gpu_bench.sh tests moe         # stages: tests moe train data (default: all, in this order)
#
# The GPU machine's python3 brings torch (CUDA); the carried wheels add deepspeed, webdataset,
# decord. Each stage has a time limit so that the whole run fits one 10-minute device call;
# a stage that fails or times out is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_bench}"
mkdir -p "$OUT"
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # DeepSpeed op builds reject '9.0a'
STAGES="${*:-tests moe train data}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.txt, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$SUMMARY"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    tail -n 40 "$OUT/$name.txt"
}

$PY - > "$OUT/machine.json" <<'EOF'
import json, platform, subprocess, datetime
import torch
info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("deepspeed", "triton", "timm", "webdataset", "decord"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # report, do not stop
        info[name] = f"unavailable: {type(e).__name__}"
try:
    info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["git_sha"] = None
print(json.dumps(info, indent=1))
EOF
cat "$OUT/machine.json"

for s in $STAGES; do
    case $s in
        tests) stage gpu_tests 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu ;;
        moe)   stage bench_moe 120 $PY tools/bench_moe.py --out "$OUT/bench_moe.json" ;;
        train) stage bench_train 230 $PY tools/bench_train.py --workdir /tmp/bench_train \
                   --out "$OUT/bench_train.json" --steps 30 --warmup 10 --runs moe,dense,text,moe-unbalanced \
                   model.moe.path=fast model.attn_impl=flex ;;
        data)  stage bench_data 60 $PY tools/bench_data.py --workdir /tmp/bench_data --n-images 1000 \
                   --n-videos 100 --repeats 2 --out "$OUT/bench_data.json" ;;
        *) echo "unknown stage '$s' (known: tests moe train data)" | tee -a "$SUMMARY"; exit 2 ;;
    esac
done
cat "$SUMMARY"
