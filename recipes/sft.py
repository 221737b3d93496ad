"""Joint supervised fine-tuning of an InternVL-style VLM under DeepSpeed ZeRO-3.

Trains the projector and the LLM (and, by default for the from-scratch demo, the vision
encoder) on a weighted mixture of conversation shards — images anywhere, any count — re-blended
with text-only data, then exports a Hugging Face model. With no arguments it trains the built-in
demo model on the built-in demo data (generated on first use)::

    deepspeed --num_gpus 2 recipes/sft.py
    deepspeed recipes/sft.py --config recipes/configs/sft_llava_example.yaml train.max_steps=100
    deepspeed recipes/sft.py model.init_from=runs/pretrain-demo/hf policy.vision.trainable=false

Outputs (all under ``output_dir``): config.yaml, metrics.jsonl, tensorboard/, checkpoints/,
hf/ (safetensors + tokenizer + processor), eval/ and eval.json (held-out scores of the final
model). Re-running the same command resumes from the newest complete checkpoint (``resume=auto``).
"""

import sys

from vlmscale.config import SFTConfig
from vlmscale.stages.lm import train_lm_stage
from vlmscale.train.launch import run_recipe

if __name__ == "__main__":
    run_recipe(SFTConfig, train_lm_stage, sys.argv[1:])
