"""Real-token fraction with and without packing on a data mixture (rendering only, no training).

    python benchmarks/packing_efficiency.py --micro-batches 200 --out benchmarks/results/packing_efficiency.json

reads the demo SFT mixture exactly as a 1-rank run would (``StepBatchSampler`` positions, the demo
preset's tokenizer and tiling), and for each micro-batch compares

- unpacked: one sample per row, padded to the micro-batch's longest (``collate``);
- FFD only: first-fit decreasing into rows of ``max_seq_len``, padded to the longest row;
- packed: what ``data.packing=true`` trains on (``pack_collate``: FFD, then the row length shrunk).

The fraction is non-pad tokens / (rows x padded length), summed over micro-batches: the
``real_token_fraction`` of metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.dataset import StepBatchSampler, TrainDataset, collate, open_sources, pack_collate
from vlmscale.data.packing import first_fit_decreasing, packed_tensors
from vlmscale.model.build import preset_assets


def measure(*, demo_dir: str, micro_batches: int, micro_batch_size: int, max_seq_len: int, seed: int,
            preset: str) -> dict:
    cfg = load_config(SFTConfig, overrides=[f"data.demo_dir={demo_dir}", f"data.max_seq_len={max_seq_len}",
                                            f"train.seed={seed}"])
    assets = preset_assets(preset, max_tiles=cfg.data.max_tiles)
    dataset = TrainDataset(sources=open_sources(cfg.data), names=[s.name for s in cfg.data.sources],
                           weights=cfg.data.mixture_weights(), assets=assets, max_seq_len=max_seq_len, seed=seed,
                           video=cfg.data.video)
    sampler = StepBatchSampler(rank=0, world_size=1, micro_batch_size=micro_batch_size, grad_accum_steps=1,
                               start_step=0, max_steps=micro_batches)
    pad = assets.tokenizer.pad_token_id
    real = {"unpacked": 0, "ffd_only": 0, "packed": 0}
    slots = dict.fromkeys(real, 0)
    rows = dict.fromkeys(real, 0)
    lengths: list[int] = []
    for positions in sampler:
        items = [dataset[p] for p in positions]
        seqs = [(it.rendered.input_ids, it.rendered.labels) for it in items]
        lens = [len(s[0]) for s in seqs]
        lengths += lens
        batches = {
            "unpacked": collate(items, pad_id=pad),
            "ffd_only": packed_tensors(seqs, first_fit_decreasing(lens, capacity=max_seq_len), pad_id=pad),
            "packed": pack_collate(items, pad_id=pad, max_len=max_seq_len),
        }
        for name, b in batches.items():
            real[name] += int(b["attention_mask"].sum())
            slots[name] += b["input_ids"].numel()
            rows[name] += b["input_ids"].shape[0]
    return {
        "config": {"mixture": "demo SFT (SFTConfig defaults)", "preset": preset, "micro_batches": micro_batches,
                   "micro_batch_size": micro_batch_size, "max_seq_len": max_seq_len, "seed": seed},
        "samples": len(lengths),
        "sample_tokens": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
        "layouts": {name: {"real_token_fraction": real[name] / slots[name], "rows_per_micro_batch": rows[name] / micro_batches,
                           "padded_length_mean": slots[name] / rows[name]} for name in real},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-dir", default="data/demo")
    parser.add_argument("--micro-batches", type=int, default=200)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", default="benchmarks/results/packing_efficiency.json")
    args = parser.parse_args()
    t0 = time.time()
    result = measure(demo_dir=args.demo_dir, micro_batches=args.micro_batches, micro_batch_size=args.micro_batch_size,
                     max_seq_len=args.max_seq_len, seed=args.seed, preset=args.preset)
    result["seconds"] = round(time.time() - t0, 1)
    tok = result["sample_tokens"]
    print(f"{result['samples']} samples, {tok['mean']:.1f} tokens on average ({tok['min']}-{tok['max']}); "
          f"micro-batch {args.micro_batch_size}, max_seq_len {args.max_seq_len}")
    print(f"{'layout':<10} {'real-token fraction':>20} {'rows/micro-batch':>17} {'padded length':>14}")
    for name, row in result["layouts"].items():
        print(f"{name:<10} {row['real_token_fraction']:>20.4f} {row['rows_per_micro_batch']:>17.2f} "
              f"{row['padded_length_mean']:>14.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
