"""Projector alignment (stage 1 of the LLaVA / InternVL pipeline) under DeepSpeed ZeRO-3.

The vision encoder and the LLM stay frozen; only the pixel-shuffle MLP projector learns to map
vision features into the LLM's embedding space, on image-caption pairs (LLaVA's
two-stage recipe, Liu et al. 2023, "Visual Instruction Tuning"). Starts from a preset or a composition::

    deepspeed --num_gpus 2 recipes/align.py
    deepspeed recipes/align.py model.vision=/ckpt/InternVL3-1B-hf model.llm=/ckpt/Qwen2.5-0.5B \\
        'data.sources=[{name: cc3m, path: /data/cc3m_shards, weight: 1}]'

Outputs as every stage: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, hf/, eval.json
(held-out caption and text loss). The next stage starts with ``model.init_from=<output_dir>/hf``.
"""

import sys

from vlmscale.config import AlignConfig
from vlmscale.stages.lm import train_lm_stage
from vlmscale.train.launch import run_recipe

if __name__ == "__main__":
    run_recipe(AlignConfig, train_lm_stage, sys.argv[1:])
