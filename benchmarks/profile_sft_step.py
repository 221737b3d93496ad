"""Where a vlmscale SFT step spends its time: wall time per phase, and torch.profiler's top operators.

Runs the real setup (``setup_run`` + ``make_loader``, 2 CPU ranks under deepspeed) and times, per step on
rank 0: waiting for data, the forward (vision + LLM + lm_head), the loss, ``engine.backward`` and
``engine.step``, and everything else ``train_step`` does (counting all-reduces). Then it profiles a few
steps and prints the operators with the most self CPU time.

    PYTHONPATH=. nice -n 10 deepspeed --num_gpus 2 benchmarks/profile_sft_step.py model.init_from=DIR

Writes ``benchmarks/results/profile_sft_step.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class Timers:
    def __init__(self):
        self.total = defaultdict(float)
        self.on = False

    def wrap(self, obj, name: str, label: str):
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.on:
                    self.total[label] += time.perf_counter() - t0

        setattr(obj, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/vlmscale-bench-profile")
    ap.add_argument("--shapes", action="store_true", help="group the operator table by input shapes as well")
    ap.add_argument("--local_rank", type=int, default=None)
    args, overrides = ap.parse_known_args()

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.train import step as trainer_mod
    from vlmscale.distributed.group import device, shutdown
    from vlmscale.train.setup import make_loader, setup_run

    shutil.rmtree(args.out, ignore_errors=True)
    total = args.steps + args.profile_steps
    cfg = load_config(SFTConfig, overrides=[f"output_dir={args.out}", f"train.max_steps={total}", "resume=never",
                                            "eval.at_end=false", "policy.vision.trainable=false", *overrides])
    run = setup_run(cfg)
    engine, dist = run.engine, run.dist
    batches = iter(make_loader(run))
    timers = Timers()
    timers.wrap(trainer_mod, "vlm_hidden", "forward")
    timers.wrap(trainer_mod, "supervised_loss_sum", "loss")
    timers.wrap(engine, "backward", "backward")
    timers.wrap(engine, "step", "optimizer step")
    timers.wrap(trainer_mod, "all_reduce_sum", "counting all-reduces")
    engine.train()
    step_time = 0.0
    for step in range(args.steps):
        timers.on = step >= args.warmup
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        if timers.on:
            timers.total["data wait"] += time.perf_counter() - t0
        trainer_mod.train_step(engine, micro, device=device())
        if timers.on:
            step_time += time.perf_counter() - t0
    timed = args.steps - args.warmup
    phases = {k: v / timed for k, v in timers.total.items()}
    phases["other"] = step_time / timed - sum(phases.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.profile_steps):
            micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
            trainer_mod.train_step(engine, micro, device=device())
    table = prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=30 if args.shapes else 20)
    if dist.is_main:
        print(f"{'phase (rank 0, s per step)':<28} {'s':>8} {'share':>7}")
        for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"{k:<28} {v:>8.3f} {100 * v / (step_time / timed):>6.1f}%")
        print(f"{'step':<28} {step_time / timed:>8.3f}")
        print(table)
        out = REPO / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_sft_step.json").write_text(json.dumps(
            {"s_per_step": step_time / timed, "phases_s_per_step": phases, "timed_steps": timed,
             "top_ops_self_cpu": table}, indent=2))
    run.metrics.close()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
