"""Measure a real ZeRO-3 training run's peak tensor memory per rank, for comparison with ``vlmscale plan``.

    deepspeed --num_gpus 2 tests/distributed/plan_measure_script.py --out DIR <run overrides...>

Builds the run exactly as the recipes do (``setup_run``: model partitioned at build, policy, engine),
trains a few steps on the given data and writes ``DIR/rank-N.json``: the peak of tensor memory since
just before the model was built (``vlmscale.plan.measure``), the peak per phase, the shape of every
micro-batch (rows, length, tiles and supervised tokens), and a census of the ZeRO-3 state the rank
holds after training (bytes of each buffer), so the plan can be compared component by component and
not only in total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.distributed.group import device, shutdown
from vlmscale.model.forward import num_supervised
from vlmscale.plan.measure import TensorMemory, phase
from vlmscale.train.setup import make_loader, setup_run
from vlmscale.train.step import train_step


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def census(engine, gathered_peak: int) -> dict[str, int]:
    """Bytes of each part of the ZeRO-3 state this rank holds (storages counted once)."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    persistent = [p.data for p in params if p.ds_persist]
    states = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {
        "param_partitions": _bytes(p.ds_tensor for p in params),
        "persistent_params": _bytes(persistent),
        "gathered_params_peak": gathered_peak,
        "grad_partitions": _bytes([opt.grad_partitions_flat_buffer]),
        "reduce_bucket": _bytes(b.buffer for b in opt.ipg_buckets.values()),
        "fp32_master": _bytes(opt.fp32_partitioned_groups_flat),
        "fp32_grad_buffer": _bytes(g.grad for g in opt.fp32_partitioned_groups_flat),
        "adam_moments": _bytes(states),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(SFTConfig, overrides=overrides)
    shapes: list[dict] = []
    gathered = [0]
    held_between: list[int] = []  # gathered non-persistent parameters when each step starts

    def count_gathered(*_):
        held = sum(p.data.numel() * p.data.element_size() for p in engine.module.parameters() if not p.ds_persist)
        gathered[0] = max(gathered[0], held)

    rss_before = _status_kb("VmRSS")
    with TensorMemory() as mem:
        with phase("setup"):
            run = setup_run(cfg)
        engine = run.engine
        engine.module.lm_head.register_forward_hook(count_gathered)
        calls = {"backward": 0, "step": 0}
        for name in calls:
            method = getattr(engine, name)

            def marked(*a, _method=method, _name=name, **k):
                calls[_name] += 1
                with phase(f"{_name}.{calls[_name]}"):
                    return _method(*a, **k)
            setattr(engine, name, marked)
        batches = iter(make_loader(run))
        engine.train()
        for step in range(cfg.train.max_steps):
            micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
            for b in micro:
                shapes.append({"step": step, "rows": int(b["input_ids"].shape[0]), "length": int(b["input_ids"].shape[1]),
                               "tiles": 0 if b["pixel_values"] is None else int(b["pixel_values"].shape[0]),
                               "supervised": num_supervised(b["labels"])})
            held_between.append(sum(p.data.numel() * p.data.element_size() for p in engine.module.parameters()
                                    if not p.ds_persist))
            with phase(f"train_step.{step}"):
                train_step(engine, micro, device=device())
    result = {"peak_bytes": mem.peak_bytes, "end_bytes": mem.end_bytes, "phase_peaks": mem.phase_peaks,
              "phase_starts": mem.phase_starts, "shapes": shapes, "census": census(engine, gathered[0]),
              "world_size": run.dist.world_size, "gathered_at_step_start": held_between,
              # for comparison only: resident memory also holds libraries, the Python heap and allocator caches
              "rss_growth_bytes": 1024 * (_status_kb("VmHWM") - rss_before)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{run.dist.rank}.json").write_text(json.dumps(result, indent=2))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
