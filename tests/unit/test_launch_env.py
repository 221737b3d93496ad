"""Rank discovery from each launcher's environment, and a data order that ignores the world size."""

from __future__ import annotations

import pytest

from vlmscale.data.dataset import StepBatchSampler
from vlmscale.distributed import group as distributed
from vlmscale.distributed.group import DistInfo, env_dist_info, launcher


@pytest.mark.parametrize("env,kind,info", [
    ({}, "torch", DistInfo(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, "torch", DistInfo(3, 8, 1)),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}, "mpi",
     DistInfo(5, 16, 5)),
    # inside an srun job step: one rank per task
    ({"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "1", "SLURM_NTASKS": "32"}, "slurm",
     DistInfo(9, 32, 1)),
    # the batch shell of a 32-task job (no step): a plain `python` there is one process, not rank 0 of 32
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_ID": "7"}, "torch", DistInfo(0, 1, 0)),
    # torchrun started by srun (one per node): torchrun's RANK wins over the task's SLURM_PROCID
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "RANK": "13", "WORLD_SIZE": "32", "LOCAL_RANK": "5"}, "torch",
     DistInfo(13, 32, 5)),
])
def test_launcher_environments(env, kind, info):
    assert launcher(env) == kind
    assert env_dist_info(env) == info


@pytest.mark.parametrize("env,cores,cuda,threads", [
    ({"LOCAL_SIZE": "2"}, 2, False, 1),  # deepspeed --num_gpus 2 on a 2-core machine
    ({"LOCAL_WORLD_SIZE": "4"}, 16, False, 4),  # torchrun
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 8, False, 2),  # mpirun: the floor of the share
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, 32, False, 8),
    ({"LOCAL_SIZE": "8"}, 2, False, 1),  # more ranks than cores: one thread each
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, 2, False, None),  # the user's (or Slurm's) choice stands
    ({"LOCAL_SIZE": "2"}, 2, True, None),  # GPU ranks: torch's default
    ({"LOCAL_SIZE": "1"}, 2, False, None),  # one rank: every core is its own already
    ({}, 2, False, None),  # the launcher does not say how many ranks share the node
])
def test_cpu_ranks_share_the_cores(env, cores, cuda, threads):
    assert distributed.cpu_threads_per_rank(env, cores=cores, cuda=cuda) == threads


def test_srun_environment_is_exported_for_torch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE"):
        # set, then delete: monkeypatch then restores the original state (absent) of what export_launcher_env writes
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu-[07-08]")
    monkeypatch.setattr(distributed, "_first_slurm_host", lambda nodelist: {"gpu-[07-08]": "gpu-07"}[nodelist])
    distributed.export_launcher_env()
    import os

    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-07", "MASTER_PORT": "29500"}


def _global_steps(*, world: int, micro: int, accum: int, start: int = 0, steps: int = 5) -> list[list[int]]:
    """Each step's positions over all ranks, in (micro-batch, rank) order."""
    samplers = [iter(StepBatchSampler(rank=r, world_size=world, micro_batch_size=micro, grad_accum_steps=accum,
                                      start_step=start, max_steps=steps)) for r in range(world)]
    out = []
    for _ in range(start, steps):
        step = []
        for _ in range(accum):
            for s in samplers:
                step.extend(next(s))
        out.append(step)
    return out


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_sample_order_depends_on_the_global_batch_only(world, accum):
    # global batch 32 = micro 4 x accum x world: step t reads positions [32 t, 32 (t + 1)) in this order
    assert _global_steps(world=world, micro=4, accum=accum) == [list(range(32 * t, 32 * (t + 1))) for t in range(5)]
    # ... and a resume at step 3 continues at position 96, whatever world size wrote the checkpoint
    assert _global_steps(world=world, micro=4, accum=accum, start=3) == [list(range(96, 128)), list(range(128, 160))]
