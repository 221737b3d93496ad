"""What a DataLoader worker costs in host memory when its rank keeps model states in host memory
(a CPU run, or ZeRO offload): a worker forked from the rank against one from vlmscale's fork server.

The rank is played by this process: it holds ``--gb`` of fp32 "optimizer state", starts a loader
with one worker over a tiny dataset, takes a batch, then rewrites the state in place ``--steps``
times, as every optimizer step does. Figures per start method, side by side in one run:

- the worker's private memory (``Private_Clean + Private_Dirty`` of ``/proc/PID/smaps_rollup``): pages
  that exist only for it;
- the machine's used memory growth (``MemAvailable`` before the loader starts minus after the steps).

A forked worker keeps the pre-write copy of every page the rank rewrites, so both figures grow by about
``--gb``; a worker from the fork server shares nothing with the rank.

    PYTHONPATH=. python benchmarks/worker_memory.py [--gb 2] [--steps 2]

Prints a table and writes ``benchmarks/results/worker_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Tiny(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int):
        return torch.full((4,), i)


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _private(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def measure(method: str, state: torch.Tensor, steps: int) -> dict:
    from vlmscale.train.setup import FORKSERVER_ABOVE_BYTES, worker_context

    ctx = None if method == "fork" else worker_context(FORKSERVER_ABOVE_BYTES + 1)
    before = _meminfo("MemAvailable")
    loader = torch.utils.data.DataLoader(Tiny(), batch_size=8, num_workers=1, multiprocessing_context=ctx)
    t0 = time.perf_counter()
    it = iter(loader)  # starts the worker (and, the first time, the fork server)
    next(it)
    first_batch_s = time.perf_counter() - t0
    (worker,) = [w.pid for w in it._workers]
    for _ in range(steps):  # what an optimizer step does to the master weights and moments
        state.mul_(0.999).add_(1e-3)
    next(it)
    time.sleep(0.5)
    out = {"worker_private_bytes": _private(worker), "used_growth_bytes": before - _meminfo("MemAvailable"),
           "first_batch_s": first_batch_s}
    del it, loader
    return out


def main() -> int:
    from vlmscale.precision import cpu_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="host-resident state this 'rank' rewrites")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    results = {}
    for method in ("fork", "forkserver"):
        state = torch.ones(int(args.gb * 1e9 / 4))  # allocated and touched before the worker starts, as after engine set-up
        results[method] = measure(method, state, args.steps)
        del state
        time.sleep(1.0)
    print(f"\n{args.gb:.1f} GB of host state rewritten {args.steps} times after the worker started "
          f"(CPU {cpu_model()}, {os.cpu_count()} cores)")
    print(f"{'worker start':<14}{'worker private GB':>19}{'machine used +GB':>18}{'first batch s':>15}")
    for method, r in results.items():
        print(f"{method:<14}{r['worker_private_bytes'] / 1e9:>19.2f}{r['used_growth_bytes'] / 1e9:>18.2f}"
              f"{r['first_batch_s']:>15.2f}")
    out = REPO / "benchmarks" / "results" / "worker_memory.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "gb": args.gb, "steps": args.steps, **results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
