"""The training loop every stage runs: optimizer steps with checkpoints, metrics, periodic
evaluation, fault hooks, the hang watchdog and preemption; a stage plugs in through
``objective``, ``before_step`` and ``row_extra``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from tqdm import tqdm

from vlmscale.config.schema import RunConfig
from vlmscale.distributed.group import all_reduce_sum, device
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.train import faults
from vlmscale.train.flops import FlopModel, device_peak_tflops
from vlmscale.train.metrics import SampleLog
from vlmscale.train.preemption import Preempted, StopFlag
from vlmscale.train.progress import Progress
from vlmscale.train.setup import Run
from vlmscale.train.step import Objective, StepStats, train_step
from vlmscale.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def total_peak_tflops(cfg: RunConfig) -> float:
    """The MFU denominator: every rank's device peak, summed (collective)."""
    peak, source = device_peak_tflops(cfg.train.peak_tflops, cfg.train.precision)
    (total,) = all_reduce_sum([peak])
    log.info("MFU peak: %.3g TFLOP/s per rank, %s; %.3g in all", peak, source, total)
    return total


def train_loop(cfg: RunConfig, run: Run, batches: Iterator[dict], *, stop: StopFlag, progress: Progress,
               evaluator: PeriodicEval,
               flop_model: FlopModel | None, objective: Objective | None = None,
               before_step: Callable[[], float] | None = None,
               row_extra: Callable[[StepStats], dict[str, float]] | None = None) -> None:
    """Optimizer steps ``run.start_step + 1 .. train.max_steps``: checkpoints, metrics, periodic evaluation,
    fault hooks, the hang watchdog and preemption (a stop signal commits a checkpoint, then raises
    :class:`Preempted`). ``objective``/``before_step`` go to :func:`train_step`; ``row_extra`` adds
    fields to each metrics row."""
    engine, dist = run.engine, run.dist
    samples = SampleLog(cfg.output_dir, rank=dist.rank, enabled=cfg.train.log_sample_ids, resume_step=run.start_step)
    watchdog = Watchdog(cfg.output_dir, rank=dist.rank, timeout_s=cfg.train.hang_timeout_s)
    dev = device()
    engine.train()
    bar = tqdm(total=cfg.train.max_steps, initial=run.start_step, disable=not dist.is_main, desc=cfg.stage,
               dynamic_ncols=True)
    for step in range(run.start_step, cfg.train.max_steps):
        done = step + 1
        # after a deferred save (checkpoint.async_save) this step's optimizer step first waits for the writers
        watchdog.beat(cfg.checkpoint.save_timeout_s if run.checkpoints.pending else None)
        faults.fire("step", done)
        t_wait = time.time()
        micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        progress.data_wait += time.time() - t_wait
        stats = train_step(engine, micro, device=dev, poison=faults.poison_loss(done), before_step=before_step,
                           flop_model=flop_model, objective=objective)
        run.checkpoints.finish_pending()  # the writers finished inside the step: fsync and commit the last save
        samples.log(done, stats.sample_ids)
        progress.update(stats, step=done, data=cfg.data, max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite)
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.max_steps or stats.update_skipped:
            row = progress.record(done, stats, lr=engine.get_lr()[0])
            if row_extra is not None:
                row.update(row_extra(stats))
            run.metrics.log(row)
        signum = stop.any_rank()
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.train.max_steps or signum:
            watchdog.beat(cfg.checkpoint.save_timeout_s)
            run.checkpoints.save(engine, step=done, client_state=progress.client_state(done),
                                 defer=cfg.checkpoint.async_save and done < cfg.train.max_steps and not signum)
        if signum and done < cfg.train.max_steps:
            watchdog.close()
            run.metrics.close()
            raise Preempted(done, signum)
        if evaluator.due(done) and done < cfg.train.max_steps:
            with watchdog.paused():
                run.metrics.log(evaluator.run(engine.module, step=done))
    bar.close()
    watchdog.close()
