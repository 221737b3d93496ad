"""PPO under ZeRO-3: the four models, rollouts with every rank stepping together, and the update.

Actor and critic are training engines (each its own optimizer); the reward model and the reference
are frozen engines without one. All four are built partitioned (``build_partitioned``), so no rank
holds any of them whole. Every rank runs the same forwards in the same order: each has the same
number of rollouts, generation agrees the number of decode steps over ranks
(:func:`vlmscale.eval.generate.rollout` with ``local=True``), and the update walks the same number
of minibatches everywhere. The objective's maths lives in :mod:`vlmscale.losses.ppo`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmscale.config.schema import ModelConfig, PPOConfig
from vlmscale.constants import IM_END, IMG_CONTEXT, IMG_END, IMG_START, PAD, VIDEO
from vlmscale.data.render import Rendered, render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import DistInfo, all_reduce_sum
from vlmscale.distributed.group import device as _device
from vlmscale.distributed.zero import frozen_engine, load_weights, partitioned_init, start_micro_batch
from vlmscale.config.load import parse_size
from vlmscale.eval.generate import rollout
from vlmscale.losses import ppo as objective
from vlmscale.model.forward import vlm_logits
from vlmscale.model.heads import ScalarHeadModel, head_weights, last_token_scores, token_values
from vlmscale.model.policy import apply_policy
from vlmscale.model.tokenizer import ProcessorAssets
from vlmscale.precision import torch_dtype
from vlmscale.train import faults
from vlmscale.train.loop import StepOutcome
from vlmscale.train.progress import NonFiniteTraining
from vlmscale.train.setup import build_partitioned
from vlmscale.train.step import create_engine

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the four engines


@dataclass
class PPOEngines:
    actor: Any  # trains; the policy
    critic: Any  # trains; ScalarHeadModel, a value per token
    reward: Any  # frozen ScalarHeadModel, a score per sequence
    reference: Any  # frozen copy of the actor's start


def build_scalar_head(path: str, *, model_cfg: ModelConfig, ds_config: dict[str, Any], max_tiles: int | None,
                      dtype: torch.dtype, name: str) -> ScalarHeadModel:
    """A reward-model export (HF InternVL dir + ``score_head.safetensors``) as a partitioned ScalarHeadModel.

    Like ``heads.load_scalar_head_model``, but the head too is partitioned as it is built, so no part of
    the model is ever whole on a rank."""
    weights = head_weights(path)  # checks the head file is there before anything is built
    vlm, _ = build_partitioned(dataclasses.replace(model_cfg, init_from=path), ds_config=ds_config, max_tiles=max_tiles,
                               dtype=dtype, name=name)
    with partitioned_init(ds_config):
        model = ScalarHeadModel(vlm)
    load_weights(model, weights)
    return model


def build_engines(cfg: PPOConfig, *, ds_config: dict[str, Any]) -> tuple[PPOEngines, ProcessorAssets]:
    dtype = torch_dtype(cfg.train.precision)
    tiles = cfg.tile_limit()
    actor, assets = build_partitioned(cfg.model, ds_config=ds_config, max_tiles=tiles, dtype=dtype, name="actor")
    reference, _ = build_partitioned(cfg.model, ds_config=ds_config, max_tiles=tiles, dtype=dtype, name="reference")
    reward = build_scalar_head(cfg.ppo.reward_model, model_cfg=cfg.model, ds_config=ds_config, max_tiles=tiles,
                               dtype=dtype, name="reward")
    critic = build_scalar_head(cfg.ppo.critic_from or cfg.ppo.reward_model, model_cfg=cfg.model, ds_config=ds_config,
                               max_tiles=tiles, dtype=dtype, name="critic")
    updates = cfg.train.max_steps * num_updates(cfg)
    groups, summary = apply_policy(actor, cfg.policy, base_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    log.info("actor parameter policy:\n%s", summary.table())
    actor_engine, _ = create_engine(actor, param_groups=groups, ds_config=ds_config, optim=cfg.optim, max_steps=updates)
    groups, summary = apply_policy(critic.vlm, cfg.policy, base_lr=cfg.ppo.critic_lr, weight_decay=cfg.optim.weight_decay)
    # the critic reads hidden states; its LM head never runs, so it must not be an optimizer parameter
    for p in critic.vlm.lm_head.parameters():
        p.requires_grad_(False)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    groups.append({"params": list(critic.score.parameters()), "lr": cfg.ppo.critic_lr, "weight_decay": 0.0, "name": "head"})
    log.info("critic parameter policy (plus the score head):\n%s", summary.table())
    critic_engine, _ = create_engine(critic, param_groups=groups, ds_config=ds_config,
                                     optim=dataclasses.replace(cfg.optim, lr=cfg.ppo.critic_lr), max_steps=updates)
    engines = PPOEngines(actor=actor_engine, critic=critic_engine,
                         reward=frozen_engine(reward, ds_config), reference=frozen_engine(reference, ds_config))
    return engines, assets


def num_updates(cfg: PPOConfig) -> int:
    """Optimizer steps per PPO step (per engine)."""
    return cfg.ppo.epochs * cfg.ppo.rollout_batch_size // (cfg.train.micro_batch_size * cfg.train.grad_accum_steps)


# ---------------------------------------------------------------- prompts


class PromptStream:
    """Prompts in a seeded order, a fresh permutation per pass; the order is a pure function of
    (seed, position), so a resumed run continues it from the step alone."""

    def __init__(self, path: Path, *, seed: int, assets: ProcessorAssets):
        self.data = ShardDataset(path)
        self.seed, self.assets = seed, assets
        self._perm: tuple[int, list[int]] | None = None

    def index(self, position: int) -> int:
        n = len(self.data)
        epoch = position // n
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][position % n]

    def prompts(self, *, step: int, rank: int, world_size: int, count: int) -> tuple[list[Rendered], list[str | None]]:
        """This rank's ``count`` prompts of PPO step ``step`` (0-based), and each record's ``chosen``
        answer where it has one (preference records do: it is logged how often a rollout matches it)."""
        start = (step * world_size + rank) * count
        out, chosen = [], []
        for pos in range(start, start + count):
            _, members = self.data.read(self.index(pos))
            record = json.loads(members["json"])
            out.append(render_prompt(record["messages"], members, self.assets))
            chosen.append(record.get("chosen"))
        return out, chosen


def rollout_generator(seed: int, *, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One rank's rollouts: sequences, response positions, and what the frozen and old models said."""

    input_ids: torch.Tensor  # (rows, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (rows, L)
    pixels: list[torch.Tensor | None]  # per row: its tiles
    positions: torch.Tensor  # (rows, T) index of the logit that predicts each response token
    tokens: torch.Tensor  # (rows, T) response tokens
    mask: torch.Tensor  # (rows, T) 1 on real response tokens
    reward_ids: torch.Tensor  # (rows, L') what the reward model scores: the closed assistant turn
    reward_mask: torch.Tensor  # (rows, L')
    ended: torch.Tensor  # (rows,) the response ended with end-of-turn
    score: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def inputs(self, idx: list[int], *, device: torch.device, reward: bool = False) -> dict[str, Any]:
        tiles = [self.pixels[i] for i in idx if self.pixels[i] is not None]
        ids, mask = (self.reward_ids, self.reward_mask) if reward else (self.input_ids, self.attention_mask)
        length = int(mask[idx].sum(-1).max())  # drop columns that are padding in every row of this chunk
        return {"input_ids": ids[idx, :length].to(device), "attention_mask": mask[idx, :length].to(device),
                "pixel_values": torch.cat(tiles).to(device) if tiles else None}


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def assemble(prompts: list[Rendered], responses: list[list[int]], *, assets: ProcessorAssets) -> Rollout:
    """Token tensors of prompt + response. The reward model scores the turn as the chat template closes
    it (``<|im_end|>\\n``), with ``<|im_end|>`` added to a response cut off by the length limit."""
    eos, pad = assets.token_id(IM_END), assets.tokenizer.pad_token_id
    newline = assets.tokenizer("\n", add_special_tokens=False)["input_ids"]
    seqs, rewarded, ended = [], [], []
    for p, r in zip(prompts, responses):
        seqs.append(p.input_ids + r)
        done = bool(r) and r[-1] == eos
        ended.append(done)
        rewarded.append(p.input_ids + r + ([] if done else [eos]) + newline)
    input_ids, attention_mask = _pad(seqs, pad)
    reward_ids, reward_mask = _pad(rewarded, pad)
    tokens, mask = _pad(responses, pad)
    starts = torch.tensor([len(p.input_ids) - 1 for p in prompts])
    positions = (starts[:, None] + torch.arange(tokens.shape[1])[None, :]).clamp(max=input_ids.shape[1] - 1)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, pixels=[p.pixel_values for p in prompts],
                   positions=positions, tokens=tokens, mask=mask.float(), reward_ids=reward_ids,
                   reward_mask=reward_mask, ended=torch.tensor(ended))


