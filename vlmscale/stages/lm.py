"""The language-modelling stages (align, pretrain, sft): one loop, three configurations.

The stages differ only in their parameter policy, data mixture and defaults (see
``vlmscale.config.schema``); each recipe parses its config and calls :func:`train_lm_stage`,
which reads top to bottom: build -> train -> export -> evaluate.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlmscale.config.schema import RunConfig
from vlmscale.data.dataset import resolve_path
from vlmscale.eval.periodic import PeriodicEval
from vlmscale.regularize.ewc import EWC
from vlmscale.train.flops import FlopModel
from vlmscale.train.loop import final_eval_of, finish, total_peak_tflops, train_loop
from vlmscale.train.preemption import StopFlag
from vlmscale.train.progress import Progress
from vlmscale.train.setup import make_loader, setup_run

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
    finish(cfg, engine=engine, assets=run.assets, metrics=run.metrics, is_main=dist.is_main,
           meta={"samples_seen": progress.samples}, final_eval=final_eval_of(cfg, evaluator, engine.module))
    return 0
