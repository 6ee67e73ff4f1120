#!/usr/bin/env bash
# The GPU benchmarks and tests in one command under a fixed time budget; JSON, tables and logs
# under $OUT (default runs/gpu_bench). See docs/benchmarks.md, section "GPU".
#
#   ../shared/device/carry.sh --av            # once per checkout, on the CPU machine: wheels -> .whl/
#   OUT=$OUT FUSION_BENCH_SHA=<sha> bash tools/gpu_bench.sh   # on the GPU machine, carrying .whl
#   bash tools/gpu_bench.sh moe train         # some stages (setup and toy always run first)
#   bash tools/gpu_bench.sh --rehearse        # anywhere, on CPU: every stage at tiny sizes
#                                             # (or FUSION_BENCH_REHEARSE=1)
#
# Stages, in this order, each under its own time limit (seconds; the sum is the budget):
#   setup  30  wheels from .whl/ into $WORK/site, a venv $WORK/py over $PYTHON's packages with the
#              fusion-* entry points, machine.json (GPU, versions, git sha)
#   toy    30  `fusion-data toy` (the whole toy world, on the machine), `fusion-plan` of configs/small.yaml
#   moe    50  tools/bench_moe.py: fast MoE layer vs dense SwiGLU of equal active FLOPs, coarse and
#              fine-grained, uniform and skewed routing, the bare grouped-matmul floor, loop, grouped
#   train 120  tools/bench_train.py: configs/small.yaml steps, MoE vs model.dense_baseline=true vs
#              text only: tokens/s, MFU, peak memory vs fusion-plan, loader vs step
#   vqa    90  tools/bench_train.py --vqa: configs/small.yaml on the toy world for as many steps as
#              fit (from the train stage's step time), toy-VQA accuracy, blind and chance, wall time
#   tests  80  pytest tests/gpu, then tests/dryrun
# A stage that fails or runs out of time is recorded and the next one still runs; what a stage wrote
# stays in $OUT. summary.txt (rebuilt after every stage) lists each stage's exit status and time and
# the ratios measured in this run. With the machine's start (about a minute) the whole call fits in
# 8 minutes of device time: give the device call timeout_s 450.
#
# Environment: PYTHON (default python3), FUSION_BENCH_WORK (scratch: venv, wheels, toy world, runs;
# default /dev/shm/fusion_gpu_bench when it has 16 GiB free, else /tmp/fusion_gpu_bench),
# FUSION_BENCH_BUDGET (seconds for all stages: 400, rehearsal 1500), FUSION_BENCH_WHEELS (1: install
# .whl/*.whl; default 1, rehearsal 0), FUSION_BENCH_TRAIN_ARGS (overrides for every training run;
# default "model.moe.path=fast model.attn_impl=flex", rehearsal "model.moe.path=fast": FlexAttention
# has no backward on CPU), FUSION_BENCH_SHA (the commit, for machine.json where the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REHEARSE=${FUSION_BENCH_REHEARSE:-0}
STAGES=()
for a in "$@"; do
    case $a in
        --rehearse) REHEARSE=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        setup|toy) ;;  # always run
        moe|train|vqa|tests) STAGES+=("$a") ;;
        *) echo "gpu_bench: unknown stage '$a' (known: moe train vqa tests; --rehearse)" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(moe train vqa tests)
[ "$REHEARSE" = 1 ] || REHEARSE=0

OUT="${OUT:-runs/gpu_bench}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# scratch in memory where there is room: each training run ends with a checkpoint of several GB
# (deleted at once), which /dev/shm takes in a second or two
if [ $REHEARSE = 0 ] && [ -z "${FUSION_BENCH_WORK:-}" ] && [ -w /dev/shm ] && (( $(df -Pk /dev/shm | awk 'NR==2 {print $4}') > 16 * 1024 * 1024 )); then
    FUSION_BENCH_WORK=/dev/shm/fusion_gpu_bench
fi
WORK="${FUSION_BENCH_WORK:-/tmp/fusion_gpu_bench}"
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
PYTHON="${PYTHON:-python3}"
if [ $REHEARSE = 1 ]; then
    BUDGET=${FUSION_BENCH_BUDGET:-1500}
    WHEELS=${FUSION_BENCH_WHEELS:-0}
    TRAIN_ARGS=${FUSION_BENCH_TRAIN_ARGS-model.moe.path=fast}
    declare -A LIMIT=([setup]=60 [toy]=120 [moe]=180 [train]=420 [vqa]=300 [tests]=420)
    export DS_ACCELERATOR=cpu
