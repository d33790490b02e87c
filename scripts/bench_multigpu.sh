#!/usr/bin/env bash
# Multi-GPU benchmarks on one node with N GPUs (N from nvidia-smi, at least 2). Needs the package with its
# training extra installed in the active Python (`pip install -e ".[train]"`).
#
#   bash scripts/bench_multigpu.sh                          # all four steps
#   bash scripts/bench_multigpu.sh bench oracle             # only these steps
#   bash scripts/bench_multigpu.sh --out runs/mg train      # results elsewhere (or OUT_DIR=runs/mg)
#
# Steps:
#   bench:  torchrun the distributed prefill benchmark (scripts/bench_prefill_dist.py): real APB, Star and
#           exact APB over NCCL, one host per GPU, full attention on GPU 0; Llama-3.1-8B shapes with random
#           weights; 32K..128K (+256K by default with 4+ GPUs, LONG=0/1 to choose); compared with the
#           simulated numbers of benchmarks/prefill_results.json.
#   oracle: scripts/oracle_dist.py on N GPUs: exact-mode APB prefill over NCCL in bf16 against the one-GPU
#           model (tolerance stated in the script), sampled generation that stops at the same step on
#           every rank, and decoding steps replayed from CUDA graphs against eager ones.
#   generate: torchrun the generation benchmark (scripts/bench_generate.py): APB's decoding steps, eager
#           and replayed from a CUDA graph, one host per GPU, at 128K (Llama-3.1-8B shape).
#   train:  deepspeed train/retain.py --config configs/llama8b_random.yaml on 1 GPU and on N GPUs (tokens/s
#           per GPU, scaling); then an N-GPU run killed after its step-8 checkpoint and resumed with the same
#           command, compared step by step with the uninterrupted N-GPU run.
#
# Output folder (--out DIR, else $OUT_DIR, else runs/bench_multigpu): summary.txt (the lines printed here),
# topo.txt, one log per step, prefill_dist.{json,md}, oracle_dist.json, generate_dist.json, the training runs (train_1gpu/,
# train_<N>gpu/, train_killed/; started afresh each time) and their metrics.
#
# Env: BENCH_S (stop starting new prefill settings after this many seconds; default 0 = run them all),
# RESUME=1 (the bench continues the output folder's prefill_dist.json: an interrupted or time-boxed run
# times only what it lacks), BENCH_ARGS (more arguments of scripts/bench_prefill_dist.py: e.g. "--backends
# flash --compile-layers" as in benchmarks/RESULTS.md, "--calibrate 131072" to fit the balanced split first),
# LONG=0|1 (256K), STEP_TIMEOUT_S (a step that runs longer is stopped and reported; default 3600),
# TRAIN_STEPS (default 16), ZERO (ZeRO stage of the training runs; default the config's),
# CONFIG (default configs/llama8b_random.yaml). Larger bases with random weights and the real shapes (no
# download):
#   CONFIG=configs/qwen14b_random.yaml bash scripts/bench_multigpu.sh train     # Qwen-2.5-14B, ZeRO-2
#   CONFIG=configs/yi34b_random.yaml bash scripts/bench_multigpu.sh train       # Yi-34B, ZeRO-3
set -u
usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

OUT_DIR=${OUT_DIR:-runs/bench_multigpu}
STEPS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    -h|--help) usage; exit 0 ;;
    bench|oracle|generate|train) STEPS+=("$1"); shift ;;
    *) echo "unknown argument: $1 (steps: bench oracle generate train; --out DIR)" >&2; exit 2 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(bench oracle generate train)
STEPS=" ${STEPS[*]} "

mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)  # absolute: the steps run from the repo root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) off in NCCL, PyTorch symmetric memory and NVSHMEM: the recorded results
# (benchmarks/RESULTS.md) were measured this way, and not every driver or container supports multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BENCH_S=${BENCH_S:-0}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-3600}
TRAIN_STEPS=${TRAIN_STEPS:-16}
CONFIG=${CONFIG:-configs/llama8b_random.yaml}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT_DIR/summary.txt"; }
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
status() {  # status NAME RC: one line, naming a timeout as such
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then echo "$1: stopped after STEP_TIMEOUT_S=${STEP_TIMEOUT_S}s"
  else echo "$1 rc=$2"; fi
}

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs NVIDIA GPUs" >&2; exit 2; }
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
MACHINE="$N x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
log "machine: $MACHINE, steps:$STEPS, date $(date -u '+%Y-%m-%d %H:%M UTC'), output: $OUT_DIR"
nvidia-smi topo -m > "$OUT_DIR/topo.txt" 2>&1
if [ "$N" -lt 2 ]; then log "needs at least 2 GPUs, found $N"; exit 2; fi
python3 -c "import apb, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT_DIR/summary.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { log "apb is not importable: pip install -e \".[train]\" first"; exit 3; }

case "$STEPS" in *" bench "*)
  LENGTHS="32768 65536 131072"
  [ "${LONG:-$(( N >= 4 ))}" = 1 ] && LENGTHS="$LENGTHS 262144"  # 256K: default with 4+ GPUs
  t=$(date +%s)
  timeout -k 10 "$STEP_TIMEOUT_S" torchrun --nproc-per-node "$N" --master-port "$(free_port)" \
    scripts/bench_prefill_dist.py --lengths $LENGTHS --deadline-s "$BENCH_S" $([ "${RESUME:-0}" = 1 ] && echo --resume) \
    --simulated-json benchmarks/prefill_results.json --out "$OUT_DIR/prefill_dist.json" \
    --markdown "$OUT_DIR/prefill_dist.md" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1
  rc=$?
  log "$(status bench $rc) in $(( $(date +%s) - t ))s (log: bench.log)"
  grep -E "^\[|rror" "$OUT_DIR/bench.log" | tail -20
  [ -f "$OUT_DIR/prefill_dist.md" ] && cat "$OUT_DIR/prefill_dist.md"
;; esac

case "$STEPS" in *" oracle "*)
  t=$(date +%s)
  timeout -k 10 "$STEP_TIMEOUT_S" torchrun --nproc-per-node "$N" --master-port "$(free_port)" \
    scripts/oracle_dist.py --out "$OUT_DIR/oracle_dist.json" > "$OUT_DIR/oracle.log" 2>&1
  rc=$?
  log "$(status oracle $rc) (0 = passed on every rank) in $(( $(date +%s) - t ))s (log: oracle.log)"
  grep -E '"passed|max_abs|bound|steps|rror' "$OUT_DIR/oracle.log" | head -20
;; esac

case "$STEPS" in *" generate "*)
  t=$(date +%s)
  timeout -k 10 "$STEP_TIMEOUT_S" torchrun --nproc-per-node "$N" --master-port "$(free_port)" \
    scripts/bench_generate.py --length 131072 --methods apb-eager apb-graphs \
    --json "$OUT_DIR/generate_dist.json" > "$OUT_DIR/generate.log" 2>&1
  rc=$?
  log "$(status generate $rc) in $(( $(date +%s) - t ))s (log: generate.log)"
  grep -E "apb-|rror" "$OUT_DIR/generate.log" | tail -5
;; esac

