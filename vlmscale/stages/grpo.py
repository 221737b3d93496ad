"""GRPO under ZeRO-3: group sampling with verifiable rewards, then the clipped ratio update.

The policy is a training engine; the reference (only when ``grpo.kl_coef > 0``) a frozen one; both
are built partitioned. Every rank runs the same forwards in the same order: each has
``grpo.prompts_per_rank`` prompts, generation (``vlmscale.eval.generate.rollout``: left-padded
batches with a KV cache; the policy gathered once when it fits ``grpo.gather_policy_max_bytes``,
else per-layer gathers in lock step) runs the same rounds on every rank, and the
update walks the same minibatches everywhere. A group's completions all live on one rank, so its
advantages need no communication.

Determinism: the prompts of step ``s`` are a pure function of (seed, step, rank, world size), and
each completion is sampled with a generator seeded by (seed, step, the prompt's global position, its
index in the group), so a resumed run continues exactly and a 1-rank run samples what a 2-rank run
samples, whatever the batching.
The maths is in :mod:`vlmscale.losses.grpo`, the rewards in :mod:`vlmscale.eval.rewards`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmscale.config.schema import GRPOConfig
from vlmscale.data.render import BadSample, Rendered, render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import DistInfo, all_reduce_sum
from vlmscale.distributed.group import device as _device
from vlmscale.distributed.zero import frozen_engine
from vlmscale.config.load import parse_size
from vlmscale.eval.generate import rollout
from vlmscale.eval.rewards import RewardSet
from vlmscale.losses import grpo as maths
from vlmscale.losses.ppo import entropy as token_entropy
from vlmscale.model.policy import apply_policy
from vlmscale.model.tokenizer import ProcessorAssets
from vlmscale.precision import torch_dtype
from vlmscale.stages.ppo import Rollout, assemble, banned_tokens, response_logits, response_logprobs
from vlmscale.train import faults
from vlmscale.train.loop import StepOutcome
from vlmscale.train.metrics import truncate_jsonl
from vlmscale.train.progress import NonFiniteTraining
from vlmscale.train.setup import build_partitioned
from vlmscale.train.step import create_engine

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 16


# ---------------------------------------------------------------- engines


@dataclass
class GRPOEngines:
    policy: Any
    reference: Any | None  # frozen start; None when grpo.kl_coef == 0


def num_updates(cfg: GRPOConfig) -> int:
    """Optimizer steps per GRPO step."""
    return cfg.grpo.inner_epochs * cfg.rows_per_rank() // (cfg.train.micro_batch_size * cfg.train.grad_accum_steps)


def build_engines(cfg: GRPOConfig, *, ds_config: dict[str, Any]) -> tuple[GRPOEngines, ProcessorAssets]:
    dtype = torch_dtype(cfg.train.precision)
    tiles = cfg.tile_limit()
    policy, assets = build_partitioned(cfg.model, ds_config=ds_config, max_tiles=tiles, dtype=dtype, name="policy")
    reference = None
    if cfg.grpo.kl_coef > 0:
        ref_model, _ = build_partitioned(cfg.model, ds_config=ds_config, max_tiles=tiles, dtype=dtype, name="reference")
        reference = frozen_engine(ref_model, ds_config)
    groups, summary = apply_policy(policy, cfg.policy, base_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    log.info("policy parameter policy:\n%s", summary.table())
    engine, _ = create_engine(policy, param_groups=groups, ds_config=ds_config, optim=cfg.optim,
                              max_steps=cfg.train.max_steps * num_updates(cfg))
    return GRPOEngines(policy=engine, reference=reference), assets


# ---------------------------------------------------------------- prompts


def split_conversation(record: dict[str, Any]) -> tuple[list[dict], str]:
    """``(the turns before the last assistant turn, that turn's text)``: a conversation shard's record as
    a prompt and its reference answer."""
    messages = record.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise BadSample("no_assistant_turn", "the record has no assistant turn after a prompt")
    content = messages[last]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return messages[:last], text.strip()


class ConversationPrompts:
    """Prompts and reference answers from conversation shards, in a seeded order (a fresh permutation of
    all sources' records per pass); the order is a pure function of (seed, position). A record that
    cannot be a prompt is skipped, counted and replaced by the next position's, deterministically."""

    def __init__(self, paths: list[Path], *, seed: int, assets: ProcessorAssets):
        self.sources = [ShardDataset(p) for p in paths]
        self.sizes = [len(s) for s in self.sources]
        self.total = sum(self.sizes)
        if self.total == 0:
            raise ValueError(f"grpo.prompts: no records in {', '.join(map(str, paths))}")
        self.seed, self.assets = seed, assets
        self._perm: tuple[int, list[int]] | None = None
        self.skipped: dict[str, int] = {}

    def _locate(self, position: int) -> tuple[int, int]:
        epoch = position // self.total
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(self.total))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perm = (epoch, perm)
        flat = self._perm[1][position % self.total]
        for src, size in enumerate(self.sizes):
            if flat < size:
                return src, flat
            flat -= size
        raise AssertionError("unreachable")

    def read(self, position: int) -> tuple[Rendered, dict[str, Any]]:
        """The prompt at ``position`` (or, if its record is unusable, at the next usable position of a
        secondary sequence) and its record with ``reference`` added."""
        for attempt in range(MAX_BAD_IN_A_ROW):
            pos = position if attempt == 0 else position + attempt * self.total * 7919  # a later pass's record
            src, idx = self._locate(pos)
            try:
                _, members = self.sources[src].read(idx)
                record = json.loads(members["json"])
                turns, reference = split_conversation(record)
                rendered = render_prompt(turns, members, self.assets)
                return rendered, {**record, "reference": reference}
            except (BadSample, KeyError, ValueError, TypeError) as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                log.warning("grpo.prompts: record %d of source %d skipped (%s: %s)", idx, src, reason, exc)
        raise BadSample("bad_data", f"{MAX_BAD_IN_A_ROW} unusable prompt records in a row near position {position}; "
                                    "check grpo.prompts")

    def step_positions(self, *, step: int, rank: int, world_size: int, count: int) -> list[int]:
        start = (step * world_size + rank) * count
        return list(range(start, start + count))


def row_seed(seed: int, *, step: int, position: int, member: int) -> int:
    """The sampling seed of completion ``member`` of the prompt at global ``position`` in ``step``: a pure
    function of those, so any world size and any batching samples the same completions."""
    return (seed * 1_000_003 + step * 100_003 + position * 101 + member) % (2 ** 63)


# ---------------------------------------------------------------- rollouts


@dataclass
class GroupRollout:
    ro: Rollout  # (P x G rows) prompt + completion tokens, old log-probs, entropy
    rewards: torch.Tensor  # (P, G) combined reward
    per_reward: dict[str, list]  # each reward's value per row (None where it does not apply)
    advantages: torch.Tensor  # (P x G,)
    keep: torch.Tensor  # (P x G,) 1 where the row is in the update (its group has reward variance)
    zero_variance: torch.Tensor  # (P,) bool
    texts: list[str]
    gen_tokens: int
    seconds: float


def completion_texts(ro: Rollout, assets: ProcessorAssets) -> list[str]:
    out = []
    for row in range(ro.rows):
        ids = ro.tokens[row, : int(ro.mask[row].sum())].tolist()
        out.append(assets.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def sample_groups(engine, prompts: list[Rendered], positions: list[int], *, cfg: GRPOConfig, assets: ProcessorAssets,
                  dist: DistInfo, step: int) -> list[list[int]]:
    """``group_size`` sampled completions (token ids) per prompt, all of this rank's rows in batches of
    ``grpo.rollout_batch_size`` (left-padded, KV-cached; the policy gathered whole when it fits). Each row
    is sampled by its own generator, seeded by (seed, step, the prompt's global position, its index in
    the group), so the completions do not depend on the batching or the world size."""
    g = cfg.grpo.group_size
    rows = [p for p in prompts for _ in range(g)]
    seeds = [row_seed(cfg.train.seed, step=step, position=pos, member=j) for pos in positions for j in range(g)]
    gen = rollout(engine.module, assets, rows, max_new_tokens=cfg.grpo.max_new_tokens,
                  batch_size=cfg.grpo.rollout_batch_size, rank=dist.rank, world_size=dist.world_size, local=True,
                  temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, seeds=seeds, banned=banned_tokens(assets),
                  gather_max_bytes=parse_size(cfg.grpo.gather_policy_max_bytes))
    return [gen.tokens[i] for i in range(len(rows))]


@torch.no_grad()
def make_group_rollout(engines: GRPOEngines, prompts: list[Rendered], records: list[dict], positions: list[int], *,
                       cfg: GRPOConfig, assets: ProcessorAssets, dist: DistInfo, rewards: RewardSet, step: int,
                       device: torch.device) -> GroupRollout:
    t0 = time.time()
    g = cfg.grpo.group_size
    completions = sample_groups(engines.policy, prompts, positions, cfg=cfg, assets=assets, dist=dist, step=step)
    rows_prompts = [p for p in prompts for _ in range(g)]
    ro = assemble(rows_prompts, completions, assets=assets)
    gen_tokens = int(ro.mask.sum())
    seconds = time.time() - t0
    banned = banned_tokens(assets)
    logp, ref_logp, ent = [], [], []
    for start in range(0, ro.rows, cfg.train.micro_batch_size):
        idx = list(range(start, min(start + cfg.train.micro_batch_size, ro.rows)))
        tokens, mask = ro.tokens[idx].to(device), ro.mask[idx].to(device)
        logits = response_logits(engines.policy, ro, idx, device=device, temperature=cfg.grpo.temperature, banned=banned)
        logp.append(response_logprobs(logits, tokens, mask).cpu())
        ent.append(token_entropy(logits).cpu())
        if engines.reference is not None:
            ref = response_logits(engines.reference, ro, idx, device=device, temperature=cfg.grpo.temperature,
                                  banned=banned)
            ref_logp.append(response_logprobs(ref, tokens, mask).cpu())
    ro.logp, ro.entropy = torch.cat(logp), torch.cat(ent)
    ro.ref_logp = torch.cat(ref_logp) if ref_logp else None
    texts = completion_texts(ro, assets)
    total, per = rewards.score([r for r in records for _ in range(g)], texts)
    reward = torch.tensor(total, dtype=torch.float64).view(len(prompts), g)
    adv = maths.group_advantages(reward, mode=cfg.grpo.advantage).float().reshape(-1)
    flat = maths.zero_variance(reward)
    keep = torch.ones(ro.rows)
    if cfg.grpo.skip_zero_variance:
        keep = (~flat).repeat_interleave(g).float()
    return GroupRollout(ro=ro, rewards=reward, per_reward=per, advantages=adv, keep=keep, zero_variance=flat,
                        texts=texts, gen_tokens=gen_tokens, seconds=seconds)


# ---------------------------------------------------------------- the update


UPDATE_KEYS = ("loss", "clipped", "tokens", "approx_kl")


def grpo_update(engines: GRPOEngines, gr: GroupRollout, *, cfg: GRPOConfig, world_size: int, generator: torch.Generator,
                device: torch.device, banned: list[int], poison: bool = False) -> dict[str, float]:
    """``grpo.inner_epochs`` passes over the rollouts in shuffled minibatches of ``micro_batch_size x
    grad_accum_steps`` rows per rank, one optimizer step each. Rows of zero-variance groups (with
    ``grpo.skip_zero_variance``) still run their forward (every rank runs the same forwards) but carry
    no weight; a minibatch with no weight on any rank is skipped on every rank alike. Returns sums over
    every update and rank, keyed by ``UPDATE_KEYS`` (``loss``: the sum of each minibatch's loss), plus
    ``updates``, the number of optimizer steps taken (the same on every rank)."""
    ro, micro, accum = gr.ro, cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    window = micro * accum
    mask_all = ro.mask * gr.keep[:, None]
    sums = dict.fromkeys(UPDATE_KEYS, 0.0)
    updates = 0
    for _ in range(cfg.grpo.inner_epochs):
        order = torch.randperm(ro.rows, generator=generator).tolist()
        for start in range(0, ro.rows, window):
            batch = order[start:start + window]
            _, units = maths.aggregate_weights(mask_all[batch], mode=cfg.grpo.loss_agg,
                                               max_new_tokens=cfg.grpo.max_new_tokens)
            (total_units,) = all_reduce_sum([float(units)])
            if total_units == 0:
                continue  # the same decision on every rank: no forward, no step
            scale = world_size * accum / total_units
            for a in range(accum):
                idx = batch[a * micro:(a + 1) * micro]
                mask = mask_all[idx].to(device)
                logits = response_logits(engines.policy, ro, idx, device=device, temperature=cfg.grpo.temperature,
                                         banned=banned)
                logp = response_logprobs(logits, ro.tokens[idx].to(device), mask)
                kl = None
                if ro.ref_logp is not None:
                    kl = maths.k3_kl(logp, ro.ref_logp[idx].to(device)) * mask
                tl = maths.clipped_token_loss(logp, ro.logp[idx].to(device), gr.advantages[idx].to(device), mask,
                                              clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high, kl=kl,
                                              kl_coef=cfg.grpo.kl_coef)
                weights, _ = maths.aggregate_weights(mask, mode=cfg.grpo.loss_agg, max_new_tokens=cfg.grpo.max_new_tokens)
                loss = (tl.loss * weights).sum()
                if poison:
                    loss = loss * float("nan")
                (bad,) = all_reduce_sum([0.0 if math.isfinite(float(loss.detach())) else 1.0])
                if bad:
                    raise NonFiniteTraining("a non-finite GRPO loss on some rank; stopping before the update "
                                            "(the last checkpoint is intact). Lower optim.lr")
                engines.policy.backward(loss * scale)
                engines.policy.step()
                sums["loss"] += float(loss.detach()) / total_units
                sums["clipped"] += float(tl.clipped.sum())
                sums["tokens"] += float(mask.sum())
                sums["approx_kl"] += float(((ro.logp[idx].to(device) - logp.detach()) * mask).sum())
            updates += 1
    return {**dict(zip(UPDATE_KEYS, all_reduce_sum([sums[k] for k in UPDATE_KEYS]))), "updates": float(updates)}


# ---------------------------------------------------------------- the rollout log


class RolloutLog:
    """``output_dir/rollouts/rank-NNNNN.jsonl`` (``grpo.log_rollouts``): per step, each of this rank's
    prompts with its global position, record id, reference, completions and rewards. On resume the lines
    past the checkpoint are dropped, so the file holds exactly the rollouts the final policy learnt from."""

    def __init__(self, output_dir: str | Path, *, rank: int, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "rollouts" / f"rank-{rank:05d}.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.path, resume_step)

    def log(self, step: int, positions: list[int], records: list[dict], gr: GroupRollout) -> None:
        if not self.enabled:
            return
        g = gr.rewards.shape[1]
        groups = [{"position": pos, "id": rec.get("id"), "reference": rec["reference"],
                   "completions": gr.texts[i * g:(i + 1) * g], "rewards": gr.rewards[i].tolist()}
                  for i, (pos, rec) in enumerate(zip(positions, records))]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "groups": groups}) + "\n")