else
    BUDGET=${FUSION_BENCH_BUDGET:-400}
    WHEELS=${FUSION_BENCH_WHEELS:-1}
    TRAIN_ARGS=${FUSION_BENCH_TRAIN_ARGS-model.moe.path=fast model.attn_impl=flex}
    declare -A LIMIT=([setup]=30 [toy]=30 [moe]=50 [train]=120 [vqa]=90 [tests]=80)
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # DeepSpeed op builds reject '9.0a'
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
fi
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"  # shared by every stage's processes
export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
read -r -a TRAIN_OV <<< "$TRAIN_ARGS"
TOY=$WORK/toy
PY=$WORK/py/bin/python  # made by the setup stage
STATUS=$OUT/stages.tsv
rm -f "$OUT"/{bench_moe,bench_train,bench_vqa,machine,plan_small}.json "$OUT"/{summary,tests}.txt "$OUT"/tests*.xml
: > "$STATUS"
T0=$SECONDS

summary() {  # summary.txt from stages.tsv and the stages' JSON; never fails the run
    "$PYTHON" - "$OUT" "$REHEARSE" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, re, sys
from pathlib import Path
out, rehearse = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:
        return None
print("gpu_bench" + (" REHEARSAL on CPU at tiny sizes: no figure here is a GPU figure" if rehearse else ""))
m = load("machine.json") or {}
print("machine: " + ", ".join(f"{k} {m[k]}" for k in ("gpu", "python", "torch", "cuda", "deepspeed", "triton", "git_sha", "date") if m.get(k)))
print(f"\n{'stage':<7}{'exit':>6}{'seconds':>9}{'limit':>7}  outcome")
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, sec, lim = line.split("\t")
    outcome = {"0": "ok", "124": "TIME LIMIT", "137": "TIME LIMIT (killed)", "-": "skipped: budget spent"}.get(rc, "FAILED")
    print(f"{name:<7}{rc:>6}{sec:>9}{lim:>7}  {outcome}")
moe = load("bench_moe.json")
if moe:
    print(f"\nMoE layer fwd+bwd, ratio to the dense SwiGLU of equal active FLOPs ({moe['dtype']}, {moe['statistic']}"
          + (", partial" if moe.get("partial") else "") + f"); in-run {moe['matmul']['n']}^3 matmul {moe['matmul']['tflops']:.3g} TFLOP/s")
    rows = {}
    for r in moe["results"]:
        rows.setdefault((r["shape"], r["routing"], r["max_over_mean"]), {})[r["subject"]] = r["x_dense"]
    subs = [s for s in ("fast", "fast-seq", "grouped", "loop", "floor") if any(s in v for v in rows.values())]
    print(f"{'shape':<8}{'routing':<9}{'max/mean':>9}" + "".join(f"{s:>10}" for s in subs) + f"{'fast/floor':>12}")
    for (shape, routing, mom), v in rows.items():
        ff = v["fast"] / v["floor"] if "fast" in v and "floor" in v else None
        print(f"{shape:<8}{routing:<9}{mom:>9.2f}" + "".join(f"{v[s]:>10.2f}" if s in v else f"{'-':>10}" for s in subs)
              + (f"{ff:>12.2f}" if ff else f"{'-':>12}"))
tr = load("bench_train.json")
if tr:
    print("\ntraining steps, configs/small.yaml" + (" (partial)" if tr.get("partial") else "") + f": {tr['settings']['steps']} steps, median after {tr['settings']['warmup']}")
    for r in tr.get("runs", []):
        print(f"  {r['name']:<15}{r['tokens_per_s']:>12,.0f} tokens/s{r['step_ms']:>9.1f} ms/step  MFU "
              + (f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-") + "  peak "
              + (f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-") + f" GiB vs plan {r['plan_gib']:.2f}")
    for f in tr.get("figures", []):
        tgt = "" if f["target"] is None else f"  (target {f['target']}" + (")" if f["met"] else ", missed)")
        print(f"  {f['what']:<46}{f['value']:>8.3f}{tgt}")
vqa = load("bench_vqa.json")
if vqa:
    r = vqa["run"]
    print(f"\ntoy VQA, configs/small.yaml for {vqa['steps']} steps of the config's {vqa['config_steps']} ({vqa['steps_from']}):"
          f" wall {r['wall_s']:.0f} s, {r['tokens_per_s']:,.0f} tokens/s, peak "
          + (f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-") + f" GiB vs plan {r['plan_gib']:.2f}, last loss {r['loss_last']:.3f}")
    for name, e in vqa["eval"].items():
        o = e["overall"]
        blind = "-" if o.get("blind_acc") is None else f"{o['blind_acc']:.3f}"
        print(f"  {name:<18} acc {o['acc']:.3f}  blind {blind}  chance {o['chance']:.3f}  (n {o['n']})")
t = out / "tests.txt"
if t.is_file():
    lines = [l.strip("= ") for l in t.read_text().splitlines()
             if re.match(r"(no tests ran|\d+ (passed|failed|skipped|errors?|deselected|warnings?)\b.*) in [\d.]+s", l.strip("= "))]
    print("\ntests: " + ("; ".join(f"{d}: {l}" for d, l in zip(("tests/gpu", "tests/dryrun"), lines)) if lines else "no pytest summary line"))
EOF
}

effective() {  # effective NAME: the stage's limit, cut to what the budget has left
    local limit=${LIMIT[$1]} left=$((BUDGET - (SECONDS - T0)))
    echo $(( limit < left ? limit : left ))
}

stage() {  # stage NAME CMD...: run under the stage's effective limit, log to $OUT/NAME.txt
    local name=$1 limit
    limit=$(effective "$name")
    shift
    if (( limit < 10 )); then
        echo "== $name: skipped, the budget of $BUDGET s is spent"
        printf '%s\t-\t0\t%s\n' "$name" "${LIMIT[$name]}" >> "$STATUS"
        summary
        return
    fi
    local t0=$SECONDS
    echo "== $name (limit $limit s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 30 "$OUT/$name.txt"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$STATUS"
    summary
}

do_setup() {
    set -e
    if [ "$WHEELS" = 1 ]; then
        ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: run ../shared/device/carry.sh --av and carry .whl"; exit 1; }
        rm -rf "$WORK/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
    fi
    # A venv over $PYTHON's packages: fusion is not installed, yet tests run the fusion-* commands
    # from the interpreter's bin directory, so the entry points go there.
    rm -rf "$WORK/py"
    local dirs='import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))'
    if "$PYTHON" -m venv --without-pip --system-site-packages "$WORK/py"; then
        local site  # $PYTHON's own package directories too (when $PYTHON is itself a venv)
        site=$("$WORK/py/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$PYTHON" -c "$dirs" > "$site/_base.pth"
    else  # no venv module: a link to the interpreter, its package directories on PYTHONPATH
        echo "no venv: $WORK/py/bin/python is a link to $PYTHON"
        rm -rf "$WORK/py" && mkdir -p "$WORK/py/bin"
        ln -s "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$WORK/py/bin/python"
        "$PYTHON" -c "$dirs" | paste -sd: > "$WORK/py/pythonpath"
        export PYTHONPATH="$PYTHONPATH:$(cat "$WORK/py/pythonpath")"
    fi
    for pair in fusion-data:fusion.data.build fusion-train:fusion.train fusion-eval:fusion.eval.vqa \
                fusion-plan:fusion.plan fusion-convert:fusion.convert; do
        printf '#!%s\nimport sys\nif __name__ == "__main__":\n    from %s import main\n    sys.exit(main())\n' \
            "$PY" "${pair#*:}" > "$WORK/py/bin/${pair%%:*}"
        chmod +x "$WORK/py/bin/${pair%%:*}"
    done
    (nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true) 2>&1
    "$PY" - "$OUT/machine.json" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count()}
for name in ("deepspeed", "triton", "timm", "torchvision", "webdataset", "decord", "av", "tokenizers",
             "numpy", "PIL", "safetensors", "yaml"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # reported; the stage that needs it fails with its own message
        info[name] = f"unavailable: {type(e).__name__}: {e}"
def git(*args):
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
# a copy of the working tree without .git: the caller names the commit (FUSION_BENCH_SHA)
info["git_sha"] = git("rev-parse", "HEAD") or os.environ.get("FUSION_BENCH_SHA") or None
status = git("status", "--porcelain", "--untracked-files=no")
info["git_dirty"] = None if status is None else bool(status)
with open(sys.argv[1], "w") as f:  # a file, not stdout: imports may print there
    f.write(json.dumps(info, indent=1) + "\n")
import fusion.plan, fusion.train  # everything the stages need imports (else the stage fails here)
EOF
    cat "$OUT/machine.json"
}

do_toy() {
    set -e
    if [ $REHEARSE = 1 ]; then
        "$PY" -m fusion.data.build toy --output "$TOY" --n-text 200 --n-image 200 --n-video 24 \
            --n-vqa-train 200 --n-vqa-test 40 --n-vqa-compositional 0 --n-video-vqa-train 40 \
            --n-video-vqa-test 20 --samples-per-shard 50 --workers 2
    else
        "$PY" -m fusion.data.build toy --output "$TOY" --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))"
    fi
    "$PY" -m fusion.plan --config configs/small.yaml "data.tokenizer=$TOY/tokenizer.json" | tee "$OUT/plan_small.txt"
    "$PY" -m fusion.plan --config configs/small.yaml "data.tokenizer=$TOY/tokenizer.json" --json > "$OUT/plan_small.json"
}

do_tests() {  # the GPU tests first; then the dry run tier, which checks the same paths on stand-ins
    local rc=0
    "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" tests/gpu || rc=$?
    if [ -d tests/dryrun ]; then
        "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests_dryrun.xml" tests/dryrun || rc=$?
    fi
    return $rc
}

export -f do_setup do_toy do_tests
export ROOT OUT WORK PYTHON PY TOY WHEELS REHEARSE

echo "gpu_bench: stages setup toy ${STAGES[*]}; budget $BUDGET s; OUT=$OUT WORK=$WORK" \
     "$([ $REHEARSE = 1 ] && echo '(REHEARSAL: CPU, tiny sizes)')"
stage setup bash -c do_setup
[ -s "$WORK/py/pythonpath" ] && export PYTHONPATH="$PYTHONPATH:$(cat "$WORK/py/pythonpath")"
if ! [ -x "$PY" ]; then
    echo "gpu_bench: setup made no interpreter at $PY; see $OUT/setup.txt"
    summary; cat "$OUT/summary.txt"; exit 1
fi
stage toy bash -c do_toy
if [ $REHEARSE = 1 ]; then
    MOE_ARGS=(--tiny --repeats 2 --warmup 1 --tokens 512)
    TRAIN=(--tiny --steps 4 --warmup 2 --loader-batches 4)
    VQA=(--tiny --eval-limit 10)
    FIT=10
else
    MOE_ARGS=()
    TRAIN=(--steps 30 --warmup 10 --loader-batches 60)
    VQA=(--eval-limit 300)
    FIT=  # the vqa stage's limit less 50 s for the start, the evaluation and the final checkpoint
fi
for s in "${STAGES[@]}"; do
    case $s in
        moe)   stage moe "$PY" tools/bench_moe.py "${MOE_ARGS[@]}" --out "$OUT/bench_moe.json" ;;
        train) stage train "$PY" tools/bench_train.py "${TRAIN[@]}" --toy "$TOY" --workdir "$WORK/train" \
                   --runs moe,dense,text --out "$OUT/bench_train.json" "${TRAIN_OV[@]}"
               mkdir -p "$OUT/train_logs" && cp "$WORK"/train/runs/*.log "$OUT/train_logs/" 2>/dev/null ;;
        vqa)   stage vqa "$PY" tools/bench_train.py --vqa "${VQA[@]}" --toy "$TOY" --workdir "$WORK/vqa" \
                   --fit "${FIT:-$(( $(effective vqa) - 50 ))}" --fit-from "$OUT/bench_train.json" --out "$OUT/bench_vqa.json" "${TRAIN_OV[@]}"
               mkdir -p "$OUT/vqa_run" && cp "$WORK"/vqa/runs/vqa.log "$WORK"/vqa/runs/vqa/metrics.jsonl "$OUT/vqa_run/" 2>/dev/null
               cp -r "$WORK"/vqa/runs/vqa/eval "$OUT/vqa_run/" 2>/dev/null ;;
        tests) stage tests bash -c do_tests ;;
    esac
done
echo "gpu_bench: done after $((SECONDS - T0)) s of a $BUDGET s budget"
cat "$OUT/summary.txt"
