"""Direct preference optimisation (sigmoid DPO, RLHF-V / RLAIF-V style) of a VLM under ZeRO-3.

Starts from an SFT export (default ``runs/sft-demo/hf``). The reference model's log-probabilities are
precomputed once by the starting model into a rank-sharded, resumable cache (``dpo.reference=cached``,
the default) or computed live by a frozen second ZeRO-3 engine (``dpo.reference=live``). Options: an
SFT term on the chosen answers (``dpo.sft_weight``) and RLHF-V's dense weighting of the tokens where
the answers differ (``dpo.segment_weight``, e.g. 5). Logs chosen/rejected rewards, margin and
preference accuracy; evaluates POPE before and after (``eval.suites``)::

    deepspeed --num_gpus 2 recipes/dpo.py data.demo_dir=runs/demo-data
    deepspeed recipes/dpo.py dpo.beta=0.1 dpo.reference=live dpo.segment_weight=5

Outputs under ``output_dir``: config.yaml, metrics.jsonl, ref_cache/, checkpoints/, hf/, eval/start.json,
eval/final.json and eval.json. Re-running resumes from the newest complete checkpoint.
"""

import sys

from vlmscale.config import DPOConfig
from vlmscale.stages.preference import train_dpo_stage
from vlmscale.train.launch import run_recipe

if __name__ == "__main__":
    run_recipe(DPOConfig, train_dpo_stage, sys.argv[1:])