# ---------------------------------------------------------------- the step the shared loop runs


class GRPOStep:
    """One GRPO step for :func:`vlmscale.train.loop.run_loop`: this rank's prompts, G sampled completions
    each, rewards and group advantages, then ``grpo.inner_epochs`` passes of the clipped update."""

    def __init__(self, cfg: GRPOConfig, engines: GRPOEngines, *, prompts: ConversationPrompts, assets: ProcessorAssets,
                 dist: DistInfo, rewards: RewardSet, samples_seen: int = 0, start_step: int = 0):
        self.cfg, self.engines, self.prompts, self.assets, self.dist, self.rewards = cfg, engines, prompts, assets, dist, rewards
        self.device = _device()
        self.banned = banned_tokens(assets)
        self.samples_seen = samples_seen
        self.rollout_log = RolloutLog(cfg.output_dir, rank=dist.rank, enabled=cfg.grpo.log_rollouts,
                                      resume_step=start_step)
        engines.policy.train()

    def __call__(self, done: int) -> StepOutcome:
        cfg, dist, step = self.cfg, self.dist, done - 1
        t0 = time.time()
        positions = self.prompts.step_positions(step=step, rank=dist.rank, world_size=dist.world_size,
                                                count=cfg.grpo.prompts_per_rank)
        read = [self.prompts.read(p) for p in positions]
        prompts, records = [r[0] for r in read], [r[1] for r in read]
        gr = make_group_rollout(self.engines, prompts, records, positions, cfg=cfg, assets=self.assets, dist=dist,
                                rewards=self.rewards, step=step, device=self.device)
        self.rollout_log.log(done, positions, records, gr)
        t_update = time.time()
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + dist.rank)
        update = grpo_update(self.engines, gr, cfg=cfg, world_size=dist.world_size, generator=generator,
                             device=self.device, banned=self.banned, poison=faults.poison_loss(done))
        update_seconds = time.time() - t_update
        self.samples_seen += cfg.grpo.prompts_per_rank * dist.world_size
        row = {"step": done, **self.metrics(gr, update, update_seconds=update_seconds),
               "lr": self.engines.policy.get_lr()[0],
               "grad_norm": float(self.engines.policy.get_global_grad_norm() or 0.0),
               "step_seconds": time.time() - t0, "samples": self.samples_seen}
        return StepOutcome(row=lambda: row, postfix={"reward": row["reward"], "zero_var": row["zero_variance_fraction"]})

    def metrics(self, gr: GroupRollout, update: dict[str, float], *, update_seconds: float) -> dict[str, float]:
        """The rollout's and the update's figures, over all ranks (collective, the same keys everywhere)."""
        ro = gr.ro
        lengths = ro.mask.sum(-1)
        rewards = gr.rewards.reshape(-1)
        local = [float(rewards.sum()), float((rewards * rewards).sum()), float(ro.rows), float(gr.zero_variance.sum()),
                 float(gr.zero_variance.numel()), float((ro.entropy * ro.mask).sum()), float(lengths.sum()),
                 float(ro.ended.sum()), float(gr.gen_tokens), gr.seconds,
                 float((maths.k3_kl(ro.logp, ro.ref_logp) * ro.mask).sum()) if ro.ref_logp is not None else 0.0]
        for name in self.rewards.names:
            vals = [v for v in gr.per_reward[name] if v is not None]
            local += [float(sum(vals)), float(sum(v * v for v in vals)), float(len(vals))]
        summed = all_reduce_sum(local)
        r_sum, r_sq, rows, flat, groups, ent, tokens, ended, gen_tokens, seconds, kl = summed[:11]
        mean = r_sum / rows
        n_tok = max(update["tokens"], 1.0)
        out = {
            "reward": mean, "reward_std": math.sqrt(max(r_sq / rows - mean * mean, 0.0)),
            "zero_variance_fraction": flat / max(groups, 1.0), "entropy": ent / max(tokens, 1.0),
            "response_length": tokens / rows, "ended_fraction": ended / rows,
            "clip_fraction": update["clipped"] / n_tok, "approx_kl": update["approx_kl"] / n_tok,
            # k3 KL of the sampling policy to the reference, per response token (NaN without a reference)
            "kl": kl / max(tokens, 1.0) if self.engines.reference is not None else float("nan"),
            "policy_loss": update["loss"] / update["updates"] if update["updates"] else 0.0,
            "updates": update["updates"], "rollouts": int(rows),
            # all ranks' generated tokens over the mean rank's sampling time
            "rollout_tokens_per_s": gen_tokens / max(seconds / self.dist.world_size, 1e-9),
            "update_tokens_per_s": update["tokens"] / max(update_seconds, 1e-9),
        }
        for i, name in enumerate(self.rewards.names):
            s, sq, n = summed[11 + 3 * i: 14 + 3 * i]
            m = s / n if n else float("nan")
            out[f"reward/{name}/mean"] = m
            out[f"reward/{name}/std"] = math.sqrt(max(sq / n - m * m, 0.0)) if n else float("nan")
            out[f"reward/{name}/applied"] = n / rows
        return out

    def client_state(self, done: int) -> dict[str, Any]:
        return {"step": done, "samples_seen": self.samples_seen, "world_size": self.dist.world_size,
                "skipped": dict(self.prompts.skipped)}
