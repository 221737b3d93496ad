"""Interleaved image-text pretraining (stage 2, VILA style) under DeepSpeed ZeRO-3.

The projector and the LLM train, the vision encoder stays frozen, on interleaved documents
(images anywhere in the text) mixed 1:1 with image-text pairs (VILA, Lin et al. 2024,
"On Pre-training for Visual Language Models": updating the LLM is essential; interleaved data helps)::

    deepspeed --num_gpus 2 recipes/pretrain.py model.init_from=runs/align-demo/hf
    deepspeed recipes/pretrain.py model.init_from=runs/align/hf \\
        'data.sources=[{name: mmc4, path: /data/mmc4, weight: 1}, {name: coyo, path: /data/coyo, weight: 1}]'

Outputs as every stage; the next stage starts with ``model.init_from=<output_dir>/hf``.
"""

import sys

from vlmscale.config import PretrainConfig
from vlmscale.stages.lm import train_lm_stage
from vlmscale.train.launch import run_recipe

if __name__ == "__main__":
    run_recipe(PretrainConfig, train_lm_stage, sys.argv[1:])
