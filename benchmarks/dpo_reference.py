"""DPO step time with the cached reference (the default) vs a live frozen reference engine.

Both use the real setup (``setup_run``, the pair loader, ``train_step`` with the DPO objective) on
2 CPU ranks under ZeRO-3. The cached reference costs one forward-only pass over the run's pairs
before training (timed separately, as ``cache_fill_s``); a live reference costs a second model's
partitioned weights and a no-grad forward (with its parameter all-gathers) in every step.

    PYTHONPATH=. nice -n 10 deepspeed --num_gpus 2 --master_port 29612 benchmarks/dpo_reference.py \\
        model.init_from=runs/sft-demo/hf data.demo_dir=runs/demo-data

Writes ``benchmarks/results/dpo_reference.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="/tmp/vlmscale-bench-dpo")
    ap.add_argument("--local_rank", type=int, default=None)
    args, overrides = ap.parse_known_args()

    from vlmscale.config import DPOConfig, load_config
    from vlmscale.distributed.group import barrier, device, shutdown
    from vlmscale.train.setup import make_loader, setup_run
    from vlmscale.train.step import train_step
    from vlmscale.stages.objectives import DPOObjective
    from vlmscale.stages.dpo_reference import ReferenceCache, fingerprint
    from vlmscale.stages.preference import live_reference

    shutil.rmtree(args.out, ignore_errors=True)
    total = 2 * (args.warmup + args.steps)
    cfg = load_config(DPOConfig, overrides=[f"output_dir={args.out}", f"train.max_steps={total}", "eval.at_start=false",
                                            "eval.at_end=false", *overrides])
    run = setup_run(cfg)
    dev = device()
    cache = ReferenceCache(cfg.output_dir, dist=run.dist, fingerprint=fingerprint(cfg, world_size=run.dist.world_size))
    barrier()
    t0 = time.perf_counter()
    cache.prepare(run.engine, loader_from=lambda s: make_loader(run, pairs=True, start_step=s), max_steps=total,
                  grad_accum_steps=cfg.train.grad_accum_steps, start_step=0, segment_weight=cfg.dpo.segment_weight,
                  flush_steps=cfg.dpo.cache_flush_steps, device=dev)
    barrier()
    fill = time.perf_counter() - t0
    live = live_reference(run)
    batches = iter(make_loader(run, pairs=True))
    times: dict[str, list[float]] = {"cached": [], "live": []}
    for name, reference in (("cached", cache), ("live", live)):
        objective = DPOObjective(beta=cfg.dpo.beta, sft_weight=cfg.dpo.sft_weight, segment_weight=cfg.dpo.segment_weight,
                                 reference=reference)
        for i in range(args.warmup + args.steps):
            micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
            barrier()
            t0 = time.perf_counter()
            train_step(run.engine, micro, device=dev, objective=objective)
            barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if run.dist.is_main:
        cached, live_s = (sum(times[k]) / len(times[k]) for k in ("cached", "live"))
        result = {
            "model": cfg.model.init_from or f"preset:{cfg.model.preset}", "ranks": run.dist.world_size,
            "pairs_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * run.dist.world_size,
            "timed_steps": args.steps, "cached_s_per_step": cached, "live_s_per_step": live_s,
            "live_over_cached": live_s / cached, "cache_fill_s": fill, "cache_fill_steps": total,
            "cache_fill_s_per_step": fill / total,
            "note": "CPU, 2 ranks, ZeRO-3, bf16; the machine was shared with other jobs, so timings are noisy",
        }
        print(f"{'reference':<10}{'s/step':>10}")
        print(f"{'cached':<10}{cached:>10.3f}\n{'live':<10}{live_s:>10.3f}")
        print(f"live / cached = {live_s / cached:.2f}x; one-time cache fill {fill:.1f}s for {total} steps")
        out = REPO / "benchmarks" / "results" / "dpo_reference.json"
        out.write_text(json.dumps(result, indent=2))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
