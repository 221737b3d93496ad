"""The language-modelling stages (align, pretrain, sft): one loop, three configurations.

The stages differ only in their parameter policy, data mixture and defaults (see
``vlmscale.config.schema``); each recipe parses its config and calls :func:`train_lm_stage`,
which reads top to bottom: build -> train -> export -> evaluate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from vlmscale.config.schema import RunConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.distributed.group import all_reduce_sum, device
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.regularize.ewc import EWC
from vlmscale.train import faults
from vlmscale.train.flops import FlopModel, device_peak_tflops
from vlmscale.train.metrics import SampleLog
from vlmscale.train.preemption import Preempted, StopFlag
from vlmscale.train.progress import Progress
from vlmscale.train.setup import Run, make_loader, setup_run
from vlmscale.train.step import Objective, StepStats, export_hf, train_step
from vlmscale.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def train_lm_stage(cfg: RunConfig) -> int:
    # ---------------------------------------------------------------- build
    run = setup_run(cfg)
    if cfg.stage == "align" and cfg.model.init_from is None and cfg.model.llm is None:
        log.warning("align trains only the projector into a frozen LLM, and model.preset=%s builds that LLM from "
                    "scratch: little can be learnt. Start from a pretrained LLM (model.llm=DIR, or model.init_from=DIR); "
                    "for the demo, run the text warm start first (cluster/pipeline.sh, docs/stages.md)", cfg.model.preset)
    engine, dist = run.engine, run.dist
    stop = StopFlag()  # from here on a stop signal ends the run after the next step, with a checkpoint
    batches = iter(make_loader(run))
    flop_model = FlopModel.from_model(engine.module)
    progress = Progress(run.client_state, dist=dist, peak_tflops=total_peak_tflops(cfg))
    evaluator = PeriodicEval(cfg.eval, heldout=resolve_path(cfg.data.heldout, cfg.data),
                             output_dir=Path(cfg.output_dir), dist=dist, assets=run.assets, video=cfg.data.video)
    evaluator.prepare(engine.module, fresh=run.start_step == 0)
    ewc_cfg = cfg.regularizer.ewc
    ewc = EWC.load(ewc_cfg.path, engine.module, weight=ewc_cfg.weight) if ewc_cfg.weight > 0 else None

    if cfg.eval.at_start and run.start_step == 0:
        run.metrics.log(evaluator.run(engine.module, step=0, final=True, name="start"))

    # ---------------------------------------------------------------- train
    train_loop(cfg, run, batches, stop=stop, progress=progress, evaluator=evaluator, flop_model=flop_model,
               before_step=ewc.apply if ewc is not None else None,
               row_extra=(lambda stats: {"ewc_penalty": stats.penalty}) if ewc is not None else None)

    # ---------------------------------------------------------------- export + final eval
    out = Path(cfg.output_dir)
    if cfg.checkpoint.export:
        export_hf(engine, assets=run.assets, out_dir=out / "hf",
                  meta={"stage": cfg.stage, "steps": cfg.train.max_steps, "samples_seen": progress.samples,
                        "lora_merged": cfg.lora.enabled},
                  lora_scaling=cfg.lora.alpha / cfg.lora.r if cfg.lora.enabled else None,
                  shard_size=cfg.checkpoint.export_shard_size)
    if cfg.eval.at_end:
        record = evaluator.run(engine.module, step=cfg.train.max_steps, final=True)
        run.metrics.log(record)
        if dist.is_main:
            (out / "eval.json").write_text(json.dumps(record, indent=2))
    run.metrics.close()
    return 0


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
        watchdog.beat()
        faults.fire("step", done)
        t_wait = time.time()
        micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        progress.data_wait += time.time() - t_wait
        stats = train_step(engine, micro, device=dev, poison=faults.poison_loss(done), before_step=before_step,
                           flop_model=flop_model, objective=objective)
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
            run.checkpoints.save(engine, step=done, client_state=progress.client_state(done))
        if signum and done < cfg.train.max_steps:
            watchdog.close()
            run.metrics.close()
            raise Preempted(done, signum)
        if evaluator.due(done) and done < cfg.train.max_steps:
            with watchdog.paused():
                run.metrics.log(evaluator.run(engine.module, step=done))
    bar.close()
    watchdog.close()
