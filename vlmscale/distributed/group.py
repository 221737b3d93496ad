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


def launcher(env=os.environ) -> str:
    """Which launcher started this process: torch (torchrun, deepspeed, our own env), mpi or slurm.

    torchrun and DeepSpeed's launcher set ``RANK``; ``mpirun`` sets ``OMPI_COMM_WORLD_*``; ``srun``
    sets ``SLURM_PROCID`` and, inside a job step only, ``SLURM_STEP_NUM_TASKS`` (so a plain ``python``
    in an allocation, or a torchrun started by srun, is not taken for one rank of many).
    """
    if "RANK" in env:
        return "torch"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpi"
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return "slurm"
    return "torch"


def env_dist_info(env=os.environ) -> DistInfo:
    """Rank and world size from the launcher's environment (before any process group exists)."""
    kind = launcher(env)
    if kind == "mpi":
        return DistInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                        int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    if kind == "slurm":
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def _first_slurm_host(nodelist: str) -> str:
    import subprocess

    return subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                          text=True).stdout.split()[0]


def _mpi_env() -> dict[str, str]:
    """Rank, world size, local rank and rank 0's address through mpi4py (``mpirun`` starts the ranks)."""
    import socket

    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("started by mpirun (OMPI_COMM_WORLD_SIZE is set) but mpi4py is not installed: "
                           "pip install 'vlmscale[mpi]'") from exc
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = comm.bcast(socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None, root=0)
    env = {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local.Get_rank()),
           "LOCAL_WORLD_SIZE": str(local.Get_size()), "MASTER_ADDR": os.environ.get("MASTER_ADDR", addr)}
    local.Free()
    return env


def export_launcher_env() -> None:
    """Translate an mpirun or srun environment into the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set that
    torch.distributed, DeepSpeed and the rest of vlmscale read. ``MASTER_PORT`` defaults to 29500."""
    kind = launcher()
    if kind == "torch":
        return
    if kind == "mpi":
        env = _mpi_env()
    else:
        info = env_dist_info()
        env = {"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
               "MASTER_ADDR": os.environ.get("MASTER_ADDR") or _first_slurm_host(os.environ["SLURM_STEP_NODELIST"])}
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT", "29500")
    os.environ.update(env)


def local_world_size(env=os.environ) -> int | None:
    """How many ranks the launcher started on this node, where it says (None where it does not)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):  # torchrun, deepspeed, mpirun
        if env.get(key, "").isdigit():
            return int(env[key])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0]  # e.g. "4(x2)": 4 tasks on each of 2 nodes
    return int(per_node) if launcher(env) == "slurm" and per_node.isdigit() else None


def cpu_threads_per_rank(env=os.environ, *, cores: int | None = None, cuda: bool | None = None) -> int | None:
    """The intra-op threads a CPU rank should use: its share of this node's cores. None leaves torch's
    default: on a GPU node, where ``OMP_NUM_THREADS`` is set (the user's choice, or Slurm's
    ``--cpus-per-task``), or where the launcher does not say how many ranks share the node.

    Without it every rank starts one thread per core, so 2 ranks on 2 cores run 4 threads whose
    OpenMP barriers spin against each other."""
    if (torch.cuda.is_available() if cuda is None else cuda) or env.get("OMP_NUM_THREADS"):
        return None
    local = local_world_size(env)
    if not local or local < 2:
        return None
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // local)


def init_distributed(*, timeout_minutes: int = 30) -> DistInfo:
    import deepspeed

    export_launcher_env()
    info = env_dist_info()
    threads = cpu_threads_per_rank()
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the same for processes this rank starts
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


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def dealt_rounds(num_items: int, *, rank: int, world_size: int) -> list[int | None]:
    """The items dealt to ``rank`` round by round: item ``r * world_size + rank`` in round ``r``, or
    None in the last round when the items have run out for this rank. Every rank gets the same number
    of rounds, so a collective loop over them (a ZeRO-3 forward gathers every layer) stays in lock step;
    a rank runs a placeholder in its None rounds and does not count it. Pure: no collective."""
    rounds = -(-num_items // world_size)
    return [i if (i := r * world_size + rank) < num_items else None for r in range(rounds)]


def comm_device() -> torch.device:
    """Where tensors handed to the default process group's collectives must live: the current CUDA
    device under NCCL, the CPU under gloo and MPI (and without a process group)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op, dtype: torch.dtype = torch.float64) -> list[float]:
    """Every collective on plain numbers goes through here: built on :func:`comm_device`, read back on the CPU."""
    t = torch.tensor(values, dtype=dtype, device=comm_device())
    if _multi_rank():
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 for exact counts)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a few scalars over all ranks (one collective)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (collective)."""
    return all_reduce_max([1.0 if flag else 0.0])[0] > 0


def gather_to_main(local: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``local`` (same shape and dtype on all ranks) on rank 0, on the CPU; None elsewhere.
    Collective; sent through :func:`comm_device`."""
    if not _multi_rank():
        return [local.cpu()]
    t = local.contiguous().to(comm_device())
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(t, parts, dst=0)
    return [p.cpu() for p in parts] if parts is not None else None


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


_CPU_GROUP: list = []


def cpu_group():
    """A process group for CPU tensors on every backend: a gloo group beside NCCL (created once, on first
    call, which every rank must make at the same point); the default group under gloo and MPI."""
    if not _multi_rank() or dist.get_backend() in ("gloo", "mpi"):
        return None
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    """This rank's compute device (what DeepSpeed's accelerator runs the engines on)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's inputs must be on: its parameters' (under ZeRO-3 a partitioned parameter's
    placeholder lives on the compute device, also with its partition offloaded to the CPU)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def shm_buffer_path(rank: int) -> Path:
    """The 66 MB /dev/shm buffer DeepSpeed's CPU shared-memory allreduce creates for ``rank``.

    DeepSpeed never unlinks it, so every distinct master port would leave one per rank in RAM.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def shutdown(*, barrier: bool = True) -> None:
    """Leave the process group in order (a group left to interpreter teardown can abort the process),
    and remove this rank's DeepSpeed shared-memory buffer (every rank mapped it at start-up).
    ``barrier=False`` on a failure, where some rank may never reach the barrier."""
    if dist.is_initialized():
        rank = dist.get_rank()
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        with contextlib.suppress(Exception) if not barrier else contextlib.nullcontext():
            dist.destroy_process_group()
        with contextlib.suppress(OSError):
            shm_buffer_path(rank).unlink()
