"""PPO (RLHF) of an InternVL-style VLM against a frozen reward model, under DeepSpeed ZeRO-3.

Four models, each its own DeepSpeed engine and all ZeRO-3 partitioned: the actor (the policy, from
``model.init_from``), the critic (a value per token, from the reward model unless ``ppo.critic_from``),
the frozen reward model (``ppo.reward_model``) and the frozen reference (the actor's start). Each step:
sample responses to image prompts from the actor (every rank stepping together), score them, turn
score and per-token KL penalty into GAE advantages, then ``ppo.epochs`` passes of clipped policy and
value updates over minibatches (``vlmscale.stages.ppo.PPOStep``, run by the shared loop
``vlmscale.train.loop.run_loop``). docs/ppo.md has the design and measured figures::

    deepspeed --num_gpus 2 recipes/ppo.py model.init_from=runs/sft-demo/hf ppo.reward_model=runs/reward-demo/hf
    deepspeed --num_gpus 2 recipes/ppo.py ppo.kl_target=2.0 train.max_steps=60   # adaptive KL coefficient

Outputs under ``output_dir``: config.yaml, metrics.jsonl (reward, kl, entropy, clip_fraction,
value_loss, policy_loss, kl_coef, response_length ... per step), tensorboard/, checkpoints/ (actor and
critic with their optimizers, KL coefficient, step; committed atomically), hf/ (the actor) and
eval.json. Re-running the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmscale.config import PPOConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.losses.ppo import KLController
from vlmscale.stages.ppo import PPOStep, PromptStream, build_engines
from vlmscale.train import safe_load
from vlmscale.train.launch import run_recipe
from vlmscale.train.loop import Trainer, final_eval_of, finish, run_loop
from vlmscale.train.metrics import MetricsLogger
from vlmscale.train.preemption import StopFlag
from vlmscale.train.setup import open_checkpoints, resume, start_run


def train_ppo(cfg: PPOConfig) -> int:
    # ---------------------------------------------------------------- build
    dist, ds_config = start_run(cfg)
    engines, assets = build_engines(cfg, ds_config=ds_config)
    for engine in (engines.actor, engines.critic):
        safe_load.install(engine)
    checkpoints = open_checkpoints(cfg, dist)
    start_step, client = resume(cfg, checkpoints, engines.actor, extra_engines={"critic": engines.critic})
    metrics = MetricsLogger(cfg.output_dir, enabled=dist.is_main, resume_step=start_step)
    kl_ctl = KLController(coef=cfg.ppo.kl_coef, target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon)
    if "kl_controller" in client:
        kl_ctl.load_state_dict(client["kl_controller"])
    prompts = PromptStream(resolve_path(cfg.ppo.prompts, cfg.data), seed=cfg.train.seed, assets=assets)
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data), output_dir=Path(cfg.output_dir),
                             dist=dist, assets=assets, video=cfg.data.video)
    evaluator.prepare(engines.actor.module, fresh=start_step == 0)
    if cfg.eval.at_start and start_step == 0:
        metrics.log(evaluator.run(engines.actor.module, step=0, final=True, name="start"))
    stop = StopFlag()

    # ---------------------------------------------------------------- train
    trainer = Trainer(cfg=cfg, engine=engines.actor, checkpoints=checkpoints, metrics=metrics, rank=dist.rank,
                      start_step=start_step, is_main=dist.is_main, extra_engines={"critic": engines.critic})
    step = PPOStep(cfg, engines, prompts=prompts, assets=assets, dist=dist, kl_ctl=kl_ctl)
    run_loop(trainer, step, stop=stop, evaluator=evaluator, eval_model=engines.actor.module, desc="ppo")

    # ---------------------------------------------------------------- export + final eval
    finish(cfg, engine=engines.actor, assets=assets, metrics=metrics, is_main=dist.is_main,
           meta={"reward_model": cfg.ppo.reward_model}, final_eval=final_eval_of(cfg, evaluator, engines.actor.module))
    return 0


if __name__ == "__main__":
    run_recipe(PPOConfig, train_ppo, sys.argv[1:])
