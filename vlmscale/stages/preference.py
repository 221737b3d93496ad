"""The reward and DPO stages: build -> (reference) -> train -> export -> evaluate.

Both train on preference pairs with the shared loop (``vlmscale.train.loop.train_loop``:
checkpoints, resume, faults, preemption, metrics) and an objective from
``vlmscale.stages.objectives``; each micro-batch holds the chosen and the rejected answers
of its pairs, so under ZeRO-3 both sides go through one forward and one gather of every layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlmscale.config.schema import DPOConfig, RewardConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.distributed.group import device
from vlmscale.distributed.zero import frozen_engine, load_weights, start_micro_batch, zero3_model_scope
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.model.build import build_model
from vlmscale.model.heads import ScalarHeadModel, head_path, head_weights
from vlmscale.precision import torch_dtype
from vlmscale.stages.dpo_reference import LiveReference, ReferenceCache, fingerprint
from vlmscale.stages.objectives import BradleyTerryObjective, DPOObjective, heldout_pairs, pair_metrics, reward_accuracy
from vlmscale.train.flops import FlopModel
from vlmscale.train.loop import final_eval_of, finish, total_peak_tflops, train_loop
from vlmscale.train.preemption import StopFlag
from vlmscale.train.progress import Progress
from vlmscale.train.setup import Run, make_loader, seed_everything, setup_run
from vlmscale.train.step import StepStats

log = logging.getLogger(__name__)


def _pair_rows(stats: StepStats) -> dict[str, float]:
    return pair_metrics(stats.extra, stats.samples)


# ---------------------------------------------------------------- reward


def _with_head(init_from: str | None):
    """The VLM with a fresh scalar head, or the head saved next to ``init_from`` (a reward export)."""
    def wrap(vlm: torch.nn.Module) -> ScalarHeadModel:
        model = ScalarHeadModel(vlm)
        if init_from is not None and head_path(init_from).is_file():
            load_weights(model, head_weights(init_from))
            log.info("score head loaded from %s", head_path(init_from))
        return model
    return wrap


def train_reward_stage(cfg: RewardConfig) -> int:
    # ---------------------------------------------------------------- build
    run = setup_run(cfg, wrap=_with_head(cfg.model.init_from))
    engine, dist = run.engine, run.dist
    stop = StopFlag()
    batches = iter(make_loader(run, pairs=True))
    progress = Progress(run.client_state, dist=dist, peak_tflops=total_peak_tflops(cfg))
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data), output_dir=Path(cfg.output_dir),
                             dist=dist, assets=run.assets, video=cfg.data.video)
    if cfg.reward.heldout_pairs:  # read (and fail on a bad path) before training, not after
        items, skipped = heldout_pairs(resolve_path(cfg.reward.heldout_pairs, cfg.data), run.assets,
                                       max_seq_len=cfg.data.max_seq_len)

    # ---------------------------------------------------------------- train
    train_loop(cfg, run, batches, stop=stop, progress=progress, evaluator=evaluator,
               flop_model=FlopModel.from_model(engine.module.vlm), objective=BradleyTerryObjective(), row_extra=_pair_rows)

    # ---------------------------------------------------------------- export + held-out pair accuracy
    def pair_accuracy() -> dict | None:
        if not cfg.reward.heldout_pairs:
            return None
        engine.eval()
        result = reward_accuracy(engine.module, items, rank=dist.rank, world_size=dist.world_size,
                                 batch_size=cfg.train.micro_batch_size, pad_id=run.assets.tokenizer.pad_token_id,
                                 device=device(), start=lambda: start_micro_batch(engine))
        if dist.is_main:
            log.info("held-out pair accuracy %.3f over %d pairs (%d skipped)", result.get("accuracy", float("nan")),
                     len(items), skipped)
        return {"step": cfg.train.max_steps, **{f"eval/pairs/{k}": v for k, v in result.items()},
                "eval/pairs/skipped": float(skipped)}

    finish(cfg, engine=engine, assets=run.assets, metrics=run.metrics, is_main=dist.is_main,
           meta={"pairs_seen": progress.samples}, final_eval=pair_accuracy)
    return 0


# ---------------------------------------------------------------- DPO


def live_reference(run: Run):
    """The starting model again, frozen, in its own optimizer-less (ZeRO-3) engine."""
    cfg = run.cfg
    seed_everything(cfg.train.seed)  # a preset start is rebuilt from the same seed
    with zero3_model_scope(run.ds_config):
        model, _ = build_model(cfg.model, max_tiles=cfg.data.max_tiles,
                               dtype=torch_dtype(cfg.train.precision), load_weights=load_weights)
    return LiveReference(frozen_engine(model, run.ds_config), segment_weight=cfg.dpo.segment_weight, device=device())


def train_dpo_stage(cfg: DPOConfig) -> int:
    # ---------------------------------------------------------------- build
    run = setup_run(cfg)
    engine, dist = run.engine, run.dist
    stop = StopFlag()
    progress = Progress(run.client_state, dist=dist, peak_tflops=total_peak_tflops(cfg))
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data), output_dir=Path(cfg.output_dir),
                             dist=dist, assets=run.assets, video=cfg.data.video)
    evaluator.prepare(engine.module, fresh=run.start_step == 0)

    # ---------------------------------------------------------------- reference log-probs
    if cfg.dpo.reference == "cached":
        reference = ReferenceCache(cfg.output_dir, dist=dist, fingerprint=fingerprint(cfg, world_size=dist.world_size))
        reference.prepare(engine, loader_from=lambda step: make_loader(run, pairs=True, start_step=step),
                          max_steps=cfg.train.max_steps, grad_accum_steps=cfg.train.grad_accum_steps,
                          start_step=run.start_step, segment_weight=cfg.dpo.segment_weight,
                          flush_steps=cfg.dpo.cache_flush_steps, device=device())
    else:
        reference = live_reference(run)
    objective = DPOObjective(beta=cfg.dpo.beta, sft_weight=cfg.dpo.sft_weight, segment_weight=cfg.dpo.segment_weight,
                             reference=reference)
    if cfg.eval.at_start and run.start_step == 0:
        run.metrics.log(evaluator.run(engine.module, step=0, final=True, name="start"))

    # ---------------------------------------------------------------- train
    batches = iter(make_loader(run, pairs=True))
    train_loop(cfg, run, batches, stop=stop, progress=progress, evaluator=evaluator,
               flop_model=FlopModel.from_model(engine.module), objective=objective, row_extra=_pair_rows)

    # ---------------------------------------------------------------- export + final eval
    finish(cfg, engine=engine, assets=run.assets, metrics=run.metrics, is_main=dist.is_main,
           meta={"pairs_seen": progress.samples}, final_eval=final_eval_of(cfg, evaluator, engine.module))
    return 0
