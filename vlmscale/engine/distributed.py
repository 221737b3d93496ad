"""Process-group setup and the few collectives the training loop needs.

Everything here is a no-op-safe wrapper: with one process and no launcher, the same code runs
without a process group. GPU boxes use NCCL, CPU-only machines gloo (DeepSpeed picks by
accelerator).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank and world size from the launcher's environment (before any process group exists)."""
    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:
        return DistInfo(int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"]),
                        int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(*, timeout_minutes: int = 30) -> DistInfo:
    import deepspeed

    info = env_dist_info()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and info.world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 for exact counts)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum per-rank ``{name: count}`` dicts over all ranks (collective; every rank gets the total)."""
    total: dict[str, int] = {}
    for part in all_gather_objects(counts):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def shm_buffer_path(rank: int) -> Path:
    """The 66 MB /dev/shm buffer DeepSpeed's CPU shared-memory allreduce creates for ``rank``.

    DeepSpeed never unlinks it, so every distinct master port would leave one per rank in RAM.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def shutdown() -> None:
    """Leave the process group in order (a group left to interpreter teardown can abort the process),
    and remove this rank's DeepSpeed shared-memory buffer (every rank mapped it at start-up)."""
    if dist.is_initialized():
        rank = dist.get_rank()
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        with contextlib.suppress(OSError):
            shm_buffer_path(rank).unlink()
