"""The training loop every stage runs, and the ending every stage shares.

:func:`run_loop` owns what a step is surrounded by: the hang watchdog, fault hooks, metrics cadence,
checkpoint cadence, preemption (a stop signal commits a checkpoint, then raises :class:`Preempted`)
and periodic evaluation. A stage plugs in one :class:`StageStep`:

- the supervised stages (align, pretrain, sft) and the pair stages (reward, DPO) use
  :class:`LMStep` through :func:`train_loop`: one optimizer step of :func:`train_step` over
  ``grad_accum_steps`` micro-batches, with an optional objective, before-step regulariser and row extras;
- the RL stages (PPO, GRPO) use their own step, rollout + update (``vlmscale.stages.ppo``,
  ``vlmscale.stages.grpo``).

:func:`finish` is the export + final evaluation every stage ends with.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from tqdm import tqdm

from vlmscale.config.schema import RunConfig
from vlmscale.distributed.group import all_reduce_sum, device
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.train import faults
from vlmscale.train.checkpoint import CheckpointManager
from vlmscale.train.flops import FlopModel, device_peak_tflops
from vlmscale.train.metrics import MetricsLogger, SampleLog
from vlmscale.train.preemption import Preempted, StopFlag
from vlmscale.train.progress import Progress
from vlmscale.train.setup import Run
from vlmscale.train.step import Objective, StepStats, export_hf, train_step
from vlmscale.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def total_peak_tflops(cfg: RunConfig) -> float:
    """The MFU denominator: every rank's device peak, summed (collective)."""
    peak, source = device_peak_tflops(cfg.train.peak_tflops, cfg.train.precision)
    (total,) = all_reduce_sum([peak])
    log.info("MFU peak: %.3g TFLOP/s per rank, %s; %.3g in all", peak, source, total)
    return total


# ---------------------------------------------------------------- the loop


@dataclass
class StepOutcome:
    """What one step tells the loop. ``row`` builds the metrics row; the loop calls it on the logging
    cadence only, on every rank alike (building a row may be collective)."""

    row: Callable[[], dict[str, Any]]
    postfix: dict[str, float] = field(default_factory=dict)  # the progress bar's figures
    force_log: bool = False  # log this step whatever the cadence (e.g. a skipped update)


class StageStep(Protocol):
    """One optimizer step of a stage, and the state a checkpoint carries for it."""

    def __call__(self, done: int) -> StepOutcome:
        """Run step ``done`` (1-based); collective."""

    def client_state(self, done: int) -> dict[str, Any]:
        """The checkpoint's client state after step ``done`` (collective)."""


@dataclass
class Trainer:
    """What the loop drives: the engine the checkpoint is keyed on (its learning rate is logged), other
    engines saved beside it (PPO's critic), and where checkpoints and metrics go."""

    cfg: RunConfig
    engine: Any
    checkpoints: CheckpointManager
    metrics: MetricsLogger
    rank: int
    start_step: int
    is_main: bool
    extra_engines: dict[str, Any] | None = None

    @classmethod
    def of(cls, run: Run) -> Trainer:
        return cls(cfg=run.cfg, engine=run.engine, checkpoints=run.checkpoints, metrics=run.metrics, rank=run.dist.rank,
                   start_step=run.start_step, is_main=run.dist.is_main)


def run_loop(trainer: Trainer, step_fn: StageStep, *, stop: StopFlag, evaluator: PeriodicEval, eval_model,
             desc: str | None = None) -> None:
    """Optimizer steps ``start_step + 1 .. train.max_steps`` of ``step_fn``, with checkpoints, metrics,
    periodic evaluation of ``eval_model``, fault hooks, the hang watchdog and preemption."""
    cfg = trainer.cfg
    watchdog = Watchdog(cfg.output_dir, rank=trainer.rank, timeout_s=cfg.train.hang_timeout_s)
    bar = tqdm(total=cfg.train.max_steps, initial=trainer.start_step, disable=not trainer.is_main,
               desc=desc or cfg.stage, dynamic_ncols=True)
    for step in range(trainer.start_step, cfg.train.max_steps):
        done = step + 1
        # after a deferred save (checkpoint.async_save) this step's optimizer step first waits for the writers
        watchdog.beat(cfg.checkpoint.save_timeout_s if trainer.checkpoints.pending else None)
        faults.fire("step", done)
        outcome = step_fn(done)
        trainer.checkpoints.finish_pending()  # the writers finished inside the step: fsync and commit the last save
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in outcome.postfix.items()})
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.max_steps or outcome.force_log:
            trainer.metrics.log(outcome.row())
        signum = stop.any_rank()
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.train.max_steps or signum:
            watchdog.beat(cfg.checkpoint.save_timeout_s)
            # deferred (async) only for one engine: the commit waits on that engine's writers
            defer = (cfg.checkpoint.async_save and done < cfg.train.max_steps and not signum
                     and not trainer.extra_engines)
            trainer.checkpoints.save(trainer.engine, step=done, client_state=step_fn.client_state(done),
                                     extra_engines=trainer.extra_engines, defer=defer)
        if signum and done < cfg.train.max_steps:
            watchdog.close()
            trainer.metrics.close()
            raise Preempted(done, signum)
        if evaluator.due(done) and done < cfg.train.max_steps:
            with watchdog.paused():
                trainer.metrics.log(evaluator.run(eval_model, step=done))
    bar.close()
    watchdog.close()


