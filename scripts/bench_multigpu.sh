#!/bin/bash
# Issue 7 on an N-GPU machine (N from nvidia-smi), in one device call, everything under $OUT:
#   1. bench:  torchrun the distributed prefill benchmark (scripts/bench_prefill_dist.py): real APB and Star
#              over NCCL, one host per GPU, full attention on GPU 0; Llama-3.1-8B shapes; 32K..128K (+256K
#              by default with 4+ GPUs, LONG=0/1 to choose); compared with the simulated numbers of benchmarks/prefill_results.json.
#   2. oracle: scripts/oracle_dist.py on N GPUs: exact-mode APB prefill over NCCL in bf16 vs the one-GPU model
#              (tolerance stated in the script), sampled generate with every rank stopping at the same step.
#   3. train:  deepspeed train/retain.py --config configs/llama8b_random.yaml on 1 GPU and on N GPUs (tokens/s
#              per GPU, scaling), the N-GPU run killed after its step-8 checkpoint and resumed, compared with an
#              uninterrupted N-GPU run.
# Device call (carry [".whl"]: the deepspeed wheel and its dependencies, as scripts/eval_smollm2_gpu.sh does):
#   kind nvidia-h200-x8 (or -x4 / -x2), command: bash scripts/bench_multigpu.sh            # all three steps
#   bash scripts/bench_multigpu.sh bench oracle      # only these steps (a call lasts at most 600 s)
# Env: BUDGET_S (default 570: the whole call), BENCH_S (default 240), LONG=0|1 (256K), ZERO (ZeRO stage of
# the training runs, default the config's), TRAIN_STEPS (default 16), CONFIG (default
# configs/llama8b_random.yaml). The issue's real-sized legs, random weights with the real shapes (the machine
# has no network for configs/qwen14b.yaml's download):
#   CONFIG=configs/qwen14b_random.yaml bash scripts/bench_multigpu.sh train     # Qwen-2.5-14B, ZeRO-2
#   CONFIG=configs/yi34b_random.yaml bash scripts/bench_multigpu.sh train       # Yi-34B, ZeRO-3
set -u
export PYTHONUNBUFFERED=1
# NVLink multicast off (the device README): NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/bench_multigpu_out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
BENCH_S=${BENCH_S:-240}
TRAIN_STEPS=${TRAIN_STEPS:-16}
STEPS=${*:-bench oracle train}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }

N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
MACHINE="$N x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
log "machine: $MACHINE, steps: $STEPS, date $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
if [ "$N" -lt 2 ]; then log "needs at least 2 GPUs, found $N"; exit 2; fi

# apb importable without pip (apb/, kernels/ -> apb.kernels, train/ -> apb.train, data/ -> apb.data)
mkdir -p /tmp/pkg/apb && cp -r apb/. /tmp/pkg/apb/ && cp -r kernels /tmp/pkg/apb/kernels \
  && cp -r train /tmp/pkg/apb/train && cp -r data /tmp/pkg/apb/data
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/summary.txt"

case " $STEPS " in *" bench "*)
  LENGTHS="32768 65536 131072"
  [ "${LONG:-$(( N >= 4 ))}" = 1 ] && LENGTHS="$LENGTHS 262144"  # 256K: default with 4+ GPUs
  SIM=benchmarks/prefill_results.json
  t=$(date +%s)
  timeout -k 10 $(( BENCH_S + 60 )) python3 -m torch.distributed.run --nproc-per-node "$N" --master-port 29701 \
    scripts/bench_prefill_dist.py --lengths $LENGTHS --deadline-s "$BENCH_S" \
    --simulated-json "$SIM" --out "$OUT/prefill_dist.json" --markdown "$OUT/prefill_dist.md" \
    > "$OUT/bench.log" 2>&1
  log "bench rc=$? in $(( $(date +%s) - t ))s"
  grep -E "^\[|rror" "$OUT/bench.log" | tail -20
  [ -f "$OUT/prefill_dist.md" ] && cat "$OUT/prefill_dist.md"
;; esac

case " $STEPS " in *" oracle "*)
  t=$(date +%s)
  timeout -k 10 180 python3 -m torch.distributed.run --nproc-per-node "$N" --master-port 29702 \
    scripts/oracle_dist.py --out "$OUT/oracle_dist.json" > "$OUT/oracle.log" 2>&1
  log "oracle rc=$? (0 = passed on every rank) in $(( $(date +%s) - t ))s"
  grep -E '"passed|max_abs|bound|steps|rror' "$OUT/oracle.log" | head -20
;; esac

case " $STEPS " in *" train "*)
  if ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      || { log "no deepspeed wheels (carry .whl)"; exit 3; }
  fi
  ZSET=()
  [ -n "${ZERO:-}" ] && ZSET=(--set "deepspeed.zero_stage=$ZERO")
  train() {  # train GPUS OUTPUT_DIR PORT
    python3 -m deepspeed.launcher.runner --num_gpus "$1" --master_port "$3" train/retain.py \
      --config "${CONFIG:-configs/llama8b_random.yaml}" --set output_dir="$2" --set logging.tqdm=false \
      --set optim.max_steps="$TRAIN_STEPS" --set checkpoint.every=8 "${ZSET[@]}"
  }
  for run in "1 /tmp/mg_train1 29711" "$N /tmp/mg_trainN 29712"; do
    set -- $run
    [ "$(left)" -lt 120 ] && { log "train $1 GPU(s): skipped, $(left)s left"; continue; }
    t=$(date +%s)
    timeout -k 10 $(( $(left) - 60 )) bash -c "$(declare -f train); ZSET=(${ZSET[*]}); TRAIN_STEPS=$TRAIN_STEPS; \
      train $1 $2 $3" > "$OUT/train_$1gpu.log" 2>&1
    log "train $1 GPU(s) rc=$? in $(( $(date +%s) - t ))s"
    cp "$2/metrics.jsonl" "$OUT/train_$1gpu_metrics.jsonl" 2>/dev/null
  done
  # kill the N-GPU run right after its step-8 checkpoint, then the same command again (resumes)
  if [ "$(left)" -gt 150 ]; then
    setsid bash -c "$(declare -f train); ZSET=(${ZSET[*]}); TRAIN_STEPS=$TRAIN_STEPS; \
      train $N /tmp/mg_killed 29713" > "$OUT/train_killed.log" 2>&1 &
    PID=$!
    while kill -0 $PID 2>/dev/null && ! grep -qs step_00000008 /tmp/mg_killed/checkpoints/latest \
      && [ "$(left)" -gt 90 ]; do sleep 0.2; done
    kill -9 -- -$PID 2>/dev/null; wait $PID
    log "killed the $N-GPU run at $(cat /tmp/mg_killed/checkpoints/latest 2>/dev/null || echo 'no checkpoint')"
    t=$(date +%s)
    timeout -k 10 $(( $(left) - 10 )) bash -c "$(declare -f train); ZSET=(${ZSET[*]}); TRAIN_STEPS=$TRAIN_STEPS; \
      train $N /tmp/mg_killed 29714" > "$OUT/train_resumed.log" 2>&1
    log "resumed rc=$? in $(( $(date +%s) - t ))s: $(grep -m1 -o 'resumed from.*' "$OUT/train_resumed.log")"
    cp /tmp/mg_killed/metrics.jsonl "$OUT/train_killed_metrics.jsonl" 2>/dev/null
  else
    log "kill-and-resume: skipped, $(left)s left"
  fi
  N=$N OUT=$OUT python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, os, statistics
out, n = os.environ["OUT"], int(os.environ["N"])
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
log "done in $(( $(date +%s) - T0 ))s"
