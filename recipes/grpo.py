"""GRPO with verifiable rewards for an InternVL-style VLM, under DeepSpeed ZeRO-3.

No critic and no reward model: each prompt (cut from conversation shards: the turns before the last
assistant turn, whose text is the reference answer) is sampled ``grpo.group_size`` times, every
completion is scored by the rewards in ``grpo.rewards`` (exact match, numeric match, box IoU, a
format check, or your own ``module:function``), and the group-normalised advantages drive the
clipped ratio update (``vlmscale.stages.grpo.GRPOStep``, run by the shared loop
``vlmscale.train.loop.run_loop``). A frozen reference is built only when ``grpo.kl_coef > 0``.
docs/rl.md has the design, options and measured figures::

    deepspeed --num_gpus 2 recipes/grpo.py model.init_from=runs/sft-demo/hf
    deepspeed --num_gpus 2 recipes/grpo.py grpo.advantage=dr_grpo grpo.loss_agg=constant   # Dr. GRPO
    deepspeed --num_gpus 2 recipes/grpo.py grpo.clip_high=0.28 grpo.loss_agg=token          # DAPO's clip and loss
    deepspeed --num_gpus 2 recipes/grpo.py 'grpo.rewards={exact_match: 1.0, "my_rewards:fn": 0.5}'

Outputs under ``output_dir``: config.yaml, metrics.jsonl (reward and each reward's mean/std, the
zero-variance group fraction, clip fraction, KL, entropy, response length, rollout and update
tokens/s per step), checkpoints/, hf/ (the policy) and eval.json. Re-running the same command
resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmscale.config import GRPOConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.eval.rewards import RewardSet
from vlmscale.stages.grpo import ConversationPrompts, GRPOStep, build_engines
from vlmscale.train import safe_load
from vlmscale.train.launch import run_recipe
from vlmscale.train.loop import Trainer, final_eval_of, finish, run_loop
from vlmscale.train.metrics import MetricsLogger
from vlmscale.train.preemption import StopFlag
from vlmscale.train.setup import open_checkpoints, resume, start_run


def train_grpo(cfg: GRPOConfig) -> int:
    # ---------------------------------------------------------------- build
    dist, ds_config = start_run(cfg)
    rewards = RewardSet.from_config(cfg.grpo.rewards, format_pattern=cfg.grpo.format_pattern)
    engines, assets = build_engines(cfg, ds_config=ds_config)
    safe_load.install(engines.policy)
    checkpoints = open_checkpoints(cfg, dist)
    start_step, client = resume(cfg, checkpoints, engines.policy)
    metrics = MetricsLogger(cfg.output_dir, enabled=dist.is_main, resume_step=start_step)
    prompts = ConversationPrompts([resolve_path(p, cfg.data) for p in cfg.grpo.prompts], seed=cfg.train.seed,
                                  assets=assets)
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data), output_dir=Path(cfg.output_dir),
                             dist=dist, assets=assets, video=cfg.data.video)
    evaluator.prepare(engines.policy.module, fresh=start_step == 0)
    if cfg.eval.at_start and start_step == 0:
        metrics.log(evaluator.run(engines.policy.module, step=0, final=True, name="start"))
    stop = StopFlag()

    # ---------------------------------------------------------------- train
    trainer = Trainer(cfg=cfg, engine=engines.policy, checkpoints=checkpoints, metrics=metrics, rank=dist.rank,
                      start_step=start_step, is_main=dist.is_main)
    step = GRPOStep(cfg, engines, prompts=prompts, assets=assets, dist=dist, rewards=rewards,
                    samples_seen=int(client.get("samples_seen", 0)), start_step=start_step)
    run_loop(trainer, step, stop=stop, evaluator=evaluator, eval_model=engines.policy.module, desc="grpo")

    # ---------------------------------------------------------------- export + final eval
    finish(cfg, engine=engines.policy, assets=assets, metrics=metrics, is_main=dist.is_main,
           meta={"prompts_seen": step.samples_seen, "rewards": cfg.grpo.rewards},
           final_eval=final_eval_of(cfg, evaluator, engines.policy.module))
    return 0


if __name__ == "__main__":
    run_recipe(GRPOConfig, train_grpo, sys.argv[1:])
