"""ZeRO-3 all-gather calls and bytes per training step, and checkpoint save / load seconds per GB.

Runs the real SFT setup (``setup_run``: demo preset, ``ds_configs/zero3.json``, 2 CPU ranks) for a few
steps. The all-gathers are counted by wrapping ``torch.distributed``'s gather functions before DeepSpeed
binds them, and only inside timed steps (after ``--warmup`` steps); bytes are the gathered output, per
rank. Then it saves a full checkpoint (weights, optimizer, scheduler, RNG) through ``CheckpointManager``
and loads it back, timing both against the checkpoint's size on disk.

    PYTHONPATH=. nice -n 10 deepspeed --num_gpus 2 benchmarks/zero3_comm_checkpoint.py

Prints a table and writes ``benchmarks/results/zero3_comm_checkpoint.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch.distributed as tdist

REPO = Path(__file__).resolve().parents[1]
COUNTS: Counter = Counter()
COUNTING = [False]


def _wrap(name: str) -> None:
    original = getattr(tdist, name)

    def counted(*args, **kwargs):
        if COUNTING[0]:
            output = args[0] if args else next(iter(kwargs.values()))  # output_tensor / tensor_list / tensor
            tensors = output if isinstance(output, (list, tuple)) else [output]
            COUNTS[f"{name}/calls"] += 1
            COUNTS[f"{name}/bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return original(*args, **kwargs)

    setattr(tdist, name, counted)


for _name in ("all_gather_into_tensor", "all_gather", "_all_gather_base", "reduce_scatter_tensor", "all_reduce"):
    if hasattr(tdist, _name):
        _wrap(_name)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="/tmp/vlmscale-bench-zero3")
    ap.add_argument("--local_rank", type=int, default=None)
    args, overrides = ap.parse_known_args()

    from vlmscale.config import SFTConfig, load_config
    from vlmscale.distributed.group import all_reduce_sum, barrier, device, shutdown
    from vlmscale.train.progress import Progress
    from vlmscale.train.setup import make_loader, setup_run
    from vlmscale.train.step import train_step

    shutil.rmtree(args.out, ignore_errors=True)
    cfg = load_config(SFTConfig, overrides=[f"output_dir={args.out}", f"train.max_steps={args.steps}", "resume=never",
                                            "eval.at_end=false", *overrides])
    run = setup_run(cfg)
    engine, dist = run.engine, run.dist
    batches = iter(make_loader(run))
    progress = Progress({}, dist=dist)
    engine.train()
    step_s = []
    for step in range(args.steps):
        micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        COUNTING[0] = step >= args.warmup
        t0 = time.perf_counter()
        stats = train_step(engine, micro, device=device())
        if COUNTING[0]:
            step_s.append(time.perf_counter() - t0)
        COUNTING[0] = False
        progress.update(stats, step=step + 1, data=cfg.data, max_consecutive_nonfinite=5)
    timed = max(len(step_s), 1)
    comm = {k: v / timed for k, v in sorted(COUNTS.items())}

    barrier()
    t0 = time.perf_counter()
    path = run.checkpoints.save(engine, step=args.steps, client_state=progress.client_state(args.steps))
    save_s = time.perf_counter() - t0
    barrier()
    t0 = time.perf_counter()
    run.checkpoints.load(engine, path.name)
    barrier()
    load_s = time.perf_counter() - t0
    size = _size(path) if dist.is_main else 0
    (size,) = all_reduce_sum([size])
    gb = size / 1e9
    if dist.is_main:
        total_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
        result = {
            "config": {"preset": cfg.model.preset, "ranks": dist.world_size, "micro_batch": cfg.train.micro_batch_size,
                       "params": total_params, "zero": cfg.deepspeed.config, "timed_steps": len(step_s)},
            "per_step_per_rank": comm,
            "step_s": sum(step_s) / timed,
            "checkpoint": {"bytes": size, "save_s": save_s, "load_s": load_s,
                           "save_s_per_gb": save_s / gb, "load_s_per_gb": load_s / gb},
        }
        print(f"{'collective (per step, rank 0)':<34} {'calls':>8} {'MB':>10}")
        for name in sorted({k.split('/')[0] for k in comm}):
            print(f"{name:<34} {comm[name + '/calls']:>8.1f} {comm[name + '/bytes'] / 1e6:>10.2f}")
        print(f"model parameters {total_params:,} ({total_params * 2 / 1e6:.2f} MB in bf16); step {result['step_s']:.2f}s")
        print(f"checkpoint {size / 1e6:.1f} MB: save {save_s:.2f}s ({save_s / gb:.1f} s/GB), "
              f"load {load_s:.2f}s ({load_s / gb:.1f} s/GB)")
        out = REPO / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "zero3_comm_checkpoint.json").write_text(json.dumps(result, indent=2))
    run.metrics.close()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