case "$STEPS" in *" train "*)
  if ! python3 -c "import deepspeed" 2>/dev/null; then
    log "train: deepspeed is not installed (pip install -e \".[train]\")"; exit 3
  fi
  train() {  # train GPUS RUN_DIR: the project's training command on a free port
    local zero=()
    [ -n "${ZERO:-}" ] && zero=(--set "deepspeed.zero_stage=$ZERO")
    deepspeed --num_gpus "$1" --master_port "$(free_port)" train/retain.py \
      --config "$CONFIG" --set output_dir="$2" --set logging.tqdm=false \
      --set optim.max_steps="$TRAIN_STEPS" --set checkpoint.every=8 ${zero[@]+"${zero[@]}"}
  }
  export -f train free_port
  export CONFIG TRAIN_STEPS
  export ZERO=${ZERO:-}
  # a run folder left from an earlier time would be resumed, not measured: start each one afresh
  rm -rf "$OUT_DIR/train_1gpu" "$OUT_DIR/train_${N}gpu" "$OUT_DIR/train_killed"
  for gpus in 1 "$N"; do
    t=$(date +%s)
    timeout -k 10 "$STEP_TIMEOUT_S" bash -c 'train "$@"' _ "$gpus" "$OUT_DIR/train_${gpus}gpu" \
      > "$OUT_DIR/train_${gpus}gpu.log" 2>&1
    rc=$?
    log "$(status "train $gpus GPU(s)" $rc) in $(( $(date +%s) - t ))s (log: train_${gpus}gpu.log)"
    cp "$OUT_DIR/train_${gpus}gpu/metrics.jsonl" "$OUT_DIR/train_${gpus}gpu_metrics.jsonl" 2>/dev/null
  done
  # kill the N-GPU run right after its step-8 checkpoint (the whole process group, as a crash would),
  # then the same command again: it resumes from that checkpoint
  killed=$OUT_DIR/train_killed
  setsid bash -c 'train "$@"' _ "$N" "$killed" > "$OUT_DIR/train_killed.log" 2>&1 &
  PID=$!
  t=$(date +%s)
  while kill -0 $PID 2>/dev/null && ! grep -qs step_00000008 "$killed/checkpoints/latest" \
    && [ $(( $(date +%s) - t )) -lt "$STEP_TIMEOUT_S" ]; do sleep 0.2; done
  kill -9 -- -$PID 2>/dev/null; wait $PID 2>/dev/null
  log "killed the $N-GPU run at $(cat "$killed/checkpoints/latest" 2>/dev/null || echo 'no checkpoint')"
  t=$(date +%s)
  timeout -k 10 "$STEP_TIMEOUT_S" bash -c 'train "$@"' _ "$N" "$killed" > "$OUT_DIR/train_resumed.log" 2>&1
  rc=$?
  log "$(status resumed $rc) in $(( $(date +%s) - t ))s: $(grep -m1 -o 'resumed from.*' "$OUT_DIR/train_resumed.log")"
  cp "$killed/metrics.jsonl" "$OUT_DIR/train_killed_metrics.jsonl" 2>/dev/null
  N=$N OUT_DIR=$OUT_DIR python3 - <<'PY' 2>&1 | tee -a "$OUT_DIR/summary.txt"
import json, os, statistics
out, n = os.environ["OUT_DIR"], int(os.environ["N"])
def load(name):
    try:
        rows = {}
        for line in open(f"{out}/{name}"):
            r = json.loads(line)
            rows[r["step"]] = r  # a resumed run rewrites the steps after its checkpoint: keep the last
        return rows
    except OSError:
        return {}
one, many, killed = (load(f"train_{k}_metrics.jsonl") for k in ("1gpu", f"{n}gpu", "killed"))
per_gpu = {}
for gpus, rows in ((1, one), (n, many)):
    rates = [r["tokens_per_s"] for s, r in rows.items() if s >= 2]  # step 1 includes warm-up
    if rates:
        per_gpu[gpus] = statistics.median(rates) / gpus
        print(f"train {gpus} GPU(s): median {statistics.median(rates):.0f} tokens/s = {per_gpu[gpus]:.0f} per GPU")
if 1 in per_gpu and n in per_gpu:
    print(f"scaling 1 -> {n} GPUs: {per_gpu[n] * n / per_gpu[1]:.2f}x (ideal {n}), efficiency {per_gpu[n] / per_gpu[1]:.2f}")
common = sorted(set(many) & set(killed))
if common:
    diff = max(abs(many[s]["loss"] - killed[s]["loss"]) / abs(many[s]["loss"]) for s in common)
    print(f"kill-and-resume vs uninterrupted {n}-GPU run: {len(common)} common steps, max rel loss diff {diff:.3g}")
PY
;; esac
log "done in $(( $(date +%s) - T0 ))s; results in $OUT_DIR"
