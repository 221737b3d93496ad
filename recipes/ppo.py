"""PPO (RLHF) of an InternVL-style VLM against a frozen reward model, under DeepSpeed ZeRO-3.

Four models, each its own DeepSpeed engine and all ZeRO-3 partitioned: the actor (the policy, from
``model.init_from``), the critic (a value per token, from the reward model unless ``ppo.critic_from``),
the frozen reward model (``ppo.reward_model``) and the frozen reference (the actor's start). Each step:
sample responses to image prompts from the actor (every rank stepping together), score them, turn
score and per-token KL penalty into GAE advantages, then ``ppo.epochs`` passes of clipped policy and
value updates over minibatches. docs/ppo.md has the design and measured figures::

    deepspeed --num_gpus 2 recipes/ppo.py model.init_from=runs/sft-demo/hf ppo.reward_model=runs/reward-demo/hf
    deepspeed --num_gpus 2 recipes/ppo.py ppo.kl_target=2.0 train.max_steps=60   # adaptive KL coefficient

Outputs under ``output_dir``: config.yaml, metrics.jsonl (reward, kl, entropy, clip_fraction,
value_loss, policy_loss, kl_coef, response_length ... per step), tensorboard/, checkpoints/ (actor and
critic with their optimizers, KL coefficient, step; committed atomically), hf/ (the actor) and
eval.json. Re-running the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlmscale.config import PPOConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.distributed.group import device
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.losses.ppo import KLController
from vlmscale.stages.ppo import (
    PromptStream,
    advantages,
    banned_tokens,
    build_engines,
    chosen_matches,
    make_rollout,
    ppo_update,
    rollout_generator,
    step_metrics,
)
from vlmscale.train import faults, safe_load
from vlmscale.train.launch import recipe_main
from vlmscale.train.metrics import MetricsLogger
from vlmscale.train.preemption import Preempted, StopFlag
from vlmscale.train.setup import open_checkpoints, resume, start_run
from vlmscale.train.step import export_hf
from vlmscale.train.watchdog import Watchdog


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
    out = Path(cfg.output_dir)
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data), output_dir=out, dist=dist,
                             assets=assets, video=cfg.data.video)
    evaluator.prepare(engines.actor.module, fresh=start_step == 0)
    if cfg.eval.at_start and start_step == 0:
        metrics.log(evaluator.run(engines.actor.module, step=0, final=True, name="start"))
    stop = StopFlag()
    watchdog = Watchdog(cfg.output_dir, rank=dist.rank, timeout_s=cfg.train.hang_timeout_s)
    dev = device()
    per_rank = cfg.ppo.rollout_batch_size

    # ---------------------------------------------------------------- train
    engines.actor.train()
    engines.critic.train()
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not dist.is_main, desc="ppo", dynamic_ncols=True)
    for step in range(start_step, cfg.train.max_steps):
        done = step + 1
        watchdog.beat()
        faults.fire("step", done)
        t0 = time.time()
        batch, chosen = prompts.prompts(step=step, rank=dist.rank, world_size=dist.world_size, count=per_rank)
        generator = rollout_generator(cfg.train.seed, step=step, rank=dist.rank)
        rollout = make_rollout(engines, batch, cfg=cfg, assets=assets, dist=dist, generator=generator, device=dev)
        adv = advantages(rollout, cfg=cfg, kl_coef=kl_ctl.coef)
        t_rollout = time.time() - t0
        update = ppo_update(engines, rollout, adv, cfg=cfg, world_size=dist.world_size, generator=generator,
                            device=dev, banned=banned_tokens(assets), train_actor=done > cfg.ppo.freeze_actor_steps,
                            poison=faults.poison_loss(done))
        matches = chosen_matches(rollout, chosen, assets=assets)
        row = {"step": done, **step_metrics(rollout, adv, update, matches=matches), "kl_coef": kl_ctl.coef,
               "lr": engines.actor.get_lr()[0], "actor_grad_norm": float(engines.actor.get_global_grad_norm() or 0.0),
               "critic_grad_norm": float(engines.critic.get_global_grad_norm() or 0.0),
               "rollout_seconds": t_rollout, "step_seconds": time.time() - t0}
        kl_ctl.update(row["kl"], n=row["rollouts"])
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.max_steps:
            metrics.log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}")
        signum = stop.any_rank()
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.train.max_steps or signum:
            watchdog.beat(cfg.checkpoint.save_timeout_s)
            state = {"step": done, "samples_seen": done * per_rank * dist.world_size,
                     "kl_controller": kl_ctl.state_dict(), "world_size": dist.world_size}
            checkpoints.save(engines.actor, step=done, client_state=state, extra_engines={"critic": engines.critic})
        if signum and done < cfg.train.max_steps:
            watchdog.close()
            metrics.close()
            raise Preempted(done, signum)
    bar.close()
    watchdog.close()

    # ---------------------------------------------------------------- export + final eval
    if cfg.checkpoint.export:
        export_hf(engines.actor, assets=assets, out_dir=out / "hf",
                  meta={"stage": "ppo", "steps": cfg.train.max_steps, "reward_model": cfg.ppo.reward_model},
                  shard_size=cfg.checkpoint.export_shard_size)
    if cfg.eval.at_end:
        record = evaluator.run(engines.actor.module, step=cfg.train.max_steps, final=True)
        metrics.log(record)
        if dist.is_main:
            (out / "eval.json").write_text(json.dumps(record, indent=2))
    metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main(PPOConfig, train_ppo, sys.argv[1:]))
