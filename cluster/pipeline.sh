#!/usr/bin/env bash
# The staged pipeline on the built-in demo: llm -> align -> pretrain -> sft, each starting from the
# previous stage's Hugging Face export. Any stage re-run resumes from its newest checkpoint.
# Stage "llm" stands in for downloading a pretrained LLM: the demo preset's LLM is created from
# scratch, so it first learns the demo's language from text alone (recipes/configs/demo_llm.yaml).
#
#   bash cluster/pipeline.sh                 # 2 ranks (CPU) or set NUM_GPUS
#   NUM_GPUS=8 OUT=runs/pipeline bash cluster/pipeline.sh train.micro_batch_size=4
#   MASTER_PORT=29517 bash cluster/pipeline.sh      # when another job on this host holds port 29500
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pipeline}
LAUNCH=(deepspeed --num_gpus "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}")

"${LAUNCH[@]}" recipes/pretrain.py --config recipes/configs/demo_llm.yaml output_dir="$OUT/llm" "$@"
"${LAUNCH[@]}" recipes/align.py output_dir="$OUT/align" model.init_from="$OUT/llm/hf" "$@"
"${LAUNCH[@]}" recipes/pretrain.py output_dir="$OUT/pretrain" model.init_from="$OUT/align/hf" "$@"
"${LAUNCH[@]}" recipes/sft.py output_dir="$OUT/sft" model.init_from="$OUT/pretrain/hf" "$@"
echo "pipeline done: $OUT/sft/hf"
