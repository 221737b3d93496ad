"""Bradley-Terry reward model: the VLM with a scalar head on the last token, on preference pairs, under ZeRO-3.

Starts from an SFT export (default ``runs/sft-demo/hf``) with a fresh head, trains on pairs of
chosen/rejected answers (both sides of a pair in the same micro-batch), reports held-out pair
accuracy, and exports what ``recipes/ppo.py`` loads: ``<output_dir>/hf`` = a stock HF InternVL export
plus ``score_head.safetensors`` (``vlmscale.model.heads``)::

    deepspeed --num_gpus 2 recipes/reward.py data.demo_dir=runs/demo-data
    deepspeed recipes/reward.py model.init_from=runs/sft/hf data.sources='[{name: rlaifv, path: data/rlaifv-shards}]' \\
        reward.heldout_pairs=data/rlaifv-heldout

Outputs under ``output_dir``: config.yaml, metrics.jsonl (loss, accuracy, margin per step), checkpoints/,
hf/, eval.json (``eval/pairs/accuracy``). Re-running resumes from the newest complete checkpoint.
"""

import sys

from vlmscale.config import RewardConfig
from vlmscale.stages.preference import train_reward_stage
from vlmscale.train.launch import run_recipe

if __name__ == "__main__":
    run_recipe(RewardConfig, train_reward_stage, sys.argv[1:])