# ---------------------------------------------------------------- the supervised and pair stages' step


class LMStep:
    """One :func:`train_step` over ``grad_accum_steps`` micro-batches: the step of align, pretrain, sft,
    reward and DPO. ``objective``/``before_step`` go to :func:`train_step`; ``row_extra`` adds fields to
    each metrics row."""

    def __init__(self, cfg: RunConfig, run: Run, batches: Iterator[dict], *, progress: Progress,
                 flop_model: FlopModel | None, objective: Objective | None = None,
                 before_step: Callable[[], float] | None = None,
                 row_extra: Callable[[StepStats], dict[str, float]] | None = None):
        self.cfg, self.engine, self.batches, self.progress = cfg, run.engine, batches, progress
        self.flop_model, self.objective, self.before_step, self.row_extra = flop_model, objective, before_step, row_extra
        self.samples = SampleLog(cfg.output_dir, rank=run.dist.rank, enabled=cfg.train.log_sample_ids,
                                 resume_step=run.start_step)
        self.device = device()
        self.engine.train()

    def __call__(self, done: int) -> StepOutcome:
        cfg, progress = self.cfg, self.progress
        t_wait = time.time()
        micro = [next(self.batches) for _ in range(cfg.train.grad_accum_steps)]
        progress.data_wait += time.time() - t_wait
        stats = train_step(self.engine, micro, device=self.device, poison=faults.poison_loss(done),
                           before_step=self.before_step, flop_model=self.flop_model, objective=self.objective)
        self.samples.log(done, stats.sample_ids)
        progress.update(stats, step=done, data=cfg.data, max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite)

        def row() -> dict[str, Any]:
            out = progress.record(done, stats, lr=self.engine.get_lr()[0])
            if self.row_extra is not None:
                out.update(self.row_extra(stats))
            return out

        return StepOutcome(row=row, postfix={"loss": stats.loss}, force_log=stats.update_skipped)

    def client_state(self, done: int) -> dict[str, Any]:
        return self.progress.client_state(done)


def train_loop(cfg: RunConfig, run: Run, batches: Iterator[dict], *, stop: StopFlag, progress: Progress,
               evaluator: PeriodicEval,
               flop_model: FlopModel | None, objective: Objective | None = None,
               before_step: Callable[[], float] | None = None,
               row_extra: Callable[[StepStats], dict[str, float]] | None = None) -> None:
    """:func:`run_loop` with an :class:`LMStep`."""
    step = LMStep(cfg, run, batches, progress=progress, flop_model=flop_model, objective=objective,
                  before_step=before_step, row_extra=row_extra)
    run_loop(Trainer.of(run), step, stop=stop, evaluator=evaluator, eval_model=run.engine.module)


# ---------------------------------------------------------------- the ending


def finish(cfg: RunConfig, *, engine, assets, metrics: MetricsLogger, is_main: bool, meta: dict[str, Any],
           final_eval: Callable[[], dict[str, Any] | None]) -> None:
    """Every stage's ending: the HF export (``checkpoint.export``; LoRA merged) with ``meta`` recorded,
    then the final evaluation ``final_eval`` (a metrics record, or None for none), logged and written to
    ``output_dir/eval.json``; then the metrics are closed."""
    out = Path(cfg.output_dir)
    if cfg.checkpoint.export:
        export_hf(engine, assets=assets, out_dir=out / "hf",
                  meta={"stage": cfg.stage, "steps": cfg.train.max_steps, **meta, "lora_merged": cfg.lora.enabled},
                  lora_scaling=cfg.lora.alpha / cfg.lora.r if cfg.lora.enabled else None,
                  shard_size=cfg.checkpoint.export_shard_size)
    record = final_eval()
    if record is not None:
        metrics.log(record)
        if is_main:
            (out / "eval.json").write_text(json.dumps(record, indent=2))
    metrics.close()


def final_eval_of(cfg: RunConfig, evaluator: PeriodicEval, model) -> Callable[[], dict[str, Any] | None]:
    """The held-out suites at the end (``eval.at_end``), as :func:`finish` takes them."""
    return lambda: evaluator.run(model, step=cfg.train.max_steps, final=True) if cfg.eval.at_end else None
