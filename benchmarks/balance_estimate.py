"""data.balance on a long-tailed mix: per-rank estimated FLOPs imbalance (max/mean) per step, none vs
tokens vs flops, at the InternVL2-1B shape (FlopModel of the config, built on the meta device).

    PYTHONPATH=. python benchmarks/balance_estimate.py [--steps 200] [--world 2] [--accum 1] [--micro 8]

What this measures is the *estimate* the balancer works from (the analytic FLOP model) for packed
micro-batches, not measured step time (that is benchmarks/balance_step_time.py). The mix: 85% short
samples (100-600 text tokens, 0-2 448-px tiles of 256 tokens each), 10% long answers (2k-4k tokens,
one tile), 5% many-tile images (8-12 tiles, short text); drawn from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mix(rng: random.Random) -> dict:
    u = rng.random()
    if u < 0.10:
        text, tiles = rng.randint(2048, 4096), 1
    elif u < 0.15:
        text, tiles = rng.randint(50, 200), rng.randint(8, 12)
    else:
        text, tiles = rng.randint(100, 600), rng.randint(0, 2)
    return {"tokens": text + 256 * tiles, "tiles": tiles, "supervised": int(0.8 * text)}


def main() -> int:
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmscale.data.balance import assign, contiguous, imbalance, sample_cost
    from vlmscale.model.specs import spec_config
    from vlmscale.train.flops import FlopModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "balance_estimate.json")
    args = ap.parse_args()
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(spec_config("internvl2-1b"))
    flop_model = FlopModel.from_model(model)
    rng = random.Random(0)
    g = args.world * args.accum * args.micro
    per_mode = {"none": [], "tokens": [], "flops": []}
    for _ in range(args.steps):
        window = [mix(rng) for _ in range(g)]
        flops = [sample_cost("flops", flop_model=flop_model, **s) for s in window]
        per_mode["none"].append(imbalance(flops, contiguous(world=args.world, accum=args.accum, micro=args.micro)))
        for mode in ("tokens", "flops"):
            costs = [sample_cost(mode, flop_model=flop_model, **s) for s in window]
            per_mode[mode].append(imbalance(flops, assign(costs, world=args.world, accum=args.accum, micro=args.micro)))
    rows = {}
    print(f"world {args.world}, accum {args.accum}, micro {args.micro}, {args.steps} steps; imbalance = max/mean "
          "per-rank estimated FLOPs")
    print(f"{'balance':>8} {'mean':>7} {'p90':>7} {'max':>7}  est. step time vs none")
    none_mean = sum(per_mode["none"]) / args.steps
    for mode, vals in per_mode.items():
        vals = sorted(vals)
        mean = sum(vals) / len(vals)
        rows[mode] = {"mean": round(mean, 4), "p90": round(vals[int(0.9 * len(vals))], 4), "max": round(vals[-1], 4),
                      "est_step_time_vs_none": round(mean / none_mean, 4)}
        print(f"{mode:>8} {mean:>7.3f} {rows[mode]['p90']:>7.3f} {vals[-1]:>7.3f}  {mean / none_mean:.3f}")
    args.out.write_text(json.dumps({"shape": "internvl2-1b", "world": args.world, "accum": args.accum,
                                    "micro": args.micro, "steps": args.steps, "imbalance": rows,
                                    "note": "analytic FLOP estimate; step time ~ the busiest rank's FLOPs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