def _at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` ``(rows, L, ...)`` at ``positions`` ``(rows, T)``."""
    return x[torch.arange(x.shape[0])[:, None], positions.to(x.device)]


def banned_tokens(assets: ProcessorAssets) -> list[int]:
    """Tokens a response may not contain: the visual placeholders (a sampled ``<IMG_CONTEXT>`` would claim
    image features that do not exist) and padding."""
    return [assets.token_id(t) for t in (IMG_START, IMG_END, IMG_CONTEXT, VIDEO, PAD)]


def response_logits(engine, ro: Rollout, idx: list[int], *, device: torch.device, temperature: float,
                    banned: list[int]) -> torch.Tensor:
    """``(len(idx), T, vocab)`` logits predicting each response token, divided by the sampling temperature
    and with the banned tokens at -inf: the policy PPO optimises (and the KL to the reference) is exactly
    the distribution the rollouts were sampled from."""
    start_micro_batch(engine)
    logits = vlm_logits(engine.module, **ro.inputs(idx, device=device))
    logits = _at(logits, ro.positions[idx].clamp(max=logits.shape[1] - 1)) / temperature
    return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the response tokens, 0 on padding (a padding token is banned, so its
    log-probability is -inf, and -inf x 0 would be NaN in every masked sum)."""
    return objective.token_logprobs(logits, tokens).masked_fill(mask == 0, 0.0)


def response_values(engine, ro: Rollout, idx: list[int], *, device: torch.device) -> torch.Tensor:
    """``(len(idx), T)`` the critic's value of the state before each response token."""
    start_micro_batch(engine)
    values = token_values(engine.module, **ro.inputs(idx, device=device))
    return _at(values, ro.positions[idx].clamp(max=values.shape[1] - 1))


@torch.no_grad()
def make_rollout(engines: PPOEngines, prompts: list[Rendered], *, cfg: PPOConfig, assets: ProcessorAssets,
                 dist: DistInfo, generator: torch.Generator, device: torch.device) -> Rollout:
    """Sample responses from the actor and score them: actor and reference log-probabilities, entropy,
    the critic's values and the reward model's score; in chunks of ``train.micro_batch_size`` rows."""
    banned = banned_tokens(assets)
    # one batch of all this rank's prompts (left-padded), the actor gathered whole when it fits the bound
    gen = rollout(engines.actor.module, assets, prompts, max_new_tokens=cfg.ppo.max_new_tokens,
                  batch_size=len(prompts), rank=dist.rank, world_size=dist.world_size, local=True,
                  temperature=cfg.ppo.temperature, top_p=cfg.ppo.top_p, generator=generator, banned=banned,
                  gather_max_bytes=parse_size(cfg.ppo.gather_policy_max_bytes))
    ro = assemble(prompts, [gen.tokens[i] for i in range(len(prompts))], assets=assets)
    logp, ref_logp, values, ent, score = [], [], [], [], []
    micro = cfg.train.micro_batch_size
    for start in range(0, ro.rows, micro):
        idx = list(range(start, min(start + micro, ro.rows)))
        tokens = ro.tokens[idx].to(device)
        logits = response_logits(engines.actor, ro, idx, device=device, temperature=cfg.ppo.temperature,
                                banned=banned)
        mask = ro.mask[idx].to(device)
        logp.append(response_logprobs(logits, tokens, mask).cpu())
        ent.append(objective.entropy(logits).cpu())
        ref_logits = response_logits(engines.reference, ro, idx, device=device, temperature=cfg.ppo.temperature,
                                banned=banned)
        ref_logp.append(response_logprobs(ref_logits, tokens, mask).cpu())
        values.append(response_values(engines.critic, ro, idx, device=device).cpu())
        start_micro_batch(engines.reward)
        inputs = ro.inputs(idx, device=device, reward=True)
        score.append(last_token_scores(token_values(engines.reward.module, **inputs), inputs["attention_mask"]).cpu())
    ro.logp, ro.ref_logp, ro.values = torch.cat(logp), torch.cat(ref_logp), torch.cat(values) * ro.mask
    ro.entropy, ro.score = torch.cat(ent), torch.cat(score)
    return ro


# ---------------------------------------------------------------- advantages and the update


def global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over every rank's real tokens (collective)."""
    s, sq, n = all_reduce_sum([float((x * mask).sum()), float((x * x * mask).sum()), float(mask.sum())])
    mean = s / max(n, 1.0)
    return torch.tensor(mean), torch.tensor(max(sq / max(n, 1.0) - mean * mean, 0.0))


@dataclass
class Advantages:
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # per-token logp - ref_logp on real tokens


def advantages(ro: Rollout, *, cfg: PPOConfig, kl_coef: float) -> Advantages:
    rewards, kl = objective.token_rewards(ro.score, ro.logp, ro.ref_logp, ro.mask, kl_coef=kl_coef)
    adv, ret = objective.gae(rewards, ro.values, ro.mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        mean, var = global_mean_var(adv, ro.mask)
        adv = objective.whiten(adv, ro.mask, mean=mean, var=var)
    return Advantages(advantages=adv, returns=ret, kl=kl)


UPDATE_KEYS = ("policy_loss", "clipped", "approx_kl", "value_loss", "value_clipped", "tokens")


def ppo_update(engines: PPOEngines, ro: Rollout, adv: Advantages, *, cfg: PPOConfig, world_size: int,
               generator: torch.Generator, device: torch.device, banned: list[int], train_actor: bool = True,
               poison: bool = False) -> dict[str, float]:
    """``ppo.epochs`` passes over the rollouts in shuffled minibatches of ``micro_batch_size x
    grad_accum_steps`` rows per rank; each minibatch is one optimizer step of the actor and one of the
    critic. Losses are normalised by the minibatch's response tokens on all ranks (as ``train_step``
    does for supervised tokens). Returns sums over every update and rank, keyed by ``UPDATE_KEYS``.

    ``train_actor=False`` (critic warm-up) still computes the policy figures but updates only the critic.
    A non-finite loss on any rank stops the run on every rank before any backward (exit 4); ``poison``
    makes this rank's policy loss NaN (fault injection for tests).
    """
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    window = micro * accum
    sums = dict.fromkeys(UPDATE_KEYS, 0.0)
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(ro.rows, generator=generator).tolist()
        for start in range(0, ro.rows, window):
            batch = order[start:start + window]
            (tokens,) = all_reduce_sum([float(ro.mask[batch].sum())])
            scale = world_size * accum / max(tokens, 1.0)
            for a in range(accum):
                idx = batch[a * micro:(a + 1) * micro]
                mask = ro.mask[idx].to(device)
                with torch.set_grad_enabled(train_actor):
                    logits = response_logits(engines.actor, ro, idx, device=device, temperature=cfg.ppo.temperature,
                                banned=banned)
                    logp = response_logprobs(logits, ro.tokens[idx].to(device), mask)
                pl = objective.policy_loss(logp, ro.logp[idx].to(device), adv.advantages[idx].to(device), mask,
                                           clip=cfg.ppo.clip_ratio)
                values = response_values(engines.critic, ro, idx, device=device)
                vl = objective.value_loss(values, ro.values[idx].to(device), adv.returns[idx].to(device), mask,
                                          clip=cfg.ppo.value_clip)
                policy_sum = pl.loss_sum * float("nan") if poison else pl.loss_sum
                finite = math.isfinite(float(policy_sum.detach())) and math.isfinite(float(vl.loss_sum.detach()))
                (bad,) = all_reduce_sum([0.0 if finite else 1.0])
                if bad:
                    raise NonFiniteTraining("a non-finite PPO loss on some rank; stopping before the update "
                                            "(the last checkpoint is intact). Lower optim.lr or ppo.critic_lr")
                if train_actor:
                    engines.actor.backward(policy_sum * scale)
                    engines.actor.step()
                engines.critic.backward(vl.loss_sum * scale)
                engines.critic.step()
                for key, value in (("policy_loss", pl.loss_sum), ("clipped", pl.clipped), ("approx_kl", pl.approx_kl_sum),
                                   ("value_loss", vl.loss_sum), ("value_clipped", vl.clipped), ("tokens", mask.sum())):
                    sums[key] += float(value.detach())
    return dict(zip(UPDATE_KEYS, all_reduce_sum([sums[k] for k in UPDATE_KEYS])))


def chosen_matches(ro: Rollout, chosen: list[str | None], *, assets: ProcessorAssets) -> tuple[int, int]:
    """``(responses equal to their record's chosen answer, responses that have one)`` on this rank: a check
    on the reward that does not go through the reward model."""
    matched = known = 0
    for row, answer in enumerate(chosen):
        if answer is None:
            continue
        ids = ro.tokens[row, : int(ro.mask[row].sum())].tolist()
        text = assets.tokenizer.decode(ids, skip_special_tokens=True).strip()
        matched += int(text == answer.strip())
        known += 1
    return matched, known


def step_metrics(ro: Rollout, adv: Advantages, update: dict[str, float], *, matches: tuple[int, int]) -> dict[str, float]:
    """The rollout's and the update's figures, over all ranks (collective)."""
    seq_kl = adv.kl.sum(-1)
    lengths = ro.mask.sum(-1)
    local = [float(ro.score.sum()), float(seq_kl.sum()), float((ro.entropy * ro.mask).sum()), float(lengths.sum()),
             float(ro.ended.sum()), float(ro.rows), float((ro.values * ro.mask).sum()),
             float((adv.returns * ro.mask).sum()), float((ro.score * ro.score).sum()), *map(float, matches)]
    score, kl, ent, tokens, ended, rows, values, returns, score_sq, matched, known = all_reduce_sum(local)
    mean = score / rows
    n = max(update["tokens"], 1.0)
    return {
        "reward": mean, "reward_std": math.sqrt(max(score_sq / rows - mean * mean, 0.0)),
        "kl": kl / rows,  # per sequence: sum over response tokens of logp - ref_logp
        "kl_per_token": kl / max(tokens, 1.0), "entropy": ent / max(tokens, 1.0),
        "response_length": tokens / rows, "ended_fraction": ended / rows,
        "value_mean": values / max(tokens, 1.0), "return_mean": returns / max(tokens, 1.0),
        "policy_loss": update["policy_loss"] / n, "clip_fraction": update["clipped"] / n,
        "approx_kl": update["approx_kl"] / n, "value_loss": update["value_loss"] / n,
        "value_clip_fraction": update["value_clipped"] / n, "rollouts": int(rows),
        # share of responses equal to the prompt record's chosen answer (NaN without such answers)
        "chosen_match": matched / known if known else float("nan"),
    }


# ---------------------------------------------------------------- the step the shared loop runs


class PPOStep:
    """One PPO step for :func:`vlmscale.train.loop.run_loop`: this rank's prompts of the step, rollouts
    and their scores, advantages, then ``ppo.epochs`` passes of clipped policy and value updates. The
    KL controller is part of the checkpoint's client state."""

    def __init__(self, cfg: PPOConfig, engines: PPOEngines, *, prompts: PromptStream, assets: ProcessorAssets,
                 dist: DistInfo, kl_ctl: objective.KLController):
        self.cfg, self.engines, self.prompts, self.assets, self.dist, self.kl_ctl = cfg, engines, prompts, assets, dist, kl_ctl
        self.device = _device()
        self.banned = banned_tokens(assets)
        engines.actor.train()
        engines.critic.train()

    def __call__(self, done: int) -> StepOutcome:
        cfg, engines, dist, step = self.cfg, self.engines, self.dist, done - 1
        t0 = time.time()
        batch, chosen = self.prompts.prompts(step=step, rank=dist.rank, world_size=dist.world_size,
                                             count=cfg.ppo.rollout_batch_size)
        generator = rollout_generator(cfg.train.seed, step=step, rank=dist.rank)
        rollout = make_rollout(engines, batch, cfg=cfg, assets=self.assets, dist=dist, generator=generator,
                               device=self.device)
        adv = advantages(rollout, cfg=cfg, kl_coef=self.kl_ctl.coef)
        t_rollout = time.time() - t0
        update = ppo_update(engines, rollout, adv, cfg=cfg, world_size=dist.world_size, generator=generator,
                            device=self.device, banned=self.banned, train_actor=done > cfg.ppo.freeze_actor_steps,
                            poison=faults.poison_loss(done))
        matches = chosen_matches(rollout, chosen, assets=self.assets)
        row = {"step": done, **step_metrics(rollout, adv, update, matches=matches), "kl_coef": self.kl_ctl.coef,
               "lr": engines.actor.get_lr()[0], "actor_grad_norm": float(engines.actor.get_global_grad_norm() or 0.0),
               "critic_grad_norm": float(engines.critic.get_global_grad_norm() or 0.0),
               "rollout_seconds": t_rollout, "step_seconds": time.time() - t0}
        self.kl_ctl.update(row["kl"], n=row["rollouts"])
        return StepOutcome(row=lambda: row, postfix={"reward": row["reward"], "kl": row["kl"]})

    def client_state(self, done: int) -> dict[str, Any]:
        return {"step": done, "samples_seen": done * self.cfg.ppo.rollout_batch_size * self.dist.world_size,
                "kl_controller": self.kl_ctl.state_dict(), "world_size": self.dist.world_size}
